"""The Gymnasium face of ``TopPTokenEnv``: one row (``Env``) and B rows (``VectorEnv``).

Registered on ``import envs`` as ``tdkd/TopPToken-v0`` (``gymnasium.make``, one row) with a
vector entry point (``gymnasium.make_vec("tdkd/TopPToken-v0", num_envs=B)``). Without a
``teacher`` both load the embedded teacher (``tdkd.models.load_teacher()``) when constructed,
and prompt it with a few built-in chat prompts.

Description:
    The teacher's top-p token MDP (see ``TopPTokenEnv``): each step appends one token.

Observation (Dict; L = max prompt + max_new_tokens, K = max_support):
    tokens int64 [L] (right-padded), attention_mask int8 [L], length / prompt_length / step
    int64 [], support_ids int64 [K], support_log_probs float32 [K] (-inf at padding),
    support_mask int8 [K]. The vector env batches each entry to [B, ...].

Action space:
    ``Discrete(V)``, a token id; ``info["action_mask"]`` (int8 [V]) marks the nucleus, e.g.
    ``env.action_space.sample(mask=info["action_mask"])``.

Reward:
    as ``TopPTokenEnv`` (default log pi_T(a|s)).

Episode end:
    terminated on EOS, truncated after ``max_new_tokens``.

Info:
    action_mask int8 [V], nucleus_size, covered_mass, teacher_log_prob (of the last action),
    out_of_support (the last action was outside the nucleus).

Arguments:
    teacher / prompts / tokenizer (defaults: the embedded teacher and built-in prompts) and
    any ``TopPTokenEnv`` keyword. ``out_of_support`` defaults to "allow" here, because
    Gymnasium's checker and generic agents sample the unmasked ``Discrete`` space; the action
    is flagged in ``info["out_of_support"]`` and logged (once per env) -- never silent. Pass
    ``out_of_support="error"`` for the strict behaviour of the TorchRL env.

Vector autoreset: ``AutoresetMode.DISABLED``. Finished rows are reset by the caller with
``reset(options={"reset_mask": bool [B]})``; this is the mode TorchRL's ``GymWrapper``
prefers (it maps its ``"_reset"`` mask onto it).
"""

from __future__ import annotations

import logging

import gymnasium
import numpy as np
import torch
from gymnasium import spaces
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space
from tensordict import TensorDict

from envs.token_env import TopPTokenEnv

__all__ = ["DEFAULT_PROMPTS", "ENV_ID", "TopPTokenGymEnv", "TopPTokenVectorEnv", "register"]

logger = logging.getLogger(__name__)

ENV_ID = "tdkd/TopPToken-v0"

DEFAULT_PROMPTS = (
    "What is the capital of France?",
    "Write a haiku about autumn.",
    "Give me three tips for a good night's sleep.",
    "Explain photosynthesis to a child.",
)

_OBS_KEYS = (
    "tokens",
    "attention_mask",
    "length",
    "prompt_length",
    "step",
    "support_ids",
    "support_log_probs",
    "support_mask",
)
_INFO_KEYS = ("nucleus_size", "covered_mass", "teacher_log_prob", "out_of_support")


def _default_teacher_and_prompts():
    """The embedded teacher and the built-in prompts in its chat format."""
    from tdkd.models import load_teacher

    teacher, tokenizer = load_teacher()
    prompts = []
    for text in DEFAULT_PROMPTS:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
        )
        prompts.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    return teacher, prompts


def _make_env(teacher, prompts, batch_size: int, out_of_support: str, kwargs) -> TopPTokenEnv:
    if teacher is None:
        teacher, default_prompts = _default_teacher_and_prompts()
        prompts = default_prompts if prompts is None else prompts
    if prompts is None:
        raise ValueError(
            "prompts is required when a teacher is given (token-id lists, or text with tokenizer=)"
        )
    return TopPTokenEnv(
        teacher, prompts, batch_size=batch_size, out_of_support=out_of_support, **kwargs
    )


def _single_observation_space(env: TopPTokenEnv) -> spaces.Dict:
    length, k, v = env.max_length, env.support_width, env.vocab_size

    def ints(high: int, shape=()) -> spaces.Box:
        return spaces.Box(0, high, shape=shape, dtype=np.int64)

    def flags(n: int) -> spaces.Box:
        return spaces.Box(0, 1, shape=(n,), dtype=np.int8)

    return spaces.Dict(
        {
            "tokens": ints(v - 1, (length,)),
            "attention_mask": flags(length),
            "length": ints(length),
            "prompt_length": ints(env.max_prompt_tokens),
            "step": ints(env.max_new_tokens),
            "support_ids": ints(v - 1, (k,)),
            "support_log_probs": spaces.Box(-np.inf, 0.0, shape=(k,), dtype=np.float32),
            "support_mask": flags(k),
        }
    )


def _to_numpy(td: TensorDict) -> tuple[dict, dict]:
    """(observation dict, info dict) of an env tensordict, as numpy, keeping its batch dims."""
    obs = {}
    for key in _OBS_KEYS:
        value = td.get(key)
        obs[key] = (
            value.cpu().to(torch.int8).numpy()
            if value.dtype == torch.bool
            else value.cpu().numpy().copy()
        )
    info = {"action_mask": td.get("action_mask").cpu().to(torch.int8).numpy()}
    for key in _INFO_KEYS:
        info[key] = td.get(key).cpu().numpy().copy()
    return obs, info


class _Flagger:
    """Logs the first out-of-support action of an env (the info flag marks every one)."""

    def __init__(self) -> None:
        self.logged = False

    def __call__(self, flags: torch.Tensor, env_name: str) -> None:
        if not self.logged and bool(flags.any()):
            self.logged = True
            logger.warning(
                "%s: an action outside the teacher's nucleus was accepted (out_of_support='allow'); "
                "info['out_of_support'] marks such steps. Sample with mask=info['action_mask'] to avoid them.",
                env_name,
            )


class TopPTokenGymEnv(gymnasium.Env):
    """One row of the top-p token MDP as a Gymnasium ``Env`` (module docstring)."""

    metadata = {"render_modes": []}

    def __init__(
        self, teacher=None, prompts=None, *, out_of_support: str = "allow", **kwargs
    ) -> None:
        self.env = _make_env(teacher, prompts, 1, out_of_support, kwargs)
        self.action_space = spaces.Discrete(self.env.vocab_size)
        self.observation_space = _single_observation_space(self.env)
        self._flag = _Flagger()

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        if seed is not None:
            self.env.set_seed(int(seed))
        td = self.env.reset()[0]
        return _to_numpy(td)

    def step(self, action):
        value = np.asarray(action)
        if value.ndim != 0 or value.dtype.kind not in "iu":
            raise ValueError(
                f"action must be one int token id, got {value.dtype} of shape {value.shape}"
            )
        td = self.env.step(
            TensorDict(
                {"action": torch.tensor([int(action)], device=self.env.device)}, batch_size=[1]
            )
        )
        nxt = td.get("next")[0]
        obs, info = _to_numpy(nxt)
        self._flag(nxt.get("out_of_support"), ENV_ID)
        return (
            obs,
            float(nxt.get("reward")),
            bool(nxt.get("terminated")),
            bool(nxt.get("truncated")),
            info,
        )


class TopPTokenVectorEnv(VectorEnv):
    """B rows of the top-p token MDP as a Gymnasium ``VectorEnv`` backed by one batched env."""

    metadata = {"render_modes": [], "autoreset_mode": AutoresetMode.DISABLED}

    def __init__(
        self,
        num_envs: int = 1,
        teacher=None,
        prompts=None,
        *,
        out_of_support: str = "allow",
        **kwargs,
    ) -> None:
        if int(num_envs) < 1:
            raise ValueError(f"num_envs must be >= 1, got num_envs={num_envs}")
        self.env = _make_env(teacher, prompts, int(num_envs), out_of_support, kwargs)
        self.num_envs = int(num_envs)
        self.single_action_space = spaces.Discrete(self.env.vocab_size)
        self.action_space = batch_space(self.single_action_space, self.num_envs)
        self.single_observation_space = _single_observation_space(self.env)
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self._last: TensorDict | None = None
        self._flag = _Flagger()

    @property
    def autoreset_mode(self) -> AutoresetMode:
        """DISABLED: the caller resets finished rows (``options={"reset_mask": ...}``)."""
        return self.metadata["autoreset_mode"]

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        if seed is not None:
            self.env.set_seed(int(seed))
        reset_mask = None if options is None else options.get("reset_mask")
        if reset_mask is None or self._last is None:
            td = self.env.reset()
        else:
            mask = torch.as_tensor(
                np.asarray(reset_mask), dtype=torch.bool, device=self.env.device
            ).reshape(self.num_envs)
            # rows not reset keep their values from the request (TorchRL merges with where)
            request = self._last.exclude("reward").clone()
            request.set("_reset", mask.unsqueeze(-1))
            td = self.env.reset(request)
        self._last = td
        return _to_numpy(td)

    def step(self, actions):
        actions = torch.as_tensor(np.asarray(actions), device=self.env.device)
        if actions.shape != (self.num_envs,) or actions.is_floating_point():
            raise ValueError(
                f"actions must be {self.num_envs} int token ids, got {actions.dtype} {tuple(actions.shape)}"
            )
        td = self.env.step(TensorDict({"action": actions.long()}, batch_size=[self.num_envs]))
        nxt = td.get("next")
        self._last = nxt
        obs, info = _to_numpy(nxt)
        self._flag(nxt.get("out_of_support"), ENV_ID)
        return (
            obs,
            nxt.get("reward").reshape(-1).cpu().numpy().astype(np.float64),
            nxt.get("terminated").reshape(-1).cpu().numpy(),
            nxt.get("truncated").reshape(-1).cpu().numpy(),
            info,
        )


def register() -> None:
    """Register ``tdkd/TopPToken-v0`` (and its vector entry point) with Gymnasium, once."""
    if ENV_ID in gymnasium.registry:
        return
    gymnasium.register(
        id=ENV_ID,
        entry_point="envs.gym_env:TopPTokenGymEnv",
        vector_entry_point="envs.gym_env:TopPTokenVectorEnv",
        disable_env_checker=False,
    )
