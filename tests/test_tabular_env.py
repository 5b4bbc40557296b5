from __future__ import annotations

import math

import pytest
import torch
from torchrl.envs import ActionMask, TransformedEnv
from torchrl.envs.utils import check_env_specs

from envs import StudentPolicy, TabularTokenEnv
from envs.tabular import MarkovTeacher, markov_teacher_logits
from tdkd.topp import top_p_mask

pytestmark = pytest.mark.usefixtures("one_thread")


def test_check_env_specs():
    check_env_specs(TabularTokenEnv(batch_size=4, seed=0), seed=0)


@pytest.mark.parametrize("reward", ["teacher_logp", "teacher_logp_projected", "zero"])
def test_tabular_mdp_matches_env_transitions(reward):
    env = TabularTokenEnv(batch_size=4, p=0.7, reward=reward, seed=1)
    P, r, mask = env.tabular_mdp()
    assert P.shape == (env.num_states, 8, env.num_states)
    torch.testing.assert_close(P.sum(-1), torch.ones(env.num_states, 8, dtype=torch.float64))
    rollout = TransformedEnv(env, ActionMask()).rollout(25, break_when_any_done=False)
    s = env.state_index(rollout.exclude("done"))
    s_next = env.state_index(rollout["next"])
    a = rollout["action"]
    assert torch.equal(P[s, a, s_next], torch.ones_like(P[s, a, s_next]))
    torch.testing.assert_close(
        r[s, a], rollout["next", "reward"].squeeze(-1).double(), atol=1e-5, rtol=1e-5
    )
    assert torch.equal(mask[s], rollout["action_mask"])
    assert (s_next == env.num_states - 1).sum() >= 4  # episodes reach the terminal state


def reference_q(env: TabularTokenEnv, gamma: float) -> dict[tuple[int, int], torch.Tensor]:
    """Backward induction over (t, last) with loops: Q_t(last, a) = r + gamma V_{t+1}(a)."""
    table = env.teacher.table.double()
    log_probs = torch.log_softmax(table, -1)
    nucleus = top_p_mask(table.float(), env.p)
    v_next = torch.zeros(env.vocab_size, dtype=torch.float64)  # V after the horizon: terminal
    q = {}
    for t in reversed(range(env.horizon)):
        v_t = torch.zeros(env.vocab_size, dtype=torch.float64)
        for last in range(env.vocab_size):
            values = []
            for a in range(env.vocab_size):
                if not nucleus[last, a]:
                    values.append(-math.inf)
                    continue
                reward = float(log_probs[last, a])
                if env.reward_mode == "teacher_logp_projected":
                    reward -= math.log(float(log_probs[last].exp()[nucleus[last]].sum()))
                elif env.reward_mode == "zero":
                    reward = 0.0
                ends = a == int(env.eos_token_ids[0]) or t + 1 == env.horizon
                values.append(reward + (0.0 if ends else gamma * float(v_next[a])))
            q[(t, last)] = torch.tensor(values, dtype=torch.float64)
            v_t[last] = torch.logsumexp(q[(t, last)], 0)
        v_next = v_t
    return q


@pytest.mark.parametrize(
    ("p", "reward", "gamma"),
    [(0.7, "teacher_logp", 0.9), (0.5, "zero", 0.99), (1.0, "teacher_logp", 0.95)],
)
def test_optimal_q_equals_backward_induction(p, reward, gamma):
    env = TabularTokenEnv(p=p, reward=reward, horizon=3, teacher_seed=2)
    q = env.optimal_q(gamma)
    reference = reference_q(env, gamma)
    for (t, last), expected in reference.items():
        torch.testing.assert_close(q[t * env.vocab_size + last], expected, atol=1e-8, rtol=1e-8)


def test_reverse_kl_optimum_is_the_projected_teacher():
    """With r = log proj_p pi_T (alpha = 1) every V_p is 0, so the optimum is proj_p pi_T."""
    for p, reward in ((1.0, "teacher_logp"), (0.6, "teacher_logp_projected")):
        env = TabularTokenEnv(p=p, reward=reward, teacher_seed=3)
        policy = env.optimal_policy(gamma=0.9)
        table = env.teacher.table
        nucleus = top_p_mask(table, p)
        projected = torch.softmax(table.masked_fill(~nucleus, float("-inf")).double(), -1)
        for t in range(env.horizon):
            rows = t * env.vocab_size + torch.arange(2, env.vocab_size)
            torch.testing.assert_close(policy[rows], projected[2:], atol=1e-8, rtol=1e-8)


def test_plain_logp_reward_tilts_away_from_projected_teacher():
    env = TabularTokenEnv(p=0.6, reward="teacher_logp", teacher_seed=3)
    policy = env.optimal_policy(gamma=0.9)
    table = env.teacher.table
    nucleus = top_p_mask(table, 0.6)
    projected = torch.softmax(table.masked_fill(~nucleus, float("-inf")).double(), -1)
    assert (policy[2:8] - projected[2:]).abs().max() > 1e-3  # future nucleus mass matters


def test_works_with_student_policy_and_markov_teacher_api():
    env = TabularTokenEnv(batch_size=2, seed=0)
    student = MarkovTeacher(markov_teacher_logits(8, seed=5))
    rollout = env.rollout(
        8, StudentPolicy(student, seed=0, kv_cache=False), break_when_any_done=False
    )
    assert rollout["action_mask"].gather(-1, rollout["action"].unsqueeze(-1)).all()
    with pytest.raises(ValueError, match="vocab_size must be >= 3"):
        markov_teacher_logits(2)
    with pytest.raises(ValueError, match="square"):
        MarkovTeacher(torch.zeros(3, 4))
