"""Top-p TD maths on the step grid: Bellman Distill, soft Q-learning, discrete SAC, implicit Q.

Every function is pure and works on support tensors aligned by ``tdkd.sequence.align_steps``:

    q_t         [B, T, K]  Q(s_t, .) gathered on the nucleus A_p(s_t) (any value at padding)
    support_t   bool [B, T, K]  True on the nucleus (all False at non-response steps)
    q_a_t       [B, T]     Q(s_t, a_t) of the action taken
    mask_t      bool [B, T]  True at response steps (a left-aligned run per row)
    r_t         [B, T]     reward of step t

Per-step outputs are [B, T] and are exactly 0 where ``mask_t`` is False, so a caller reduces
them with ``masked_mean``. Next-state values are the values of the next step of the same grid,
0 after the final response token (``tdkd.bellman.next_state_value``): the sequence is treated
as ending there, as the paper does.

Notation (PAPER.md sections 2 and 4): V_p(s) = alpha log sum_{a in A_p(s)} exp(Q(s,a)/alpha),
phi(x) = x - x^2 / (4 alpha_chi), proj_p(pi) the policy renormalised on A_p(s).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from tdkd.bellman import chi2_phi, next_state_value, soft_value

__all__ = [
    "advantage_weights",
    "bellman_distill_loss",
    "bellman_distill_nucleus_loss",
    "distance_loss",
    "expectile_loss",
    "fill_empty_rows",
    "masked_mean",
    "q_max_shift_clip",
    "sac_actor_loss",
    "sac_alpha_loss",
    "sac_state_value",
    "soft_q_target",
    "support_value",
]


def _check_step_shapes(q_t: torch.Tensor, support_t: torch.Tensor, mask_t: torch.Tensor) -> None:
    if q_t.shape != support_t.shape or q_t.shape[:-1] != mask_t.shape:
        raise ValueError(
            f"q_t and support_t must be [B, T, K] and mask_t [B, T], got q_t "
            f"{tuple(q_t.shape)}, support_t {tuple(support_t.shape)}, mask_t {tuple(mask_t.shape)}"
        )


def fill_empty_rows(support_t: torch.Tensor) -> torch.Tensor:
    """Give rows with no valid entry (non-response steps) a dummy first entry."""
    empty = ~support_t.any(-1, keepdim=True)
    first = torch.zeros_like(support_t)
    first[..., :1] = True
    return support_t.bool() | (empty & first)


def masked_mean(x_t: torch.Tensor, mask_t: torch.Tensor) -> torch.Tensor:
    """sum(x_t * mask_t) / max(1, sum(mask_t)): the mean over real steps."""
    if x_t.shape != mask_t.shape:
        raise ValueError(
            f"x_t and mask_t must match, got {tuple(x_t.shape)} and {tuple(mask_t.shape)}"
        )
    m = mask_t.to(x_t.dtype)
    return (x_t * m).sum() / m.sum().clamp(min=1.0)


def q_max_shift_clip(
    q: torch.Tensor, q_min: float | None = -10.0, *, q_max: torch.Tensor | None = None
) -> torch.Tensor:
    """Q = logits - max_a logits, clipped below at q_min (PAPER.md section 4).

    The shift is the same for every action of a state, so it leaves pi_Q and the nucleus
    unchanged; the clip bounds Q below (no gradient below q_min). ``q_min=None`` only shifts.
    The shift is stop-gradiented: it is a per-state normalisation, not a value to learn. With
    gradient through the max, the chi^2 term rewards moving the shift itself, so a student
    whose argmax lies outside the nucleus was trained to raise that token (measured on a
    layer-dropped SmolLM2 student: max logit 38-44 while the nucleus sat at the clip), and
    tokens outside A_p(s) would receive gradient, which the top-p MDP forbids.

    Args:
        q: [..., A] logits (the full vocabulary, or gathered on a support).
        q_min: lower clip (< 0) or None.
        q_max: optional [...] max over the *full* vocabulary, when ``q`` is only gathered on a
            support; default: the max over ``q``'s last dim.

    >>> q_max_shift_clip(torch.tensor([3.0, 1.0, -20.0]))
    tensor([  0.,  -2., -10.])
    """
    if q_max is None:
        q_max = q.max(dim=-1).values
    shifted = q - q_max.detach().unsqueeze(-1)
    if q_min is None:
        return shifted
    q_min = float(q_min)
    if not q_min < 0.0:
        raise ValueError(f"q_min must be < 0 (Q is shifted so that max Q = 0), got q_min={q_min}")
    return shifted.clamp(min=q_min)


def support_value(
    q_t: torch.Tensor,
    support_t: torch.Tensor,
    alpha: float = 1.0,
    *,
    backup: str = "soft",
) -> torch.Tensor:
    """V_p(s_t) over each support: soft (alpha logsumexp) or hard (max); 0 on empty rows.

    Args:
        q_t: [..., K]; support_t: bool [..., K]; backup: "soft" or "hard".

    Returns:
        [...] values.

    >>> support_value(torch.tensor([[0.0, 0.0, 9.0], [1.0, 1.0, 1.0]]),
    ...               torch.tensor([[True, True, False], [False, False, False]]))
    tensor([0.6931, 0.0000])
    """
    if q_t.shape != support_t.shape:
        raise ValueError(
            f"q_t and support_t must match, got {tuple(q_t.shape)} and {tuple(support_t.shape)}"
        )
    safe = fill_empty_rows(support_t)
    if backup == "soft":
        v = soft_value(q_t, safe, alpha)
    elif backup == "hard":
        v = q_t.masked_fill(~safe, float("-inf")).max(dim=-1).values
    else:
        raise ValueError(f"backup must be 'soft' or 'hard', got backup={backup!r}")
    return torch.where(support_t.any(-1), v, torch.zeros_like(v))


def _phi(x: torch.Tensor, alpha_chi: float | None) -> torch.Tensor:
    """phi(x): chi2_phi(x, alpha_chi), or x itself when alpha_chi is None."""
    return x if alpha_chi is None else chi2_phi(x, alpha_chi)


def _step_values(v: torch.Tensor, mask_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(v_t, v_tp1) [B, T]: v zeroed off mask_t and its next-state shift (0 after the end)."""
    v_t = torch.where(mask_t, v, torch.zeros_like(v))
    return v_t, next_state_value(v_t, mask_t)


def _bd_loss(
    expert_t: torch.Tensor,
    v_t: torch.Tensor,
    v_tp1: torch.Tensor,
    mask_t: torch.Tensor,
    gamma: float,
) -> torch.Tensor:
    """loss_t = -[expert_t - (v_t - gamma v_tp1)] on mask_t, 0 elsewhere ([B, T])."""
    j_t = expert_t - (v_t - gamma * v_tp1)
    return torch.where(mask_t, -j_t, torch.zeros_like(j_t))


def bellman_distill_loss(
    q_a_t: torch.Tensor,
    q_t: torch.Tensor,
    support_t: torch.Tensor,
    mask_t: torch.Tensor,
    *,
    gamma: float = 0.99,
    alpha_chi: float | None = 0.1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-step BD loss (PAPER.md section 4, the paper's sampled-action form), minus J:

        loss_t = -[ phi(Q(s_t,a_t) - gamma V_p(s_{t+1})) - (V_p(s_t) - gamma V_p(s_{t+1})) ]

    with V_p(s_{T_end+1}) = 0 and phi linear when ``alpha_chi`` is None (then the sum over a
    response telescopes to -sum_t log proj_p(pi_Q)(a_t|s_t)). Nothing is stop-gradiented:
    Q(s_t, .) and V_p(s_{t+1}) come from the same network (no target network).

    Args:
        q_a_t: [B, T] Q of the taken action (must lie in the support where mask_t).
        q_t, support_t: [B, T, K] Q on the nucleus and its mask; mask_t: bool [B, T].

    Returns:
        (loss_t [B, T], v_t [B, T]) both 0 off mask_t.
    """
    _check_step_shapes(q_t, support_t, mask_t)
    v_t, v_tp1 = _step_values(support_value(q_t, support_t), mask_t)
    expert_t = _phi(q_a_t - gamma * v_tp1, alpha_chi)
    return _bd_loss(expert_t, v_t, v_tp1, mask_t, gamma), v_t


def bellman_distill_nucleus_loss(
    q_t: torch.Tensor,
    support_t: torch.Tensor,
    mask_t: torch.Tensor,
    *,
    vocab_size: int,
    gamma: float = 0.99,
    alpha_chi: float | None = 0.1,
    epsilon: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-step BD loss in the released script's form (PAPER.md section 4, (a)-(c)).

    Q0(s,a) = Q(s,a) on A_p(s) and 0 elsewhere (0-masking); the projected policy is smoothed,
    pi_eps(a|s) = (proj_p(pi_Q)(a|s) + eps) / (1 + eps |V|) for every token of the vocabulary;

        V(s)     = sum_{a in V} pi_eps(a|s) (Q0(s,a) - log pi_eps(a|s))
        expert_t = (1/|V|) sum_{a in V} phi(Q0(s_t,a) - gamma V(s_{t+1}))
        loss_t   = -[ expert_t - (V(s_t) - gamma V(s_{t+1})) ]

    The |V| - |A_p| tokens outside the nucleus all share Q0 = 0 and pi_eps = eps/(1+eps|V|), so
    everything is computed on the support in O(K). Our reading of the description: the script
    itself is incomplete (PAPER.md). Nothing is stop-gradiented.

    Returns:
        (loss_t [B, T], v_t [B, T]) both 0 off mask_t.
    """
    _check_step_shapes(q_t, support_t, mask_t)
    if epsilon < 0.0:
        raise ValueError(f"epsilon must be >= 0, got epsilon={epsilon}")
    support_t = support_t.bool()
    safe = fill_empty_rows(support_t)
    n_in = support_t.sum(-1).to(q_t.dtype)
    n_out = float(vocab_size) - n_in
    if bool((n_out < 0).any()):
        raise ValueError(f"a support is larger than vocab_size={vocab_size}")
    norm = 1.0 + epsilon * vocab_size
    log_proj = torch.log_softmax(q_t.masked_fill(~safe, float("-inf")), dim=-1)
    pi_in = (log_proj.exp().masked_fill(~safe, 0.0) + epsilon) / norm
    q_in = q_t.masked_fill(~safe, 0.0)
    log_pi_in = pi_in.masked_fill(~support_t, 1.0).log()
    v_in = (pi_in * (q_in - log_pi_in)).masked_fill(~support_t, 0.0).sum(-1)
    v_out = 0.0
    if epsilon > 0.0:
        pi_out = epsilon / norm
        v_out = n_out * pi_out * (-math.log(pi_out))
    v_t, v_tp1 = _step_values(v_in + v_out, mask_t)
    x_in = q_in - gamma * v_tp1.unsqueeze(-1)
    expert_in = _phi(x_in, alpha_chi).masked_fill(~support_t, 0.0).sum(-1)
    expert_out = n_out * _phi(-gamma * v_tp1, alpha_chi)
    expert_t = (expert_in + expert_out) / float(vocab_size)
    return _bd_loss(expert_t, v_t, v_tp1, mask_t, gamma), v_t


def soft_q_target(
    r_t: torch.Tensor,
    q_t: torch.Tensor,
    support_t: torch.Tensor,
    mask_t: torch.Tensor,
    *,
    gamma: float = 0.99,
    alpha: float = 1.0,
    backup: str = "soft",
) -> torch.Tensor:
    """Top-p soft-Q target y_t = r_t + gamma V_p(s_{t+1}), V_p from (target-network) q_t.

    V_p(s) = alpha log sum_{a in A_p(s)} exp(Q(s,a)/alpha) for backup="soft" and
    max_{a in A_p(s)} Q(s,a) for backup="hard" (the DQN backup; the alpha -> 0 limit);
    V = 0 after the final response token. The caller stop-gradients q_t (a target network).

    Returns:
        y_t [B, T], 0 off mask_t.
    """
    _check_step_shapes(q_t, support_t, mask_t)
    if r_t.shape != mask_t.shape:
        raise ValueError(f"r_t must be [B, T] = {tuple(mask_t.shape)}, got {tuple(r_t.shape)}")
    v_t = support_value(q_t, support_t, alpha, backup=backup)
    v_tp1 = next_state_value(torch.where(mask_t, v_t, torch.zeros_like(v_t)), mask_t)
    y_t = r_t + gamma * v_tp1
    return torch.where(mask_t, y_t, torch.zeros_like(y_t))


def distance_loss(x: torch.Tensor, y: torch.Tensor, kind: str = "l2") -> torch.Tensor:
    """Elementwise regression loss, TorchRL's conventions: l2 = (x-y)^2, l1, smooth_l1 (Huber 1)."""
    if kind == "l2":
        return (x - y).pow(2)
    if kind == "l1":
        return (x - y).abs()
    if kind == "smooth_l1":
        return F.smooth_l1_loss(x, y, reduction="none")
    raise ValueError(f"loss_function must be 'l2', 'l1' or 'smooth_l1', got {kind!r}")


def _policy_terms(
    log_pi_t: torch.Tensor, support_t: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(pi, log pi) with both set to 0 off the support (so 0 * -inf never appears)."""
    support_t = support_t.bool()
    safe_log = log_pi_t.masked_fill(~support_t, 0.0)
    return safe_log.exp().masked_fill(~support_t, 0.0), safe_log


def sac_state_value(
    log_pi_t: torch.Tensor, q_t: torch.Tensor, support_t: torch.Tensor, alpha: float | torch.Tensor
) -> torch.Tensor:
    """Soft state value under the projected actor: V(s) = sum_{a in A_p} pi(a|s) (Q(s,a) - alpha log pi(a|s)).

    Args:
        log_pi_t: [..., K] log proj_p(pi)(.|s) (-inf or anything off the support);
        q_t: [..., K] critic values; support_t: bool [..., K].
    """
    pi, log_pi = _policy_terms(log_pi_t, support_t)
    return (pi * (q_t.masked_fill(~support_t.bool(), 0.0) - alpha * log_pi)).sum(-1)


def sac_actor_loss(
    log_pi_t: torch.Tensor, q_t: torch.Tensor, support_t: torch.Tensor, alpha: float | torch.Tensor
) -> torch.Tensor:
    """Discrete SAC actor loss sum_{a in A_p} pi(a|s) (alpha log pi(a|s) - Q(s,a)) = -V(s)."""
    return -sac_state_value(log_pi_t, q_t, support_t, alpha)


def sac_alpha_loss(
    log_alpha: torch.Tensor, neg_entropy: torch.Tensor, target_entropy: torch.Tensor | float
) -> torch.Tensor:
    """Temperature loss -log(alpha) * (sum_a pi log pi + H_target) (neg_entropy detached)."""
    return -log_alpha * (neg_entropy.detach() + target_entropy)


def expectile_loss(diff: torch.Tensor, expectile: float) -> torch.Tensor:
    """|tau - 1(diff < 0)| diff^2 with diff = Q - V (IQL's value loss, TorchRL's convention).

    >>> expectile_loss(torch.tensor([1.0, -1.0]), 0.7)
    tensor([0.7000, 0.3000])
    """
    if not 0.0 < expectile < 1.0:
        raise ValueError(f"expectile must be in (0, 1), got expectile={expectile}")
    weight = torch.where(diff > 0, expectile, 1.0 - expectile)
    return weight * diff.pow(2)


def advantage_weights(
    q_a_t: torch.Tensor, v_t: torch.Tensor, temperature: float, max_weight: float = 100.0
) -> torch.Tensor:
    """Advantage-weighted regression weights exp(temperature * (Q - V)), clipped at max_weight."""
    return torch.exp((q_a_t - v_t) * temperature).clamp_max(max_weight)
