"""Top-p soft values, soft Bellman targets, the chi^2 phi and discounting helpers.

Notation (PAPER.md sections 2 and 4), suffixes after rlax: ``q_t`` Q(s_t, .), ``v_tp1``
V(s_{t+1}), ``r_t`` reward, ``discount_t`` gamma (times 1 - done), alpha the entropy
temperature.

    V_p(s)         = alpha * log sum_{a in A_p(s)} exp(Q(s,a) / alpha)
    target(s, a)   = r(s,a) + gamma * (1 - done) * V_p(s')
    phi(x)         = x - x^2 / (4 alpha_chi)                      (chi^2 regulariser)

Every function takes either dense tensors ([..., V] with a [..., V] mask) or support tensors
([..., T, K] gathered on the nucleus with its [..., T, K] validity mask): a value over a
support is the same log-sum-exp, only over fewer entries.
"""

from __future__ import annotations

import torch

__all__ = [
    "chi2_phi",
    "discounted_returns",
    "next_state_value",
    "soft_bellman_target",
    "soft_value",
]


def _check_alpha(alpha: float, name: str = "alpha") -> float:
    alpha = float(alpha)
    if not alpha > 0.0:
        raise ValueError(f"{name} must be > 0, got {name}={alpha}")
    return alpha


def _check_gamma(gamma: float) -> float:
    gamma = float(gamma)
    if not 0.0 <= gamma < 1.0:
        raise ValueError(f"gamma must be in [0, 1), got gamma={gamma}")
    return gamma


def _check_same_shape(**tensors: torch.Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        described = ", ".join(f"{name} {shape}" for name, shape in shapes.items())
        raise ValueError(f"shapes must match, got {described}")


def _check_bool(**tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        if t.dtype != torch.bool:
            raise ValueError(f"{name} must be a bool tensor, got dtype {t.dtype}")


def soft_value(
    q: torch.Tensor, mask: torch.Tensor | None = None, alpha: float = 1.0
) -> torch.Tensor:
    """Top-p soft value V_p(s) = alpha * log sum_{a in A_p(s)} exp(Q(s,a)/alpha).

    Args:
        q: [..., A] Q-values (dense over the vocabulary, or gathered on a support).
        mask: bool [..., A], True where the action is in A_p(s); None = all actions.
        alpha: entropy temperature > 0.

    Returns:
        [...] values. With one allowed action V equals its Q; with no mask (p = 1) this is the
        unrestricted soft value.

    >>> soft_value(torch.tensor([0.0, 0.0, 9.0]), torch.tensor([True, True, False]))
    tensor(0.6931)
    """
    alpha = _check_alpha(alpha)
    if not q.is_floating_point() or q.dim() == 0 or q.shape[-1] == 0:
        raise ValueError(
            f"q must be a float tensor with a non-empty action dim, got {q.dtype} {tuple(q.shape)}"
        )
    if mask is not None:
        _check_same_shape(q=q, mask=mask)
        _check_bool(mask=mask)
        if not mask.any(dim=-1).all():
            raise ValueError("mask has a row with no allowed action; every state needs one")
        q = q.masked_fill(~mask, float("-inf"))
    return alpha * torch.logsumexp(q / alpha, dim=-1)


def soft_bellman_target(
    r_t: torch.Tensor, v_tp1: torch.Tensor, gamma: float, done_t: torch.Tensor | None = None
) -> torch.Tensor:
    """Soft Bellman target y_t = r_t + gamma * (1 - done_t) * V_p(s_{t+1}).

    Args:
        r_t: [...] rewards; v_tp1: [...] next-state values V_p(s_{t+1}); gamma in [0, 1);
        done_t: bool [...] (terminal: the next state is absorbing with value 0), None = never.

    Returns:
        [...] targets y_t.

    >>> soft_bellman_target(torch.tensor([1.0, 1.0]), torch.tensor([2.0, 2.0]), 0.5,
    ...                     torch.tensor([False, True]))
    tensor([2., 1.])
    """
    gamma = _check_gamma(gamma)
    _check_same_shape(r_t=r_t, v_tp1=v_tp1)
    if done_t is None:
        return r_t + gamma * v_tp1
    _check_same_shape(r_t=r_t, done_t=done_t)
    _check_bool(done_t=done_t)
    # where(), not a product: a terminal target stays finite even if v_tp1 is -inf there.
    return r_t + gamma * torch.where(done_t, torch.zeros_like(v_tp1), v_tp1)


def chi2_phi(x: torch.Tensor, alpha_chi: float = 0.1) -> torch.Tensor:
    """The chi^2 concave function of IQ-Learn: phi(x) = x - x^2 / (4 alpha_chi).

    >>> chi2_phi(torch.tensor([0.0, 1.0, 2.0]), alpha_chi=0.25)
    tensor([ 0.,  0., -2.])
    """
    alpha_chi = _check_alpha(alpha_chi, "alpha_chi")
    return x - x.pow(2) / (4.0 * alpha_chi)


def next_state_value(v_t: torch.Tensor, mask_t: torch.Tensor) -> torch.Tensor:
    """V(s_{t+1}) from the per-position values V(s_t) of one forward pass.

    The student's forward over a response gives V at every state s_t (the state before
    response token t). The next state of token t is s_{t+1}, i.e. the value one position to
    the right; after the final response token (the next position is padding or past the end)
    the episode has ended and the value is 0 (PAPER.md section 4).

    Args:
        v_t: [..., T] values of the states before each response token.
        mask_t: bool [..., T], True at real response tokens (one contiguous run per row, e.g.
            after the prompt; rows with no True are padding rows).

    Returns:
        [..., T] next-state values: v_t[..., t+1] where positions t and t+1 are both response
        tokens, else 0 (after the final response token, and at every non-response position).

    >>> next_state_value(torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[True, True, False]]))
    tensor([[2., 0., 0.]])
    """
    _check_same_shape(v_t=v_t, mask_t=mask_t)
    _check_bool(mask_t=mask_t)
    if v_t.dim() < 1:
        raise ValueError(f"v_t needs a time dimension, got shape {tuple(v_t.shape)}")
    shifted_v = torch.zeros_like(v_t)
    shifted_mask = torch.zeros_like(mask_t)
    shifted_v[..., :-1] = v_t[..., 1:]
    shifted_mask[..., :-1] = mask_t[..., 1:]
    return torch.where(shifted_mask & mask_t, shifted_v, torch.zeros_like(v_t))


def discounted_returns(
    r_t: torch.Tensor, gamma: float, mask_t: torch.Tensor | None = None
) -> torch.Tensor:
    """G_t = sum_{k>=0} gamma^k r_{t+k}, over the real steps of each row.

    Args:
        r_t: [..., T] rewards; gamma in [0, 1); mask_t: bool [..., T], True at real steps (one
            contiguous run per row); padding contributes no reward and gets G = 0.

    Returns:
        [..., T] returns.

    >>> discounted_returns(torch.tensor([1.0, 1.0, 1.0]), 0.5)
    tensor([1.7500, 1.5000, 1.0000])
    """
    gamma = _check_gamma(gamma)
    if r_t.dim() == 0:
        raise ValueError(f"r_t needs a time dimension, got shape {tuple(r_t.shape)}")
    if mask_t is not None:
        _check_same_shape(r_t=r_t, mask_t=mask_t)
        _check_bool(mask_t=mask_t)
        r_t = torch.where(mask_t, r_t, torch.zeros_like(r_t))
    returns = torch.zeros_like(r_t)
    running = r_t.new_zeros(r_t.shape[:-1])
    for t in range(r_t.shape[-1] - 1, -1, -1):
        running = r_t[..., t] + gamma * running
        returns[..., t] = running
    if mask_t is not None:
        returns = torch.where(mask_t, returns, torch.zeros_like(returns))
    return returns
