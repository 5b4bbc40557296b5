"""tdkd.td: every formula against a loop over states / a dense reference."""

from __future__ import annotations

import math

import pytest
import torch

from tdkd.td import (
    advantage_weights,
    bellman_distill_loss,
    bellman_distill_nucleus_loss,
    distance_loss,
    expectile_loss,
    masked_mean,
    q_max_shift_clip,
    sac_actor_loss,
    sac_state_value,
    soft_q_target,
    support_value,
)


def _random_steps(seed: int = 0, b: int = 3, t: int = 5, k: int = 4):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, t, k, generator=gen, dtype=torch.float64)
    sizes = torch.randint(1, k + 1, (b, t), generator=gen)
    support = torch.arange(k) < sizes.unsqueeze(-1)
    lengths = torch.tensor([t, 2, 1])[:b]
    mask = torch.arange(t) < lengths.unsqueeze(-1)
    if b > 2:
        mask[2] = False
        mask[2, 1:3] = True  # a response that starts later
    support &= mask.unsqueeze(-1)
    return q, support, mask


def _v(q_row, sup_row, alpha=1.0, hard=False):
    vals = [q_row[j] for j in range(len(sup_row)) if sup_row[j]]
    if not vals:
        return torch.tensor(0.0, dtype=q_row.dtype)
    if hard:
        return max(vals)
    return alpha * torch.logsumexp(torch.stack(vals) / alpha, 0)


def _v_next(vs, mask, i, t):
    return (
        vs[i][t + 1]
        if t + 1 < mask.shape[1] and mask[i, t + 1]
        else torch.tensor(0.0, dtype=torch.float64)
    )


def test_q_max_shift_clip():
    x = torch.randn(4, 7) * 5
    out = q_max_shift_clip(x, -3.0)
    for i in range(4):
        for j in range(7):
            assert out[i, j] == max(x[i, j] - x[i].max(), -3.0)
    sub = x[:, :3]
    torch.testing.assert_close(q_max_shift_clip(sub, -3.0, q_max=x.max(-1).values), out[:, :3])
    with pytest.raises(ValueError, match="q_min"):
        q_max_shift_clip(x, 1.0)
    # The shift is a stop-gradient: d out / d x is 1 on unclipped entries, 0 elsewhere.
    x.requires_grad_(True)
    q_max_shift_clip(x, -3.0).sum().backward()
    torch.testing.assert_close(x.grad, (x - x.max(-1, keepdim=True).values >= -3.0).float())


@pytest.mark.parametrize("alpha", [1.0, 0.3])
@pytest.mark.parametrize("backup", ["soft", "hard"])
def test_support_value(alpha, backup):
    q, sup, _ = _random_steps()
    out = support_value(q, sup, alpha, backup=backup)
    for i in range(q.shape[0]):
        for t in range(q.shape[1]):
            expected = _v(q[i, t], sup[i, t], alpha, hard=backup == "hard")
            torch.testing.assert_close(out[i, t], expected)


def test_support_value_single_action_is_its_q():
    q = torch.tensor([[1.5, 9.0, -2.0]])
    sup = torch.tensor([[False, True, False]])
    assert support_value(q, sup).item() == 9.0


@pytest.mark.parametrize("alpha_chi", [0.1, 0.5, None])
@pytest.mark.parametrize("gamma", [0.0, 0.9])
def test_bellman_distill_loss_matches_loop(alpha_chi, gamma):
    q, sup, mask = _random_steps(1)
    q_a = q[..., 0]  # the first (top) entry is always in a non-empty support
    loss, v = bellman_distill_loss(q_a, q, sup, mask, gamma=gamma, alpha_chi=alpha_chi)
    vs = [[_v(q[i, t], sup[i, t]) for t in range(q.shape[1])] for i in range(q.shape[0])]
    for i in range(q.shape[0]):
        for t in range(q.shape[1]):
            if not mask[i, t]:
                assert loss[i, t] == 0 and v[i, t] == 0
                continue
            v_next = _v_next(vs, mask, i, t)
            x = q_a[i, t] - gamma * v_next
            phi = x if alpha_chi is None else x - x**2 / (4 * alpha_chi)
            torch.testing.assert_close(loss[i, t], -(phi - (vs[i][t] - gamma * v_next)))


@pytest.mark.parametrize("epsilon", [0.0, 1e-3])
def test_bellman_distill_nucleus_loss_matches_dense_vocabulary(epsilon):
    vocab, gamma, alpha_chi = 6, 0.8, 0.2
    q, sup, mask = _random_steps(2, k=4)
    ids = torch.tensor([5, 0, 3, 1])  # support entry j is token ids[j]
    loss, v = bellman_distill_nucleus_loss(
        q, sup, mask, vocab_size=vocab, gamma=gamma, alpha_chi=alpha_chi, epsilon=epsilon
    )

    def dense_v(i, t):
        q0 = torch.zeros(vocab, dtype=torch.float64)
        allowed = torch.zeros(vocab, dtype=torch.bool)
        for j in range(4):
            if sup[i, t, j]:
                q0[ids[j]] = q[i, t, j]
                allowed[ids[j]] = True
        proj = torch.softmax(q0.masked_fill(~allowed, float("-inf")), 0)
        pi = (proj + epsilon) / (1 + epsilon * vocab)
        terms = torch.where(pi > 0, pi * (q0 - pi.clamp(min=1e-300).log()), torch.zeros_like(pi))
        return q0, terms.sum()

    for i in range(q.shape[0]):
        for t in range(q.shape[1]):
            if not mask[i, t]:
                assert loss[i, t] == 0
                continue
            q0, v_t = dense_v(i, t)
            v_next = dense_v(i, t + 1)[1] if t + 1 < q.shape[1] and mask[i, t + 1] else 0.0
            x = q0 - gamma * v_next
            expert = (x - x**2 / (4 * alpha_chi)).mean()
            torch.testing.assert_close(v[i, t], v_t)
            torch.testing.assert_close(loss[i, t], -(expert - (v_t - gamma * v_next)))


@pytest.mark.parametrize("backup", ["soft", "hard"])
def test_soft_q_target_matches_loop(backup):
    q, sup, mask = _random_steps(3)
    r = torch.randn(mask.shape, dtype=torch.float64)
    y = soft_q_target(r, q, sup, mask, gamma=0.7, alpha=0.5, backup=backup)
    vs = [
        [_v(q[i, t], sup[i, t], 0.5, backup == "hard") for t in range(q.shape[1])]
        for i in range(q.shape[0])
    ]
    for i in range(q.shape[0]):
        for t in range(q.shape[1]):
            expected = r[i, t] + 0.7 * _v_next(vs, mask, i, t) if mask[i, t] else 0.0
            torch.testing.assert_close(y[i, t], torch.as_tensor(expected, dtype=torch.float64))


def test_sac_state_value_and_actor_loss():
    q, sup, mask = _random_steps(4)
    logits = torch.randn(q.shape, dtype=torch.float64)
    safe = sup | ~sup.any(-1, keepdim=True)
    log_pi = torch.log_softmax(logits.masked_fill(~safe, float("-inf")), -1)
    v = sac_state_value(log_pi, q, sup, 0.3)
    for i in range(q.shape[0]):
        for t in range(q.shape[1]):
            expected = sum(
                log_pi[i, t, j].exp() * (q[i, t, j] - 0.3 * log_pi[i, t, j])
                for j in range(q.shape[2])
                if sup[i, t, j]
            )
            torch.testing.assert_close(v[i, t], torch.as_tensor(expected, dtype=torch.float64))
    torch.testing.assert_close(sac_actor_loss(log_pi, q, sup, 0.3), -v)
    # with p = 1 this is TorchRL's expectation over all actions
    full = torch.ones_like(sup)
    lp = torch.log_softmax(logits, -1)
    torch.testing.assert_close(
        sac_state_value(lp, q, full, 0.3), (lp.exp() * (q - 0.3 * lp)).sum(-1)
    )


def test_expectile_and_awr():
    diff = torch.randn(50)
    out = expectile_loss(diff, 0.8)
    for d, o in zip(diff, out, strict=True):
        torch.testing.assert_close(o, (0.8 if d > 0 else 0.2) * d**2)
    q, v = torch.randn(10), torch.randn(10)
    w = advantage_weights(q, v, 2.0, max_weight=3.0)
    torch.testing.assert_close(w, torch.minimum(torch.exp(2.0 * (q - v)), torch.tensor(3.0)))


@pytest.mark.parametrize("kind", ["l2", "l1", "smooth_l1"])
def test_distance_loss_matches_torchrl(kind):
    from torchrl.objectives.utils import distance_loss as rl_distance

    x, y = torch.randn(20) * 3, torch.randn(20)
    torch.testing.assert_close(distance_loss(x, y, kind), rl_distance(x, y, kind))


def test_masked_mean():
    x = torch.tensor([[1.0, 2.0, 100.0]])
    m = torch.tensor([[True, True, False]])
    assert masked_mean(x, m).item() == 1.5
    assert masked_mean(x, torch.zeros_like(m)).item() == 0.0
    assert math.isfinite(masked_mean(x, m).item())
