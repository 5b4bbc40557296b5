"""tdkd.bellman against loops and hand-computed fixtures."""

from __future__ import annotations

import math

import pytest
import torch

from tdkd.bellman import (
    chi2_phi,
    discounted_returns,
    next_state_value,
    soft_bellman_target,
    soft_value,
)
from tdkd.topp import gather_support, top_p_mask, top_p_support

NEG_INF = float("-inf")


def ref_soft_value(q: torch.Tensor, mask: torch.Tensor | None, alpha: float) -> torch.Tensor:
    """alpha * log sum_{allowed a} exp(q[a] / alpha), one row at a time, in float64 maths."""
    flat_q = q.reshape(-1, q.shape[-1]).tolist()
    flat_mask = (
        [[True] * q.shape[-1]] * len(flat_q)
        if mask is None
        else mask.reshape(-1, q.shape[-1]).tolist()
    )
    out = []
    for row, allowed in zip(flat_q, flat_mask, strict=True):
        terms = [x / alpha for x, ok in zip(row, allowed, strict=True) if ok]
        top = max(terms)
        out.append(alpha * (top + math.log(sum(math.exp(t - top) for t in terms))))
    return torch.tensor(out, dtype=torch.float64).reshape(q.shape[:-1])


def random_mask(*shape: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(*shape, generator=g) < 0.4
    first = torch.randint(0, shape[-1], shape[:-1], generator=g)
    return mask | torch.nn.functional.one_hot(first, shape[-1]).bool()  # never an empty row


# ---------------------------------------------------------------- soft_value


@pytest.mark.parametrize("alpha", [1.0, 0.3, 2.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_soft_value_dense_against_loop(alpha: float, dtype: torch.dtype) -> None:
    q = (torch.randn(3, 5, 17, generator=torch.Generator().manual_seed(1)) * 4).to(dtype)
    mask = random_mask(3, 5, 17, seed=2)
    out = soft_value(q, mask, alpha)
    assert out.shape == (3, 5) and out.dtype == dtype
    torch.testing.assert_close(out, ref_soft_value(q, mask, alpha).to(dtype))
    torch.testing.assert_close(soft_value(q, None, alpha), ref_soft_value(q, None, alpha).to(dtype))


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_soft_value_support_form_equals_dense_form(alpha: float) -> None:
    """V_p over [B, T, K] support-gathered Q equals V_p over the dense [B, T, V] Q."""
    g = torch.Generator().manual_seed(3)
    teacher_logits = torch.randn(2, 6, 40, generator=g) * 3
    q = torch.randn(2, 6, 40, generator=g) * 2
    for p in (0.3, 0.8, 1.0):
        support = top_p_support(teacher_logits, p)
        sparse = soft_value(gather_support(q, support.ids, support.mask), support.mask, alpha)
        dense = soft_value(q, top_p_mask(teacher_logits, p), alpha)
        torch.testing.assert_close(sparse, dense)
        torch.testing.assert_close(
            dense, ref_soft_value(q, top_p_mask(teacher_logits, p), alpha).float()
        )


@pytest.mark.parametrize("alpha", [1.0, 0.2, 3.0])
def test_soft_value_with_one_valid_action_is_its_q(alpha: float) -> None:
    q = torch.randn(4, 9, generator=torch.Generator().manual_seed(4)) * 5
    action = torch.tensor([0, 3, 8, 3])
    mask = torch.nn.functional.one_hot(action, 9).bool()
    torch.testing.assert_close(
        soft_value(q, mask, alpha), q.gather(-1, action[:, None]).squeeze(-1)
    )


def test_soft_value_without_mask_equals_p_one() -> None:
    g = torch.Generator().manual_seed(5)
    q = torch.randn(3, 4, 11, generator=g)
    teacher_logits = torch.randn(3, 4, 11, generator=g)
    full = top_p_mask(teacher_logits, 1.0)
    assert full.all()
    for alpha in (1.0, 0.7):
        torch.testing.assert_close(soft_value(q, None, alpha), soft_value(q, full, alpha))
        torch.testing.assert_close(
            soft_value(q, None, alpha), alpha * torch.logsumexp(q / alpha, -1)
        )


def test_soft_value_gradient_is_the_projected_policy() -> None:
    """dV_p/dQ = proj_p(softmax(Q/alpha)): zero off the support."""
    q = torch.randn(2, 7, generator=torch.Generator().manual_seed(6)).requires_grad_()
    mask = random_mask(2, 7, seed=7)
    soft_value(q, mask, 0.5).sum().backward()
    expected = torch.softmax((q.detach() / 0.5).masked_fill(~mask, NEG_INF), -1)
    torch.testing.assert_close(q.grad, expected)


# ---------------------------------------------------------------- Bellman target


def test_soft_bellman_target_two_state_fixture() -> None:
    """Two states x three actions, hand-computed.

    s0 --a--> s1 (non-terminal), s1 --a--> end (terminal). Q(s1) = [0, log 3, 5] with
    A_p(s1) = {0, 1}: V_p(s1) = log(e^0 + e^log 3) = log 4. With alpha = 1, gamma = 0.9:
    y(s0) = r0 + 0.9 log 4, and y(s1) = r1 (absorbing end).
    """
    q_s1 = torch.tensor([0.0, math.log(3.0), 5.0])
    support_s1 = torch.tensor([True, True, False])
    v_s1 = soft_value(q_s1, support_s1)
    torch.testing.assert_close(v_s1, torch.tensor(math.log(4.0)))
    r_t = torch.tensor([0.5, -1.0])
    v_tp1 = torch.stack([v_s1, torch.tensor(123.0)])  # value after the terminal step is ignored
    done_t = torch.tensor([False, True])
    y = soft_bellman_target(r_t, v_tp1, 0.9, done_t)
    torch.testing.assert_close(y, torch.tensor([0.5 + 0.9 * math.log(4.0), -1.0]))
    # alpha = 0.5: V = 0.5 log(e^0 + e^(2 log 3)) = 0.5 log 10
    torch.testing.assert_close(
        soft_value(q_s1, support_s1, 0.5), torch.tensor(0.5 * math.log(10.0))
    )


def test_soft_bellman_target_against_loop_and_padding() -> None:
    g = torch.Generator().manual_seed(8)
    r_t = torch.randn(3, 6, generator=g)
    v_tp1 = torch.randn(3, 6, generator=g)
    v_tp1[0, 2] = NEG_INF  # -inf next value at a terminal step must not leak
    done_t = torch.rand(3, 6, generator=g) < 0.3
    done_t[0, 2] = True
    for gamma in (0.0, 0.5, 0.99):
        y = soft_bellman_target(r_t, v_tp1, gamma, done_t)
        expected = torch.empty(3, 6)
        for i in range(3):
            for t in range(6):
                bootstrap = 0.0 if done_t[i, t] else gamma * v_tp1[i, t].item()
                expected[i, t] = r_t[i, t].item() + bootstrap
        torch.testing.assert_close(y, expected)
        assert torch.isfinite(y).all()
        torch.testing.assert_close(
            soft_bellman_target(r_t, v_tp1.clamp(min=0), gamma), r_t + gamma * v_tp1.clamp(min=0)
        )


# ---------------------------------------------------------------- chi^2 phi


@pytest.mark.parametrize("alpha_chi", [0.1, 0.25, 2.0])
def test_chi2_phi_against_formula(alpha_chi: float) -> None:
    x = torch.randn(50, generator=torch.Generator().manual_seed(9), dtype=torch.float64) * 3
    expected = torch.tensor([v - v * v / (4 * alpha_chi) for v in x.tolist()], dtype=torch.float64)
    torch.testing.assert_close(chi2_phi(x, alpha_chi), expected)
    # concave with its maximum alpha_chi at x = 2 alpha_chi, and phi(0) = 0
    top = torch.tensor(2 * alpha_chi, dtype=torch.float64)
    torch.testing.assert_close(
        chi2_phi(top, alpha_chi), torch.tensor(alpha_chi, dtype=torch.float64)
    )
    assert (chi2_phi(x, alpha_chi) <= alpha_chi + 1e-12).all()
    assert chi2_phi(torch.zeros(()), alpha_chi) == 0.0


# ---------------------------------------------------------------- next-state values


def ref_next_state_value(v_t: torch.Tensor, mask_t: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(v_t)
    for i in range(v_t.shape[0]):
        for t in range(v_t.shape[1] - 1):
            if mask_t[i, t] and mask_t[i, t + 1]:
                out[i, t] = v_t[i, t + 1]
    return out


def test_next_state_value_with_padding_rows() -> None:
    v_t = torch.randn(4, 6, generator=torch.Generator().manual_seed(10))
    mask_t = torch.tensor(
        [
            [True, True, True, False, False, False],  # response first, then padding
            [False, False, True, True, True, True],  # prompt, then a response to the end
            [False] * 6,  # a padding row
            [False, False, False, True, False, False],  # a one-token response
        ]
    )
    out = next_state_value(v_t, mask_t)
    torch.testing.assert_close(out, ref_next_state_value(v_t, mask_t))
    assert (out[2] == 0).all() and (out[3] == 0).all()
    assert out[1, 5] == 0  # after the final response token the value is 0
    # values at padding positions never leak in, even when they are -inf
    v_inf = v_t.masked_fill(~mask_t, NEG_INF)
    torch.testing.assert_close(next_state_value(v_inf, mask_t), out)


# ---------------------------------------------------------------- discounted returns


def ref_discounted_returns(r_t: torch.Tensor, gamma: float, mask_t: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(r_t)
    for i in range(r_t.shape[0]):
        for t in range(r_t.shape[1]):
            if mask_t[i, t]:
                out[i, t] = sum(
                    gamma ** (k - t) * r_t[i, k].item()
                    for k in range(t, r_t.shape[1])
                    if mask_t[i, k]
                )
    return out


@pytest.mark.parametrize("gamma", [0.0, 0.5, 0.95])
def test_discounted_returns_against_loop(gamma: float) -> None:
    r_t = torch.randn(3, 7, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    mask_t = torch.tensor([[True] * 7, [False, False, True, True, True, False, False], [False] * 7])
    torch.testing.assert_close(
        discounted_returns(r_t, gamma, mask_t), ref_discounted_returns(r_t, gamma, mask_t)
    )
    assert discounted_returns(torch.zeros(2, 0), gamma).shape == (2, 0)
    full = torch.ones(3, 7, dtype=torch.bool)
    torch.testing.assert_close(
        discounted_returns(r_t, gamma), ref_discounted_returns(r_t, gamma, full)
    )


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("gamma", [-0.1, 1.0, 1.5, float("nan")])
def test_gamma_outside_unit_interval_is_rejected(gamma: float) -> None:
    r = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=rf"gamma must be in \[0, 1\), got gamma={gamma}"):
        soft_bellman_target(r, r, gamma)
    with pytest.raises(ValueError, match=rf"gamma={gamma}"):
        discounted_returns(r, gamma)


@pytest.mark.parametrize("alpha", [0.0, -1.0, float("nan")])
def test_non_positive_temperature_is_rejected(alpha: float) -> None:
    with pytest.raises(ValueError, match=rf"alpha must be > 0, got alpha={alpha}"):
        soft_value(torch.zeros(2, 3), None, alpha)
    with pytest.raises(ValueError, match=rf"alpha_chi must be > 0, got alpha_chi={alpha}"):
        chi2_phi(torch.zeros(3), alpha)


def test_shape_and_mask_mismatches_are_rejected() -> None:
    q = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"q \(2, 3\), mask \(2, 4\)"):
        soft_value(q, torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask must be a bool tensor, got dtype torch.int64"):
        soft_value(q, torch.ones(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="no allowed action"):
        soft_value(q, torch.tensor([[True, False, False], [False, False, False]]))
    with pytest.raises(ValueError, match="non-empty action dim"):
        soft_value(torch.zeros(2, 0))
    with pytest.raises(ValueError, match=r"r_t \(2,\), v_tp1 \(3,\)"):
        soft_bellman_target(torch.zeros(2), torch.zeros(3), 0.9)
    with pytest.raises(ValueError, match=r"r_t \(2,\), done_t \(1,\)"):
        soft_bellman_target(torch.zeros(2), torch.zeros(2), 0.9, torch.zeros(1, dtype=torch.bool))
    with pytest.raises(ValueError, match="done_t must be a bool tensor"):
        soft_bellman_target(torch.zeros(2), torch.zeros(2), 0.9, torch.zeros(2))
    with pytest.raises(ValueError, match=r"v_t \(2, 3\), mask_t \(2, 4\)"):
        next_state_value(q, torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask_t must be a bool tensor"):
        next_state_value(q, torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"r_t \(2, 3\), mask_t \(3,\)"):
        discounted_returns(q, 0.5, torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="r_t needs a time dimension"):
        discounted_returns(torch.tensor(1.0), 0.5)
