from __future__ import annotations

import warnings

import gymnasium
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env
from torchrl.envs import GymWrapper
from torchrl.envs.utils import check_env_specs

import envs
from envs import ENV_ID, TopPTokenGymEnv, TopPTokenVectorEnv

V = 64
PROMPTS = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14]]


pytestmark = pytest.mark.usefixtures("one_thread")


KWARGS = dict(max_new_tokens=4, max_support=8)


def test_registered_on_import():
    assert ENV_ID in gymnasium.registry
    spec = gymnasium.spec(ENV_ID)
    assert spec.entry_point == "envs.gym_env:TopPTokenGymEnv"
    assert spec.vector_entry_point == "envs.gym_env:TopPTokenVectorEnv"
    envs.register()  # idempotent


def test_gymnasium_checker(teacher):
    env = gymnasium.make(ENV_ID, teacher=teacher, prompts=PROMPTS, **KWARGS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the -inf lower bound of support_log_probs is intended
        check_env(env.unwrapped)


def test_masked_sampling_stays_in_nucleus_and_seed_determinism(teacher):
    def episode(seed):
        env = TopPTokenGymEnv(teacher, PROMPTS, out_of_support="error", **KWARGS)
        env.action_space.seed(seed)
        obs, info = env.reset(seed=seed)
        trace, done = [obs["tokens"].copy()], False
        while not done:
            assert info["action_mask"].dtype == np.int8 and info["action_mask"].shape == (V,)
            action = env.action_space.sample(mask=info["action_mask"])
            obs, reward, terminated, truncated, info = env.step(action)
            assert env.observation_space.contains(obs)
            assert not info["out_of_support"]
            trace.append((obs["tokens"].copy(), reward))
            done = terminated or truncated
        return trace

    first, second = episode(7), episode(7)
    assert len(first) == len(second)
    np.testing.assert_array_equal(first[-1][0], second[-1][0])
    assert [r for _, r in first[1:]] == [r for _, r in second[1:]]


def test_out_of_support_is_flagged_not_silent(teacher, caplog):
    env = TopPTokenGymEnv(teacher, PROMPTS, **KWARGS)
    _, info = env.reset(seed=0)
    outside = int(np.argmin(info["action_mask"]))
    with caplog.at_level("WARNING"):
        _, reward, *_, info = env.step(outside)
    assert info["out_of_support"] and np.isfinite(reward)
    assert "outside the teacher's nucleus" in caplog.text
    strict = TopPTokenGymEnv(teacher, PROMPTS, out_of_support="error", **KWARGS)
    strict.reset(seed=0)
    with pytest.raises(ValueError, match="outside the teacher's top-p nucleus"):
        strict.step(outside)
    with pytest.raises(ValueError, match="one int token id"):
        strict.step(np.array([1, 2]))


def test_vector_env_equals_single_envs(teacher):
    vec = gymnasium.make_vec(ENV_ID, num_envs=3, teacher=teacher, prompts=PROMPTS, **KWARGS)
    assert isinstance(vec, TopPTokenVectorEnv)
    assert vec.metadata["autoreset_mode"] == gymnasium.vector.AutoresetMode.DISABLED
    obs, info = vec.reset(seed=2)
    assert obs["tokens"].shape == (3, 8) and info["action_mask"].shape == (3, V)
    actions = np.array([np.flatnonzero(m)[0] for m in info["action_mask"]])
    obs2, rewards, terminated, truncated, info2 = vec.step(actions)
    for b in range(3):
        prompt = obs["tokens"][b, : obs["length"][b]].tolist()
        single = TopPTokenGymEnv(teacher, [prompt], max_prompt_tokens=4, **KWARGS)
        single.reset(seed=0)
        o, r, te, tr, i = single.step(int(actions[b]))
        np.testing.assert_array_equal(o["tokens"], obs2["tokens"][b])
        np.testing.assert_array_equal(o["support_ids"], obs2["support_ids"][b])
        np.testing.assert_allclose(r, rewards[b], atol=1e-5)
        np.testing.assert_array_equal(i["action_mask"], info2["action_mask"][b])
    # a partial reset touches only the masked rows
    obs3, _ = vec.reset(options={"reset_mask": np.array([False, True, False])})
    for key in ("tokens", "length", "support_ids"):
        np.testing.assert_array_equal(obs3[key][[0, 2]], obs2[key][[0, 2]])
    assert obs3["step"].tolist() == [1, 0, 1]
    # an all-False mask resets nothing and returns the current observation
    obs4, _ = vec.reset(options={"reset_mask": np.zeros(3, dtype=bool)})
    for key in ("tokens", "length", "support_ids", "step"):
        np.testing.assert_array_equal(obs4[key], obs3[key])


def test_torchrl_gym_wrapper_round_trip(teacher):
    vec = TopPTokenVectorEnv(3, teacher, PROMPTS, **KWARGS)
    wrapped = GymWrapper(vec)
    assert wrapped.batch_size == torch.Size([3])
    check_env_specs(wrapped, seed=0)
    rollout = wrapped.rollout(10, break_when_any_done=False)
    done = rollout["next", "done"].squeeze(-1)
    assert done.any(-1).all()  # every row finished an episode and was reset in place
    after = rollout["step"][:, 1:][done[:, :-1]]
    assert (after == 0).all()


@pytest.mark.slow
def test_make_without_arguments_uses_embedded_teacher():
    env = gymnasium.make(ENV_ID, max_new_tokens=3)
    assert env.unwrapped.env.vocab_size == 49152
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check_env(env.unwrapped)
    obs, info = env.reset(seed=0)
    total = 0.0
    for _ in range(3):
        obs, reward, terminated, truncated, info = env.step(
            int(np.flatnonzero(info["action_mask"])[0])
        )
        total += reward
        if terminated or truncated:
            break
    assert np.isfinite(total) and truncated or terminated
