"""Token-level divergences between a teacher distribution P and a student distribution Q.

Each divergence takes log-probabilities over the same action set (the full vocabulary, or a
nucleus support) and a validity mask, and returns one value per state:

    forward_kl(P, Q)   = KL(P || Q) = sum_a P (log P - log Q)                 (KD, "mean seeking")
    reverse_kl(P, Q)   = KL(Q || P) = sum_a Q (log Q - log P)                 (mode seeking)
    jsd(P, Q; beta)    = beta KL(P || M) + (1-beta) KL(Q || M), M = beta P + (1-beta) Q (GKD)
    skew_kl(P, Q; lam) = KL(P || lam P + (1-lam) Q)                           (DistiLLM SKL)
    skew_rkl(P, Q; lam)= KL(Q || lam Q + (1-lam) P)                           (DistiLLM SRKL)
    tvd(P, Q)          = 1/2 sum_a |P - Q|
    cross_entropy(P, Q)= -sum_a P log Q

P is always the teacher and Q the student: the argument order never changes, the name says
the direction. Entries off the mask count as probability 0 (no term, no gradient).

Support versions work on [..., K] vectors directly. Full-vocabulary versions
(``full_vocab_divergence``, ``full_vocab_cross_entropy``) take [..., V] logits and visit the
rows in chunks under activation checkpointing, so at most one [chunk, V] fp32 block (and its
few temporaries) is alive at a time, in the forward and in the backward pass; memory stays flat
as V grows.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint

__all__ = [
    "DIVERGENCES",
    "cross_entropy",
    "forward_kl",
    "full_vocab_cross_entropy",
    "full_vocab_divergence",
    "jsd",
    "reverse_kl",
    "skew_kl",
    "skew_rkl",
    "tvd",
]


def _check(p_logp: torch.Tensor, q_logp: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if p_logp.shape != q_logp.shape:
        raise ValueError(
            f"teacher and student log-probs must match, got {tuple(p_logp.shape)} and "
            f"{tuple(q_logp.shape)}"
        )
    if mask is None:
        return torch.ones_like(p_logp, dtype=torch.bool)
    if mask.shape != p_logp.shape:
        raise ValueError(f"mask must be {tuple(p_logp.shape)}, got {tuple(mask.shape)}")
    return mask.bool()


def _safe(logp: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    return logp.masked_fill(~keep, 0.0)


def _kl(a_logp: torch.Tensor, b_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum_{mask, a > 0} a (log a - log b)."""
    keep = mask & torch.isfinite(a_logp)
    a = _safe(a_logp, keep)
    term = a.exp() * (a - _safe(b_logp, keep))
    return term.masked_fill(~keep, 0.0).sum(-1)


def forward_kl(
    teacher_log_probs: torch.Tensor,
    student_log_probs: torch.Tensor,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """KL(teacher || student) per state, [..., A] -> [...].

    >>> forward_kl(torch.tensor([0.5, 0.5]).log(), torch.tensor([0.5, 0.5]).log())
    tensor(0.)
    """
    mask = _check(teacher_log_probs, student_log_probs, mask)
    return _kl(teacher_log_probs, student_log_probs, mask)


def reverse_kl(
    teacher_log_probs: torch.Tensor,
    student_log_probs: torch.Tensor,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """KL(student || teacher) per state, [..., A] -> [...]."""
    mask = _check(teacher_log_probs, student_log_probs, mask)
    return _kl(student_log_probs, teacher_log_probs, mask)


def _mixture_log_probs(a_logp: torch.Tensor, b_logp: torch.Tensor, weight_a: float) -> torch.Tensor:
    """log(w a + (1-w) b) computed in log space."""
    if weight_a <= 0.0:
        return b_logp
    if weight_a >= 1.0:
        return a_logp
    return torch.logaddexp(a_logp + math.log(weight_a), b_logp + math.log1p(-weight_a))


def _check_weight(value: float, name: str) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {name}={value}")
    return value


def _skew_kl(
    a_logp: torch.Tensor, b_logp: torch.Tensor, mask: torch.Tensor, lam: float
) -> torch.Tensor:
    """KL(a || lam a + (1-lam) b) over the mask, [..., A] -> [...]."""
    keep_a = mask & torch.isfinite(a_logp)
    a_safe = a_logp.masked_fill(~keep_a, float("-inf"))
    b_safe = b_logp.masked_fill(~mask, float("-inf"))
    return _kl(a_safe, _mixture_log_probs(a_safe, b_safe, lam), keep_a)


def jsd(
    teacher_log_probs: torch.Tensor,
    student_log_probs: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    beta: float = 0.5,
) -> torch.Tensor:
    """Generalised JSD(beta) = beta KL(P || M) + (1-beta) KL(Q || M), M = beta P + (1-beta) Q.

    beta = 0.5 is the symmetric Jensen-Shannon divergence; beta -> 0 and beta -> 1 give
    divergences proportional to forward and reverse KL (GKD, Agarwal et al. 2024).
    """
    mask = _check(teacher_log_probs, student_log_probs, mask)
    beta = _check_weight(beta, "beta")
    keep_p = mask & torch.isfinite(teacher_log_probs)
    keep_q = mask & torch.isfinite(student_log_probs)
    p_safe = teacher_log_probs.masked_fill(~keep_p, float("-inf"))
    q_safe = student_log_probs.masked_fill(~keep_q, float("-inf"))
    m_logp = _mixture_log_probs(p_safe, q_safe, beta)
    return beta * _kl(p_safe, m_logp, keep_p) + (1.0 - beta) * _kl(q_safe, m_logp, keep_q)


def skew_kl(
    teacher_log_probs: torch.Tensor,
    student_log_probs: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    lam: float = 0.1,
) -> torch.Tensor:
    """Skew forward KL(P || lam P + (1-lam) Q) (DistiLLM; lam = 0 is forward KL)."""
    mask = _check(teacher_log_probs, student_log_probs, mask)
    return _skew_kl(teacher_log_probs, student_log_probs, mask, _check_weight(lam, "lam"))


def skew_rkl(
    teacher_log_probs: torch.Tensor,
    student_log_probs: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    lam: float = 0.1,
) -> torch.Tensor:
    """Skew reverse KL(Q || lam Q + (1-lam) P) (DistiLLM; lam = 0 is reverse KL)."""
    mask = _check(teacher_log_probs, student_log_probs, mask)
    return _skew_kl(student_log_probs, teacher_log_probs, mask, _check_weight(lam, "lam"))


def tvd(
    teacher_log_probs: torch.Tensor,
    student_log_probs: torch.Tensor,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Total variation 1/2 sum_a |P(a) - Q(a)|."""
    mask = _check(teacher_log_probs, student_log_probs, mask)
    p = teacher_log_probs.masked_fill(~mask, float("-inf")).exp()
    q = student_log_probs.masked_fill(~mask, float("-inf")).exp()
    return 0.5 * (p - q).abs().sum(-1)


def cross_entropy(
    teacher_log_probs: torch.Tensor,
    student_log_probs: torch.Tensor,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """-sum_a P(a) log Q(a) = KL(P || Q) + H(P)."""
    mask = _check(teacher_log_probs, student_log_probs, mask)
    keep = mask & torch.isfinite(teacher_log_probs)
    p = _safe(teacher_log_probs, keep).exp().masked_fill(~keep, 0.0)
    return -(p * _safe(student_log_probs, keep)).sum(-1)


# name -> (function, keyword hyperparameters it accepts)
DIVERGENCES: dict[str, Callable[..., torch.Tensor]] = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "jsd": jsd,
    "skew_kl": skew_kl,
    "skew_rkl": skew_rkl,
    "tvd": tvd,
    "cross_entropy": cross_entropy,
}


def get_divergence(name: str) -> Callable[..., torch.Tensor]:
    """The divergence function called ``name`` (ValueError listing the valid names)."""
    if name not in DIVERGENCES:
        raise ValueError(f"unknown divergence {name!r}; choose one of {sorted(DIVERGENCES)}")
    return DIVERGENCES[name]


def _check_chunk(chunk_size: int) -> int:
    chunk_size = int(chunk_size)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got chunk_size={chunk_size}")
    return chunk_size


def _rows(x: torch.Tensor, rows: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x with at least one leading dim, the flat row indices to visit; None = all rows).

    x is not flattened: a reshape of a non-contiguous view such as ``logits[:, :-1]`` would
    copy the whole [B, T, V] tensor; ``_take_rows`` reads each chunk's rows in place instead.
    """
    if x.dim() == 1:
        x = x.unsqueeze(0)
    if rows is None:
        rows = torch.arange(math.prod(x.shape[:-1]), device=x.device)
    return x, rows


def _take_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows ``idx`` (flat indices over x's leading dims) of x [..., V], as [len(idx), V]."""
    return x[torch.unravel_index(idx, x.shape[:-1])]


def _mask_rows(mask: torch.Tensor | None) -> torch.Tensor | None:
    """Flat indices of the True rows of ``mask`` (None: every row)."""
    return None if mask is None else mask.reshape(-1).nonzero().squeeze(-1)


def _chunked_rows(
    block: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    student_rows: torch.Tensor,
    rows: torch.Tensor,
    shape: torch.Size,
    chunk_size: int,
) -> torch.Tensor:
    """``block(idx, student_rows)`` over ``rows`` in chunks (checkpointed when student_rows needs a
    gradient), scattered into a float32 tensor of ``shape`` (0 on rows not visited)."""
    values = []
    for start in range(0, rows.numel(), chunk_size):
        idx = rows[start : start + chunk_size]
        if student_rows.requires_grad:
            values.append(checkpoint(block, idx, student_rows, use_reentrant=False))
        else:
            values.append(block(idx, student_rows))
    out = torch.zeros(math.prod(shape), dtype=torch.float32, device=student_rows.device)
    if values:
        out = out.index_put((rows,), torch.cat(values))
    return out.reshape(shape)


def full_vocab_divergence(
    teacher_logits: torch.Tensor,
    student_logits: torch.Tensor,
    name: str,
    *,
    mask: torch.Tensor | None = None,
    chunk_size: int = 256,
    **hyperparameters: float,
) -> torch.Tensor:
    """A divergence over the full vocabulary, rows visited in checkpointed fp32 chunks.

    Args:
        teacher_logits: [..., V] (no gradient is taken through them); student_logits: [..., V].
        name: a key of ``DIVERGENCES``.
        mask: optional bool [...]: rows to compute (others are 0 and cost nothing).
        chunk_size: rows per chunk; one [chunk_size, V] fp32 block per tensor is alive at once.
        hyperparameters: e.g. beta for "jsd", lam for "skew_kl".

    Returns:
        float32 [...] per-row divergences (0 on rows off ``mask``).
    """
    fn = get_divergence(name)
    chunk_size = _check_chunk(chunk_size)
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"teacher and student logits must match, got {tuple(teacher_logits.shape)} and "
            f"{tuple(student_logits.shape)}: teacher and student must share a tokenizer"
        )
    lead = student_logits.shape[:-1]
    rows = _mask_rows(mask)
    teacher_rows, rows = _rows(teacher_logits.detach(), rows)
    student_rows, _ = _rows(student_logits, rows)

    def block(idx: torch.Tensor, student_all: torch.Tensor) -> torch.Tensor:
        t = torch.log_softmax(_take_rows(teacher_rows, idx).float(), dim=-1)
        s = torch.log_softmax(_take_rows(student_all, idx).float(), dim=-1)
        return fn(t, s, **hyperparameters)

    return _chunked_rows(block, student_rows, rows, lead, chunk_size)


def full_vocab_cross_entropy(
    student_logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    chunk_size: int = 256,
) -> torch.Tensor:
    """-log softmax(student_logits)[target] per row, in checkpointed fp32 chunks.

    Args:
        student_logits: [..., V]; targets: int [...] token ids; mask: optional bool [...].

    Returns:
        float32 [...] (0 on rows off ``mask``).

    >>> full_vocab_cross_entropy(torch.zeros(2, 4), torch.tensor([0, 3]))
    tensor([1.3863, 1.3863])
    """
    chunk_size = _check_chunk(chunk_size)
    if targets.shape != student_logits.shape[:-1]:
        raise ValueError(
            f"targets must be {tuple(student_logits.shape[:-1])}, got {tuple(targets.shape)}"
        )
    lead = targets.shape
    rows = _mask_rows(mask)
    student_rows, rows = _rows(student_logits, rows)
    flat_targets = targets.reshape(-1).long()

    def block(idx: torch.Tensor, student_all: torch.Tensor) -> torch.Tensor:
        logits = _take_rows(student_all, idx).float()
        picked = logits.gather(-1, flat_targets.index_select(0, idx).unsqueeze(-1)).squeeze(-1)
        return torch.logsumexp(logits, dim=-1) - picked

    return _chunked_rows(block, student_rows, rows, lead, chunk_size)
