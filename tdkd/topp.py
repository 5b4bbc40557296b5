"""The teacher's nucleus (top-p set) and the projection of a policy onto it.

Notation (PAPER.md section 2). For a teacher distribution pi_T(.|s) over V tokens:

    A_p(s) = the smallest set of highest-probability tokens with  sum_{a in A_p(s)} pi_T(a|s) >= p

Tokens are ranked by descending probability, ties broken by ascending token id, so a nucleus
is a *prefix* of one fixed ranking: the nucleus at p' <= p is a prefix of the nucleus at p.
That is what lets a cache stored at p_store serve any smaller p exactly (see
``RaggedSupport.restrict``). The nucleus is never empty: the top token is always in it.

Token k of the ranking (0-based) is in A_p iff the mass ranked before it is < p:

    k in A_p  <=>  sum_{j<k} pi_sorted[j] < p,    |A_p| = max(1, #{k : that holds})

The prefix sums are accumulated in float64 from float32 log-probabilities; the dense and the
sparse paths both go through ``nucleus_size`` so they agree bit for bit. At p = 1 the nucleus
is every token of finite logit (the unrestricted MDP), whatever float rounding does.

Forms:
- dense:  ``top_p_mask(logits, p)`` -> bool [..., V]
- padded: ``top_p_support(logits, p)`` -> ``Support`` with ids/log_probs/mask [..., K], where K
  is the batch's own largest nucleus (optionally capped at ``max_support``, the dropped mass
  recorded); entries in ranking order, padding at the end.
- ragged: ``RaggedSupport`` (offsets + ids + log_probs), the storage form of the cache.

Projection (proj_p) of a policy pi_Q = softmax(Q) onto a support:

    log proj_p(pi_Q)(a|s) = Q(s,a) - log sum_{b in A_p(s)} exp Q(s,b)   for a in A_p(s), else -inf
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "RaggedSupport",
    "Support",
    "check_p",
    "gather_support",
    "nucleus_size",
    "proj_p_log_probs",
    "rank_log_probs",
    "support_to_mask",
    "top_p_mask",
    "top_p_support",
]


def check_p(p: float, name: str = "p") -> float:
    """Return ``p`` as a float if it lies in (0, 1], else raise ValueError naming it."""
    p = float(p)
    if not (0.0 < p <= 1.0) or math.isnan(p):
        raise ValueError(f"{name} must be in (0, 1], got {name}={p}")
    return p


def _check_logits(logits: torch.Tensor, name: str = "logits") -> None:
    if not isinstance(logits, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dim() == 0 or logits.shape[-1] == 0:
        raise ValueError(
            f"{name} needs a non-empty last (action) dimension, got shape {tuple(logits.shape)}"
        )
    if not logits.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {logits.dtype}")
    if torch.isnan(logits).any():
        raise ValueError(f"{name} contains NaN; check the model's outputs or the input ids")
    if (logits == float("inf")).any():
        raise ValueError(f"{name} contains +inf; logits must be finite or -inf (masked)")
    if not torch.isfinite(logits).any(dim=-1).all():
        raise ValueError(
            f"{name} has a row whose every entry is -inf: a state must allow at least one action"
        )


def rank_log_probs(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher log-probs in ranking order and the token ids of that order.

    Args:
        logits: [..., V] teacher logits.

    Returns:
        (sorted_log_probs [..., V] float32, sorted_ids [..., V] int64), descending probability,
        ties by ascending token id (a stable sort of the ids 0..V-1).
    """
    _check_logits(logits)
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    return torch.sort(log_probs, dim=-1, descending=True, stable=True)


def nucleus_size(sorted_log_probs: torch.Tensor, p: float) -> torch.Tensor:
    """|A_p| from log-probs in ranking order: max(1, #{k : sum_{j<k} pi_sorted[j] < p}).

    Args:
        sorted_log_probs: [..., K] float log-probs in ranking order (a full ranking or any
            prefix of it that contains the nucleus; -inf entries are never counted).
        p: nucleus mass in (0, 1].

    Returns:
        int64 [...] nucleus sizes, each in [1, K].

    >>> nucleus_size(torch.tensor([0.5, 0.3, 0.2]).log(), 0.75)
    tensor(2)
    """
    p = check_p(p)
    finite = torch.isfinite(sorted_log_probs)
    if p == 1.0:
        return finite.sum(-1).clamp(min=1)
    probs = sorted_log_probs.double().exp()
    mass_before = torch.cumsum(probs, dim=-1) - probs
    inside = (mass_before < p) & finite
    return inside.sum(-1).clamp(min=1)


def top_p_mask(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Dense nucleus mask of the teacher: True where the token is in A_p(s).

    Args:
        logits: [..., V] teacher logits (any float dtype; -inf = impossible token).
        p: nucleus mass in (0, 1].

    Returns:
        bool [..., V], same shape as ``logits``; every row has at least one True.

    >>> top_p_mask(torch.tensor([2.0, 1.0, 1.0, -1.0]), 0.6)
    tensor([ True,  True, False, False])
    """
    p = check_p(p)
    sorted_log_probs, sorted_ids = rank_log_probs(logits)
    size = nucleus_size(sorted_log_probs, p)
    ranks = torch.arange(logits.shape[-1], device=logits.device)
    in_sorted = ranks < size.unsqueeze(-1)
    return torch.zeros_like(in_sorted).scatter(-1, sorted_ids, in_sorted)


@dataclass(frozen=True)
class Support:
    """A padded sparse nucleus, K = the batch's own largest support.

    Attributes:
        ids: int64 [..., K] token ids in ranking order (0 at padding).
        log_probs: float32 [..., K] teacher log-probs log pi_T(a|s) (-inf at padding).
        mask: bool [..., K] True for real entries.
        covered_mass: float32 [...] teacher mass of the kept entries.
        dropped_mass: float32 [...] teacher mass of nucleus entries removed by ``max_support``.
    """

    ids: torch.Tensor
    log_probs: torch.Tensor
    mask: torch.Tensor
    covered_mass: torch.Tensor
    dropped_mass: torch.Tensor

    @property
    def sizes(self) -> torch.Tensor:
        """int64 [...] number of real entries per state."""
        return self.mask.sum(-1)


def _pad_from_ranking(
    sorted_log_probs: torch.Tensor,
    sorted_ids: torch.Tensor,
    size: torch.Tensor,
    max_support: int | None,
) -> Support:
    """Cut each ranking at its nucleus size and pad to the largest kept size."""
    if max_support is not None and int(max_support) < 1:
        raise ValueError(f"max_support must be >= 1 or None, got max_support={max_support}")
    kept = size if max_support is None else size.clamp(max=int(max_support))
    width = max(int(kept.max()) if kept.numel() else 1, 1)
    ranks = torch.arange(width, device=sorted_ids.device)
    mask = ranks < kept.unsqueeze(-1)
    nucleus = ranks < size.unsqueeze(-1)
    log_probs = sorted_log_probs[..., :width]
    ids = torch.where(mask, sorted_ids[..., :width], torch.zeros_like(sorted_ids[..., :width]))
    kept_log_probs = log_probs.masked_fill(~mask, float("-inf"))
    probs = log_probs.double().exp()
    covered = (probs * mask).sum(-1)
    # Mass of the nucleus beyond the cap; entries past `width` are never dropped nucleus
    # entries unless the cap bites, so sum them from the full ranking.
    if max_support is None:
        dropped = torch.zeros_like(covered)
    else:
        full = sorted_log_probs.double().exp()
        all_ranks = torch.arange(full.shape[-1], device=full.device)
        in_nucleus = all_ranks < size.unsqueeze(-1)
        dropped = (full * in_nucleus).sum(-1) - covered
    return Support(ids, kept_log_probs.float(), mask, covered.float(), dropped.float())


def top_p_support(logits: torch.Tensor, p: float, *, max_support: int | None = None) -> Support:
    """Sparse nucleus of the teacher, padded to the batch's own largest support.

    Args:
        logits: [..., V] teacher logits.
        p: nucleus mass in (0, 1].
        max_support: optional cap on K; entries past it are dropped and their mass is
            recorded in ``dropped_mass`` (the kept ones are still the top ones).

    Returns:
        ``Support`` with [..., K] ids / log_probs / mask.

    >>> s = top_p_support(torch.tensor([[2.0, 1.0, 0.0], [0.0, 5.0, 0.0]]), 0.7)
    >>> s.ids.tolist(), s.mask.tolist()
    ([[0, 1], [1, 0]], [[True, True], [True, False]])
    """
    p = check_p(p)
    sorted_log_probs, sorted_ids = rank_log_probs(logits)
    size = nucleus_size(sorted_log_probs, p)
    return _pad_from_ranking(sorted_log_probs, sorted_ids, size, max_support)


def support_to_mask(ids: torch.Tensor, mask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Dense bool [..., V] mask from a padded support (ids, mask [..., K])."""
    if ids.shape != mask.shape:
        raise ValueError(
            f"ids and mask must have the same shape, got {tuple(ids.shape)} and {tuple(mask.shape)}"
        )
    if ids.numel() and (int(ids.max()) >= vocab_size or int(ids.min()) < 0):
        raise ValueError(f"support ids must lie in [0, {vocab_size}), got ids up to {int(ids.max())}")
    dense = torch.zeros((*ids.shape[:-1], vocab_size), dtype=torch.bool, device=ids.device)
    # Padding entries carry id 0 with mask False; scatter with "amax" so they never erase a
    # real entry for token 0.
    return dense.scatter_reduce(-1, ids.long(), mask, reduce="amax")


def gather_support(
    values: torch.Tensor,
    ids: torch.Tensor,
    mask: torch.Tensor,
    fill: float = float("-inf"),
) -> torch.Tensor:
    """values[..., ids] on the support, ``fill`` at padding.

    Args:
        values: [..., V] dense per-token values (e.g. student logits = Q).
        ids: int [..., K] support ids; mask: bool [..., K].

    Returns:
        [..., K] gathered values.
    """
    if values.shape[:-1] != ids.shape[:-1] or ids.shape != mask.shape:
        raise ValueError(
            "values [..., V], ids [..., K] and mask [..., K] must share leading dims, got "
            f"values {tuple(values.shape)}, ids {tuple(ids.shape)}, mask {tuple(mask.shape)}"
        )
    gathered = torch.gather(values, -1, ids.long())
    return gathered.masked_fill(~mask, fill)


def proj_p_log_probs(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log proj_p(softmax(logits)): log-softmax over the allowed entries, -inf elsewhere.

    Works on dense [..., V] logits with a dense mask, and on support-gathered [..., K] logits
    with the support mask.

    >>> proj_p_log_probs(torch.tensor([0.0, 0.0, 5.0]), torch.tensor([True, True, False])).exp()
    tensor([0.5000, 0.5000, 0.0000])
    """
    if logits.shape != mask.shape:
        raise ValueError(
            f"logits and mask must have the same shape, got {tuple(logits.shape)} and "
            f"{tuple(mask.shape)}"
        )
    if not mask.any(dim=-1).all():
        raise ValueError("mask has a row with no allowed action; every state needs one")
    masked = logits.masked_fill(~mask, float("-inf"))
    return torch.log_softmax(masked, dim=-1)


@dataclass(frozen=True)
class RaggedSupport:
    """Nuclei of N states stored back to back: the cache's on-disk and in-memory form.

    Attributes:
        offsets: int64 [N + 1], state i owns entries offsets[i]:offsets[i+1].
        ids: int32 [nnz] token ids in ranking order within each state.
        log_probs: float32 [nnz] teacher log-probs (full-softmax, so restrict() is exact).
        p: the mass the nuclei were cut at.
        dropped_mass: float32 [N] nucleus mass removed by a ``max_support`` cap (0 if none).
    """

    offsets: torch.Tensor
    ids: torch.Tensor
    log_probs: torch.Tensor
    p: float
    dropped_mass: torch.Tensor

    def __post_init__(self) -> None:
        n = self.offsets.numel() - 1
        if n < 0 or int(self.offsets[0]) != 0 or int(self.offsets[-1]) != self.ids.numel():
            raise ValueError(
                f"offsets must start at 0 and end at nnz={self.ids.numel()}, got "
                f"{self.offsets[:1].tolist()}..{self.offsets[-1:].tolist()}"
            )
        if self.ids.shape != self.log_probs.shape:
            raise ValueError(
                f"ids and log_probs must match, got {tuple(self.ids.shape)} and "
                f"{tuple(self.log_probs.shape)}"
            )
        if n and bool((self.offsets[1:] <= self.offsets[:-1]).any()):
            raise ValueError("every state needs a non-empty nucleus (offsets must increase)")
        if self.dropped_mass.shape != (n,):
            raise ValueError(f"dropped_mass must have shape ({n},), got {tuple(self.dropped_mass.shape)}")

    def __len__(self) -> int:
        return self.offsets.numel() - 1

    @property
    def lengths(self) -> torch.Tensor:
        """int64 [N] nucleus sizes."""
        return self.offsets[1:] - self.offsets[:-1]

    @classmethod
    def from_support(cls, support: Support, p: float) -> RaggedSupport:
        """Flatten a padded ``Support`` (any leading dims) into N = prod(leading) states."""
        mask = support.mask.reshape(-1, support.mask.shape[-1])
        lengths = mask.sum(-1)
        offsets = torch.zeros(lengths.numel() + 1, dtype=torch.int64)
        offsets[1:] = torch.cumsum(lengths.cpu(), 0)
        return cls(
            offsets=offsets,
            ids=support.ids.reshape(mask.shape)[mask].to(torch.int32).cpu(),
            log_probs=support.log_probs.reshape(mask.shape)[mask].float().cpu(),
            p=check_p(p),
            dropped_mass=support.dropped_mass.reshape(-1).float().cpu(),
        )

    @classmethod
    def from_logits(
        cls, logits: torch.Tensor, p: float, *, max_support: int | None = None
    ) -> RaggedSupport:
        """Nuclei of [N, V] (or [..., V]) teacher logits in ragged form."""
        return cls.from_support(top_p_support(logits, p, max_support=max_support), p)

    def select(self, index: torch.Tensor | slice) -> RaggedSupport:
        """The states ``index`` (a slice or a 1-D int tensor), in that order."""
        rows = torch.arange(len(self))[index]
        starts, ends = self.offsets[rows], self.offsets[rows + 1]
        lengths = ends - starts
        offsets = torch.zeros(rows.numel() + 1, dtype=torch.int64)
        offsets[1:] = torch.cumsum(lengths, 0)
        flat = _ragged_arange(starts, lengths)
        return RaggedSupport(
            offsets, self.ids[flat], self.log_probs[flat], self.p, self.dropped_mass[rows]
        )

    def restrict(self, p: float) -> RaggedSupport:
        """The nuclei at p <= self.p, re-derived exactly as a prefix of each stored nucleus."""
        p = check_p(p)
        if p > self.p:
            raise ValueError(
                f"p={p} is above the mass the supports were stored at (p_store={self.p}); "
                "re-run `tdkd prepare` with a larger --p-store or train with p <= p_store"
            )
        if p == self.p:
            return self
        padded = self.to_padded()
        size = nucleus_size(padded.log_probs, p)
        starts = self.offsets[:-1]
        flat = _ragged_arange(starts, size)
        offsets = torch.zeros(len(self) + 1, dtype=torch.int64)
        offsets[1:] = torch.cumsum(size, 0)
        # A cap applied at p_store stays a cap at p: the dropped mass is what the cap cut from
        # the smaller nucleus, which is zero unless the cap still bites.
        still_capped = (size == self.lengths) & (self.dropped_mass > 0)
        return RaggedSupport(
            offsets,
            self.ids[flat],
            self.log_probs[flat],
            p,
            torch.where(still_capped, self.dropped_mass, torch.zeros_like(self.dropped_mass)),
        )

    def to_padded(self, max_support: int | None = None) -> Support:
        """Padded [N, K] form, K = the largest stored nucleus (or ``max_support``)."""
        n = len(self)
        lengths = self.lengths
        kept = lengths if max_support is None else lengths.clamp(max=int(max_support))
        width = max(int(kept.max()) if n else 1, 1)
        ranks = torch.arange(width)
        mask = ranks < kept.unsqueeze(-1)
        flat = self.offsets[:-1].unsqueeze(-1) + ranks
        flat = torch.where(mask, flat, torch.zeros_like(flat)).clamp(max=max(self.ids.numel() - 1, 0))
        ids = torch.where(mask, self.ids[flat].long(), torch.zeros_like(flat))
        log_probs = self.log_probs[flat].masked_fill(~mask, float("-inf"))
        probs = log_probs.double().exp()
        covered = probs.sum(-1)
        dropped = self.dropped_mass.double()
        if max_support is not None:
            total = _segment_sum(self.log_probs.double().exp(), self.offsets)
            dropped = dropped + (total - covered)
        return Support(ids, log_probs, mask, covered.float(), dropped.float())


def _ragged_arange(starts: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Concatenation of arange(starts[i], starts[i] + lengths[i]) over i, without a loop."""
    total = int(lengths.sum())
    if total == 0:
        return torch.zeros(0, dtype=torch.int64)
    seg = torch.repeat_interleave(torch.arange(lengths.numel()), lengths)
    seg_start = torch.cumsum(lengths, 0) - lengths
    return starts[seg] + torch.arange(total) - seg_start[seg]


def _segment_sum(values: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Sum of values[offsets[i]:offsets[i+1]] for each i."""
    lengths = offsets[1:] - offsets[:-1]
    seg = torch.repeat_interleave(torch.arange(lengths.numel()), lengths)
    return torch.zeros(lengths.numel(), dtype=values.dtype).index_add(0, seg, values)
