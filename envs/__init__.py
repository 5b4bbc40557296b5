"""Environments on the teacher's top-p MDP: a batched TorchRL env, its Gymnasium face, a toy.

Importing ``envs`` registers the Gymnasium ids ``tdkd/TopPToken-v0`` (one row) and the
vector entry point of the same id (``gymnasium.make_vec``).

- ``TopPTokenEnv``: batched TorchRL env (teacher KV cache, partial resets, masks, rewards);
- ``StudentPolicy``: a student LM as a masked policy with its own KV cache;
- ``episodes_to_batch``: finished episodes -> the offline batch format of the trainers;
- ``TopPTokenGymEnv`` / ``TopPTokenVectorEnv``: the Gymnasium face;
- ``TabularTokenEnv``: a Markov-teacher toy whose top-p soft optimum is solved exactly.

>>> from tdkd.models import tiny_causal_lm
>>> env = TopPTokenEnv(tiny_causal_lm(), [[5, 6, 7], [8]], batch_size=2, max_new_tokens=3, seed=0)
>>> rollout = env.rollout(3, StudentPolicy(tiny_causal_lm(seed=1), seed=0), break_when_any_done=False)
>>> rollout["action_mask"].gather(-1, rollout["action"].unsqueeze(-1)).all().item()
True
>>> episodes_to_batch(rollout)["response_mask"].sum(-1).tolist()
[3, 3]
"""

from __future__ import annotations

from envs.episodes import episodes_to_batch
from envs.gym_env import ENV_ID, TopPTokenGymEnv, TopPTokenVectorEnv, register
from envs.kv_cache import IncrementalLM
from envs.policy import StudentPolicy
from envs.tabular import MarkovTeacher, TabularTokenEnv
from envs.token_env import REWARD_MODES, TopPTokenEnv, encode_prompts, nucleus_view

__all__ = [
    "ENV_ID",
    "REWARD_MODES",
    "IncrementalLM",
    "MarkovTeacher",
    "StudentPolicy",
    "TabularTokenEnv",
    "TopPTokenEnv",
    "TopPTokenGymEnv",
    "TopPTokenVectorEnv",
    "encode_prompts",
    "episodes_to_batch",
    "nucleus_view",
    "register",
]

register()
