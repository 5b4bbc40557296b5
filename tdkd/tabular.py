"""Exact solvers for finite soft MDPs with state-dependent action sets, and the paper's
propositions as measurements (PAPER.md section 3). The oracle the rest of tdkd is tested against.

Notation. S states, A actions, float64 throughout:

    P     [..., S, A, S]  P(s'|s,a), a distribution over s' for every (s, a)
    r     [..., S, A]     reward r(s,a)
    mask  bool [..., S, A] True where a is admissible at s (A_p(s) in the top-p MDP M_p);
                           None = every action (the full MDP). Every state needs one.
    gamma float or [...]  discount in [0, 1) (a tensor gives one gamma per MDP of a batch)
    alpha float           entropy temperature > 0

Leading ``...`` dims are a batch of MDPs of one size (``stack_mdps`` pads MDPs of different
sizes into one batch without changing any of their values).

Top-p soft value and Bellman operators (PAPER.md section 2):

    V_p(s)              = alpha * log sum_{a in A_p(s)} exp(Q(s,a) / alpha)
    (T_p Q)(s,a)        = r(s,a) + gamma * sum_s' P(s'|s,a) V_p(s')                 (optimality)
    (B^pi_p Q)(s,a)     = r(s,a) + gamma * sum_s' P(s'|s,a)
                            sum_{a' in A_p(s')} pi_p(a'|s') [Q(s',a') - alpha log pi_p(a'|s')]
    pi_p                = proj_p(pi): pi renormalised on A_p(s)                      (evaluation)
    ||Q||_{inf,p}       = max_s max_{a in A_p(s)} |Q(s,a)|
    kappa(p)            = -alpha * gamma / (1 - gamma) * log p

Q*_p = fixed point of T_p; Q^pi_p = fixed point of B^pi_p; Q* = Q*_p at p = 1 (mask None).
Q-values of masked-out pairs are returned as -inf: they are not actions of M_p.

Propositions, with pi* = softmax(Q*/alpha) the teacher and A_p(s) its nucleus at p:
    1. B^pi_p (and T_p) are gamma-contractions in ||.||_{inf,p}      -> ``contraction_factor``
    2. ||Q* - Q^{proj_p pi*}_p||_{inf,p} <= kappa(p)                   -> ``projected_teacher_gap``
    3. Q^{proj_p pi*}_p <= Q*_p <= Q* on supported pairs               -> ``sandwich_violation``
    4. ||Q* - Q*_p||_{inf,p} <= kappa(p)                               -> ``suboptimality_gap``

Why 2 holds (and is tight): on A_p(s), Q* - alpha log pi* = V*, so with m(s) = pi*(A_p(s)|s) >= p,
D = Q* - Q^{proj_p pi*}_p solves D = gamma P^{pi_p} D + gamma P(-alpha log m), hence
0 <= D <= gamma/(1-gamma) * alpha * (-log p), with equality when m = p everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from tdkd.bellman import soft_value
from tdkd.topp import check_p, proj_p_log_probs, top_p_mask

__all__ = [
    "TopPSolution",
    "contraction_factor",
    "evaluation_operator",
    "kappa",
    "optimality_operator",
    "projected_teacher_gap",
    "random_soft_mdp",
    "sandwich_violation",
    "soft_policy_evaluation",
    "soft_value_iteration",
    "solve_top_p",
    "stack_mdps",
    "suboptimality_gap",
    "teacher_nucleus",
    "topp_sup_norm",
]

_DTYPE = torch.float64
_PROB_ATOL = 1e-6  # how far a row of P or of a policy may sum from 1


# ----------------------------------------------------------------------------- input checks


def _check_alpha(alpha: float) -> float:
    alpha = float(alpha)
    if not alpha > 0.0 or math.isinf(alpha):
        raise ValueError(f"alpha must be a finite number > 0, got alpha={alpha}")
    return alpha


def _check_gamma(gamma: float | torch.Tensor, batch_shape: torch.Size) -> torch.Tensor:
    """gamma as a float64 tensor broadcastable to ``batch_shape``; each value in [0, 1)."""
    g = torch.as_tensor(gamma, dtype=_DTYPE)
    bad = torch.isnan(g) | (g < 0.0) | (g >= 1.0)
    if bad.any():
        raise ValueError(f"gamma must be in [0, 1), got gamma={g[bad].flatten()[0].item()}")
    if _broadcast_shape(g.shape, batch_shape) != tuple(batch_shape):
        raise ValueError(
            f"gamma must be a float or a tensor of the MDP batch shape {tuple(batch_shape)}, "
            f"got shape {tuple(g.shape)}"
        )
    return g


def _broadcast_shape(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...] | None:
    """The broadcast of two shapes, None if they do not broadcast (torch.broadcast_shapes
    imports sympy on first use, a second of start-up)."""
    n = max(len(a), len(b))
    a, b = (1,) * (n - len(a)) + tuple(a), (1,) * (n - len(b)) + tuple(b)
    if any(x != y and 1 not in (x, y) for x, y in zip(a, b, strict=True)):
        return None
    return tuple(max(x, y) if 1 in (x, y) else x for x, y in zip(a, b, strict=True))


def _check_p_values(p: float | torch.Tensor) -> float | torch.Tensor:
    if isinstance(p, torch.Tensor) and p.dim() > 0:
        bad = torch.isnan(p) | (p <= 0.0) | (p > 1.0)
        if bad.any():
            raise ValueError(f"p must be in (0, 1], got p={p[bad].flatten()[0].item()}")
        return p.to(_DTYPE)
    return check_p(float(p))


def _check_mdp(
    P: torch.Tensor, r: torch.Tensor, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validate (P, r, mask) and return them as float64 / bool tensors (mask filled in)."""
    for name, t in (("P", P), ("r", r)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise ValueError(
                f"{name} must be a floating-point torch.Tensor, got {type(t).__name__}"
            )
    if P.dim() < 3 or P.shape[-1] != P.shape[-3] or P.shape[-1] == 0 or P.shape[-2] == 0:
        raise ValueError(f"P must have shape [..., S, A, S] with S, A >= 1, got P {tuple(P.shape)}")
    if r.shape != P.shape[:-1]:
        raise ValueError(
            f"r must have shape [..., S, A] = {tuple(P.shape[:-1])} to match P "
            f"{tuple(P.shape)}, got r {tuple(r.shape)}"
        )
    P, r = P.to(_DTYPE), r.to(_DTYPE)
    if not torch.isfinite(r).all():
        raise ValueError("r must be finite (mask out impossible actions with `mask` instead)")
    if not torch.isfinite(P).all() or (P < 0).any():
        raise ValueError("P must contain finite, non-negative transition probabilities")
    row_sums = P.sum(-1)
    worst = (row_sums - 1.0).abs().max()
    if worst > _PROB_ATOL:
        bad = row_sums.flatten()[(row_sums - 1.0).abs().flatten().argmax()].item()
        raise ValueError(
            f"P must be a distribution over s' for every (s, a): a row of P sums to {bad:.6g}, "
            "not 1; normalise P along its last dim"
        )
    if mask is None:
        mask = torch.ones(r.shape, dtype=torch.bool, device=r.device)
    else:
        if not isinstance(mask, torch.Tensor) or mask.shape != r.shape:
            got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"mask must be a bool tensor of shape {tuple(r.shape)}, got {got}")
        mask = mask.bool()
        empty = ~mask.any(-1)
        if empty.any():
            where = tuple(torch.nonzero(empty)[0].tolist())
            raise ValueError(
                f"mask has a state with no allowed action (at index {where}); every state of "
                "a (top-p) MDP needs at least one action"
            )
    return P, r, mask


def _check_q(q: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    if not isinstance(q, torch.Tensor) or q.shape[-2:] != shape[-2:]:
        got = tuple(q.shape) if isinstance(q, torch.Tensor) else type(q).__name__
        raise ValueError(
            f"q must have shape [..., S, A] = [..., {shape[-2]}, {shape[-1]}], got {got}"
        )
    return q.to(_DTYPE)


def _log_projected_policy(policy: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log proj_p(policy) [..., S, A]: the policy renormalised on the mask, -inf elsewhere."""
    if not isinstance(policy, torch.Tensor) or policy.shape != mask.shape:
        got = tuple(policy.shape) if isinstance(policy, torch.Tensor) else type(policy).__name__
        raise ValueError(f"policy must have shape [..., S, A] = {tuple(mask.shape)}, got {got}")
    policy = policy.to(_DTYPE)
    if not torch.isfinite(policy).all() or (policy < 0).any():
        raise ValueError("policy must contain finite, non-negative probabilities")
    worst = (policy.sum(-1) - 1.0).abs().max()
    if worst > _PROB_ATOL:
        raise ValueError(
            f"policy must be a distribution over actions at every state: a row sums "
            f"{worst.item():.3g} away from 1; normalise it along its last dim"
        )
    if not ((policy > 0) & mask).any(-1).all():
        raise ValueError(
            "policy puts no mass on the allowed actions of some state, so proj_p(policy) is "
            "undefined there; give every allowed set some probability"
        )
    return proj_p_log_probs(torch.log(policy), mask)


# ----------------------------------------------------------------------------- core maths


def kappa(p: float | torch.Tensor, gamma: float | torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """The suboptimality bound kappa(p) = -alpha * gamma / (1 - gamma) * log p.

    Args:
        p: nucleus mass in (0, 1] (float or tensor); gamma: discount in [0, 1) (same);
        alpha: entropy temperature.

    Returns:
        float64 tensor of the broadcast shape of p and gamma (0 at p = 1 or gamma = 0).

    >>> kappa(0.5, 0.5)
    tensor(0.6931, dtype=torch.float64)
    """
    alpha = _check_alpha(alpha)
    p_t = torch.as_tensor(_check_p_values(p), dtype=_DTYPE)
    shape = _broadcast_shape(torch.as_tensor(gamma).shape, p_t.shape)
    if shape is None:
        raise ValueError(
            f"p and gamma must broadcast, got shapes {tuple(p_t.shape)} and "
            f"{tuple(torch.as_tensor(gamma).shape)}"
        )
    g = _check_gamma(gamma, torch.Size(shape))
    return -alpha * g / (1.0 - g) * torch.log(p_t)


def topp_sup_norm(q: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """||Q||_{inf,p} = max_s max_{a in A_p(s)} |Q(s,a)|.

    Args:
        q: [..., S, A] (entries outside the mask are ignored, -inf included);
        mask: bool [..., S, A] (broadcast to q).

    Returns:
        [...] norms.

    >>> topp_sup_norm(torch.tensor([[1.0, -9.0], [-2.0, float("-inf")]]),
    ...               torch.tensor([[True, False], [True, False]]))
    tensor(2.)
    """
    mask = mask.expand(q.shape)
    return torch.where(mask, q, torch.zeros_like(q)).abs().amax(dim=(-2, -1))


def _expected_next(P: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """sum_s' P(s'|s,a) v(s'): [..., S, A, S] x [..., S] -> [..., S, A] (batch dims broadcast).

    A multiply-and-sum, not einsum: for these tiny shapes a BLAS call costs more than the
    arithmetic, and its thread pool stalls on a busy machine.
    """
    return (P * v[..., None, None, :]).sum(-1)


def _check_problem(
    P: torch.Tensor,
    r: torch.Tensor,
    gamma: float | torch.Tensor,
    mask: torch.Tensor | None,
    alpha: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """(P, r, mask, gamma [...], alpha), checked and converted (``_check_mdp`` and friends)."""
    P, r, mask = _check_mdp(P, r, mask)
    return P, r, mask, _check_gamma(gamma, r.shape[:-2]), _check_alpha(alpha)


def _policy_value(x: torch.Tensor, log_pi: torch.Tensor, alpha: float) -> torch.Tensor:
    """sum_a pi(a|s) [x(s,a) - alpha log pi(a|s)]: [..., S, A] -> [..., S].

    pi = 0 outside the support (and wherever the policy itself is 0): no contribution.
    """
    pi = log_pi.exp()
    term = torch.where(pi > 0, x - alpha * log_pi, torch.zeros_like(x))
    return (pi * term).sum(-1)


def _operator(
    P: torch.Tensor,
    r: torch.Tensor,
    gamma: torch.Tensor,
    mask: torch.Tensor,
    next_value: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Q -> r + gamma P next_value(Q, mask) [..., S, A], -inf outside the mask."""
    g = gamma[..., None, None]

    def apply(q: torch.Tensor) -> torch.Tensor:
        q = _check_q(q, r.shape)
        full_mask = mask.expand(q.shape)
        v_next = next_value(q, full_mask)
        return (r + g * _expected_next(P, v_next)).masked_fill(~full_mask, float("-inf"))

    return apply


def optimality_operator(
    P: torch.Tensor,
    r: torch.Tensor,
    gamma: float | torch.Tensor,
    mask: torch.Tensor | None = None,
    alpha: float = 1.0,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The top-p soft Bellman optimality operator T_p as a function Q -> T_p Q.

        (T_p Q)(s,a) = r(s,a) + gamma * sum_s' P(s'|s,a) * alpha log sum_{a' in A_p(s')} exp(Q(s',a')/alpha)

    The returned function takes Q [..., S, A] (extra leading dims, e.g. several Q's per MDP,
    broadcast against the MDP batch; entries outside the mask are ignored) and returns T_p Q of
    the same shape, -inf outside the mask.
    """
    P, r, mask, gamma, alpha = _check_problem(P, r, gamma, mask, alpha)
    return _operator(P, r, gamma, mask, lambda q, full_mask: soft_value(q, full_mask, alpha))


def evaluation_operator(
    P: torch.Tensor,
    r: torch.Tensor,
    gamma: float | torch.Tensor,
    policy: torch.Tensor,
    mask: torch.Tensor | None = None,
    alpha: float = 1.0,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The top-p soft Bellman evaluation operator B^pi_p as a function Q -> B^pi_p Q.

        (B^pi_p Q)(s,a) = r(s,a) + gamma * sum_s' P(s'|s,a) sum_{a' in A_p(s')} pi_p(a'|s')
                                   * [Q(s',a') - alpha log pi_p(a'|s')],   pi_p = proj_p(pi)

    Args:
        policy: [..., S, A] probabilities pi(a|s) (rows sum to 1); projected onto the mask.

    The returned function maps Q [..., S, A] to B^pi_p Q of the same shape, -inf outside the mask.
    """
    P, r, mask, gamma, alpha = _check_problem(P, r, gamma, mask, alpha)
    log_pi = _log_projected_policy(policy, mask)
    return _operator(P, r, gamma, mask, lambda q, _: _policy_value(q, log_pi, alpha))


def soft_value_iteration(
    P: torch.Tensor,
    r: torch.Tensor,
    gamma: float | torch.Tensor,
    mask: torch.Tensor | None = None,
    alpha: float = 1.0,
    tol: float = 1e-10,
    *,
    max_iter: int = 1_000_000,
) -> torch.Tensor:
    """Q*_p, the soft-optimal Q of the (top-p) MDP, by soft value iteration.

        V_{k+1}(s) = alpha log sum_{a in A_p(s)} exp(Q_{k+1}(s,a) / alpha),
        Q_{k+1}(s,a) = r(s,a) + gamma sum_s' P(s'|s,a) V_k(s'),     Q_1 = r

    i.e. Q <- T_p Q, iterated on V. Stops when gamma / (1 - gamma) ||V_{k+1} - V_k||_inf, a bound
    on ||V_{k+1} - V*_p||_inf, is <= tol * max(1, ||V_k||_inf) for every MDP of the batch, and
    returns r + gamma P V_{k+1}: within gamma * tol * max(1, ||V||) of Q*_p on every pair.

    Args:
        P [..., S, A, S], r [..., S, A], gamma float or [...], mask bool [..., S, A] or None,
        alpha > 0, tol > 0; max_iter: raise RuntimeError when not converged after that many.

    Returns:
        float64 [..., S, A], -inf outside the mask.

    >>> P = torch.ones(1, 2, 1)  # one state, two actions, both loop back
    >>> soft_value_iteration(P, torch.zeros(1, 2), 0.5)  # V = log 2 + V/2 -> Q = V/2 = log 2
    tensor([[0.6931, 0.6931]], dtype=torch.float64)
    """
    if not float(tol) > 0:
        raise ValueError(f"tol must be > 0, got tol={tol}")
    P, r, mask, gamma, alpha = _check_problem(P, r, gamma, mask, alpha)
    g = gamma[..., None, None]
    error_per_change = gamma / (1.0 - gamma)  # [...] or []
    tol = float(tol)
    # -inf on masked-out pairs, added instead of masked_fill in the loop.
    blocked = torch.zeros_like(r).masked_fill(~mask, float("-inf"))

    def backup(v: torch.Tensor) -> torch.Tensor:
        return r + g * _expected_next(P, v)

    def value(q: torch.Tensor) -> torch.Tensor:
        return alpha * torch.logsumexp((q + blocked) / alpha, dim=-1)

    v = value(r)
    for _ in range(int(max_iter)):
        v_next = value(backup(v))
        error = error_per_change * (v_next - v).abs().amax(-1)
        converged = bool((error <= tol * v.abs().amax(-1).clamp(min=1.0)).all())
        v = v_next
        if converged:
            return backup(v) + blocked
    raise RuntimeError(
        f"soft value iteration did not reach tol={tol} in max_iter={max_iter} sweeps; "
        "raise max_iter or tol (gamma close to 1 needs ~log(tol)/log(gamma) sweeps)"
    )


def soft_policy_evaluation(
    P: torch.Tensor,
    r: torch.Tensor,
    gamma: float | torch.Tensor,
    policy: torch.Tensor,
    mask: torch.Tensor | None = None,
    alpha: float = 1.0,
) -> torch.Tensor:
    """Q^{pi_p}_p, the soft Q of pi_p = proj_p(policy) in the (top-p) MDP, solved exactly.

        V(s)   = sum_{a in A_p(s)} pi_p(a|s) [r(s,a) - alpha log pi_p(a|s)] + gamma sum_s' P^pi(s,s') V(s')
        (I - gamma P^pi) V = r^pi + alpha H^pi,   P^pi(s,s') = sum_a pi_p(a|s) P(s'|s,a)
        Q(s,a) = r(s,a) + gamma sum_s' P(s'|s,a) V(s')

    i.e. the fixed point of B^pi_p, from one [..., S, S] linear solve.

    Args:
        P [..., S, A, S], r [..., S, A], gamma float or [...], policy [..., S, A] probabilities
        (rows sum to 1, some mass on every allowed set), mask bool [..., S, A] or None, alpha > 0.

    Returns:
        float64 [..., S, A], -inf outside the mask.

    >>> P = torch.ones(1, 2, 1)
    >>> soft_policy_evaluation(P, torch.zeros(1, 2), 0.5, torch.tensor([[1.0, 0.0]]))
    tensor([[0., 0.]], dtype=torch.float64)
    """
    P, r, mask, g, alpha = _check_problem(P, r, gamma, mask, alpha)
    log_pi = _log_projected_policy(policy, mask)
    pi = log_pi.exp()
    r_pi = _policy_value(r, log_pi, alpha)  # [..., S]
    P_pi = (pi.unsqueeze(-1) * P).sum(-2)  # [..., S, S]
    eye = torch.eye(P.shape[-1], dtype=_DTYPE, device=P.device)
    v = torch.linalg.solve(eye - g[..., None, None] * P_pi, r_pi.unsqueeze(-1)).squeeze(-1)
    q = r + g[..., None, None] * _expected_next(P, v)
    return q.masked_fill(~mask, float("-inf"))


def teacher_nucleus(
    q_star: torch.Tensor, p: float | torch.Tensor, alpha: float = 1.0
) -> torch.Tensor:
    """A_p(s) of the teacher pi* = softmax(Q*/alpha), via ``tdkd.topp.top_p_mask``.

    Args:
        q_star: [..., S, A] teacher Q (-inf = action not available);
        p: float, or a tensor [...] with one p per MDP.

    Returns:
        bool [..., S, A].
    """
    alpha = _check_alpha(alpha)
    p = _check_p_values(p)
    # Shift by the row max first: softmax is shift-invariant and top_p_mask works in float32,
    # which keeps relative precision only for logits near 0.
    logits = q_star / alpha
    logits = logits - logits.amax(-1, keepdim=True)
    if not isinstance(p, torch.Tensor):
        return top_p_mask(logits, p)
    batch = logits.shape[:-2]
    p = p.expand(batch).reshape(-1)
    flat = logits.reshape(-1, *logits.shape[-2:])
    masks = [top_p_mask(flat[i], float(p[i])) for i in range(flat.shape[0])]
    return torch.stack(masks).reshape(logits.shape)


@dataclass(frozen=True)
class TopPSolution:
    """The exact quantities of the propositions for a batch of MDPs.

    Attributes:
        q_star: [..., S, A] Q* of the full MDP (-inf outside ``mask``).
        nucleus: bool [..., S, A] A_p(s) of the teacher pi* = softmax(Q*/alpha).
        q_star_p: [..., S, A] Q*_p, soft-optimal in M_p (-inf outside the nucleus).
        q_teacher_p: [..., S, A] Q^{proj_p pi*}_p, the projected teacher in M_p.
        teacher: [..., S, A] pi* (probabilities; 0 outside ``mask``).
        nucleus_mass: [..., S] pi*(A_p(s)|s) (>= p).
        mask: bool [..., S, A] the full MDP's actions.
        gamma, p: float or [...] tensors; alpha: float.
    """

    q_star: torch.Tensor
    nucleus: torch.Tensor
    q_star_p: torch.Tensor
    q_teacher_p: torch.Tensor
    teacher: torch.Tensor
    nucleus_mass: torch.Tensor
    mask: torch.Tensor
    gamma: float | torch.Tensor
    p: float | torch.Tensor
    alpha: float

    @property
    def kappa(self) -> torch.Tensor:
        """[...] kappa(p) per MDP."""
        return kappa(self.p, self.gamma, self.alpha)


def solve_top_p(
    P: torch.Tensor,
    r: torch.Tensor,
    gamma: float | torch.Tensor,
    p: float | torch.Tensor,
    mask: torch.Tensor | None = None,
    alpha: float = 1.0,
    tol: float = 1e-10,
) -> TopPSolution:
    """Q*, the teacher's nucleus at p, Q*_p and Q^{proj_p pi*}_p for a batch of MDPs.

    The teacher is pi* = softmax(Q*/alpha) of the full MDP (actions ``mask``); M_p keeps, at each
    state, the teacher's nucleus A_p(s).
    """
    P, r, mask = _check_mdp(P, r, mask)
    p = _check_p_values(p)
    q_star = soft_value_iteration(P, r, gamma, mask, alpha, tol)
    teacher = torch.softmax(q_star / alpha, dim=-1)
    nucleus = teacher_nucleus(q_star, p, alpha) & mask
    q_star_p = soft_value_iteration(P, r, gamma, nucleus, alpha, tol)
    q_teacher_p = soft_policy_evaluation(P, r, gamma, teacher, nucleus, alpha)
    return TopPSolution(
        q_star=q_star,
        nucleus=nucleus,
        q_star_p=q_star_p,
        q_teacher_p=q_teacher_p,
        teacher=teacher,
        nucleus_mass=(teacher * nucleus).sum(-1),
        mask=mask,
        gamma=gamma,
        p=p,
        alpha=float(alpha),
    )


# ----------------------------------------------------------------------------- propositions


def contraction_factor(
    operator: Callable[[torch.Tensor], torch.Tensor],
    mask: torch.Tensor,
    *,
    generator: torch.Generator,
    num_pairs: int = 8,
    scale: float = 10.0,
    state_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Proposition 1, observed: max over random pairs of ||B Q1 - B Q2||_{inf,p} / ||Q1 - Q2||_{inf,p}.

    Half the pairs differ by signed noise, half by one-sided noise (Q2 >= Q1), which pushes the
    ratio towards its bound gamma.

    Args:
        operator: Q [k, ..., S, A] -> BQ (``optimality_operator`` / ``evaluation_operator``).
        mask: bool [..., S, A] the supported pairs A_p(s) the norm runs over.
        generator: seeded torch.Generator for the pairs.
        num_pairs: k; scale: size of the random Q's and of their differences.
        state_mask: bool [..., S] optional; Q1 - Q2 is 0 at the other states (padding).

    Returns:
        [...] float64 observed factor per MDP (<= gamma when the proposition holds).
    """
    shape = (int(num_pairs), *mask.shape)
    q1 = scale * torch.randn(shape, generator=generator, dtype=_DTYPE)
    signed = torch.randn(shape, generator=generator, dtype=_DTYPE)
    one_sided = torch.rand(shape, generator=generator, dtype=_DTYPE)
    half = torch.arange(int(num_pairs)).view(-1, *([1] * mask.dim())) % 2 == 0
    delta = scale * torch.where(half, signed, one_sided)
    if state_mask is not None:
        delta = delta * state_mask.unsqueeze(-1).to(_DTYPE)
    q2 = q1 + delta
    before = topp_sup_norm(q1 - q2, mask)
    after = topp_sup_norm(operator(q1) - operator(q2), mask)
    return (after / before.clamp(min=torch.finfo(_DTYPE).tiny)).amax(0)


def _gap_over_kappa(
    q_star: torch.Tensor, q_other: torch.Tensor, solution: TopPSolution
) -> tuple[torch.Tensor, torch.Tensor]:
    """(||Q* - Q_other||_{inf,p}, that / kappa); the ratio is NaN where kappa = 0."""
    diff = torch.where(solution.nucleus, q_star - q_other, torch.zeros_like(q_star))
    gap = topp_sup_norm(diff, solution.nucleus)
    k = solution.kappa
    ratio = torch.where(k > 0, gap / torch.where(k > 0, k, 1.0), torch.full_like(gap, math.nan))
    return gap, ratio


def projected_teacher_gap(solution: TopPSolution) -> tuple[torch.Tensor, torch.Tensor]:
    """Proposition 2: (gap, gap / kappa) with gap = ||Q* - Q^{proj_p pi*}_p||_{inf,p}; [...] each.

    The bound says gap / kappa <= 1 (NaN where kappa = 0, i.e. p = 1 or gamma = 0).
    """
    return _gap_over_kappa(solution.q_star, solution.q_teacher_p, solution)


def suboptimality_gap(solution: TopPSolution) -> tuple[torch.Tensor, torch.Tensor]:
    """Proposition 4: (gap, gap / kappa) with gap = ||Q* - Q*_p||_{inf,p}; [...] each."""
    return _gap_over_kappa(solution.q_star, solution.q_star_p, solution)


def sandwich_violation(solution: TopPSolution) -> torch.Tensor:
    """Proposition 3: the largest amount by which Q^{proj_p pi*}_p <= Q*_p <= Q* fails.

        max_{s, a in A_p(s)} max(Q^{proj}_p - Q*_p, Q*_p - Q*, 0)

    Returns:
        [...] float64, 0 when the sandwich holds (up to solver error).
    """
    nucleus = solution.nucleus
    zeros = torch.zeros_like(solution.q_star)
    lower = torch.where(nucleus, solution.q_teacher_p - solution.q_star_p, zeros)
    upper = torch.where(nucleus, solution.q_star_p - solution.q_star, zeros)
    return torch.maximum(lower, upper).clamp(min=0.0).amax(dim=(-2, -1))


# ----------------------------------------------------------------------------- random MDPs


def random_soft_mdp(
    num_states: int,
    num_actions: int,
    *,
    generator: torch.Generator,
    batch_shape: tuple[int, ...] = (),
    reward_scale: float = 1.0,
    transition_sharpness: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A random soft MDP: P(.|s,a) = softmax(sharpness * N(0, 1)), r = reward_scale * N(0, 1).

    Larger ``reward_scale`` sharpens the soft-optimal policy (smaller nuclei); larger
    ``transition_sharpness`` makes the dynamics closer to deterministic.

    Returns:
        (P float64 [*batch_shape, S, A, S], r float64 [*batch_shape, S, A]).

    >>> P, r = random_soft_mdp(3, 2, generator=torch.Generator().manual_seed(0))
    >>> P.shape, r.shape, bool(torch.allclose(P.sum(-1), torch.ones(3, 2, dtype=P.dtype)))
    (torch.Size([3, 2, 3]), torch.Size([3, 2]), True)
    """
    if int(num_states) < 1 or int(num_actions) < 1:
        raise ValueError(
            f"num_states and num_actions must be >= 1, got num_states={num_states}, "
            f"num_actions={num_actions}"
        )
    shape = (*batch_shape, int(num_states), int(num_actions))
    logits = torch.randn((*shape, int(num_states)), generator=generator, dtype=_DTYPE)
    P = torch.softmax(float(transition_sharpness) * logits, dim=-1)
    r = float(reward_scale) * torch.randn(shape, generator=generator, dtype=_DTYPE)
    return P, r


def stack_mdps(
    mdps: list[tuple[torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pad MDPs of different sizes into one batch without changing any of their values.

    Padding actions are masked out (their P is a self-loop, r = 0); padding states are
    absorbing, with only action 0, r = 0 (so every value there is 0) and unreachable from
    the real states, whose P never points at them.

    Args:
        mdps: list of (P [S_i, A_i, S_i], r [S_i, A_i]).

    Returns:
        (P [N, S, A, S], r [N, S, A], mask bool [N, S, A] real actions,
         state_mask bool [N, S] real states), S and A the largest sizes.
    """
    if not mdps:
        raise ValueError("mdps must contain at least one (P, r) pair, got an empty list")
    n = len(mdps)
    s_max = max(int(P.shape[0]) for P, _ in mdps)
    a_max = max(int(P.shape[1]) for P, _ in mdps)
    P_out = torch.zeros(n, s_max, a_max, s_max, dtype=_DTYPE)
    P_out[..., :, :, :] = torch.eye(s_max, dtype=_DTYPE).unsqueeze(1)  # self-loops
    r_out = torch.zeros(n, s_max, a_max, dtype=_DTYPE)
    mask = torch.zeros(n, s_max, a_max, dtype=torch.bool)
    mask[:, :, 0] = True
    state_mask = torch.zeros(n, s_max, dtype=torch.bool)
    for i, (P, r) in enumerate(mdps):
        P, r, _ = _check_mdp(P, r, None)
        s, a = r.shape
        P_out[i, :s, :a, :] = 0.0
        P_out[i, :s, :a, :s] = P
        r_out[i, :s, :a] = r
        mask[i, :s, :a] = True
        state_mask[i, :s] = True
    return P_out, r_out, mask, state_mask
