"""The teacher's nucleus (top-p set) and the projection of a policy onto it.

Notation (PAPER.md section 2). For a teacher distribution pi_T(.|s) over V tokens:

    A_p(s) = the smallest set of highest-probability tokens with  sum_{a in A_p(s)} pi_T(a|s) >= p

Ranking. Tokens are ranked by their float32 log-probabilities ``log_softmax(logits.float())``,
descending, ties broken by ascending token id, so a nucleus is a *prefix* of one fixed ranking:
the nucleus at p' <= p is a prefix of the nucleus at p. That is what lets a cache stored at
p_store serve any smaller p exactly (see ``RaggedSupport.restrict``). The nucleus is never
empty: the top token is always in it.

Token k of the ranking (0-based) is in A_p iff it has finite logit and the mass ranked before
it is < p:

    k in A_p  <=>  m_k = sum_{j<k} pi_sorted[j] < p,    |A_p| = max(1, #{k : that holds})

The exclusive prefix sums m_k are accumulated sequentially in float64 on the CPU from the
float32 log-probabilities (m_k = the inclusive sum up to k-1, so m is non-decreasing and the
set is a prefix). Every path (dense mask, padded support, ragged restrict) goes through the
same accumulation, so they agree bit for bit, on any device. At p = 1 the nucleus is every
token of finite logit (the unrestricted MDP), whatever float rounding does.

Speed. Sorting a [N, 49152] vocabulary dominates the cost, and the teacher's nuclei are short
(mean ~43 tokens at p = 0.8), so ``top_p_mask`` / ``top_p_support`` first rank only a top-k
prefix (k = 64, then 512, 4096, then the full sort) and stop for a row as soon as its nucleus
provably ends inside the exactly-ranked part of the prefix. The result is identical to the
full sort-and-cumsum (``rank_log_probs`` + ``nucleus_size``); only the work differs.

Forms:
- dense:  ``top_p_mask(logits, p)`` -> bool [..., V]
- padded: ``top_p_support(logits, p)`` -> ``Support`` with ids/log_probs/mask [..., K], where K
  is the batch's own largest nucleus (optionally capped at ``max_support``, the dropped mass
  recorded); entries in ranking order, padding at the end.
- both:   ``top_p_mask_and_support(logits, p)`` -> (dense mask, padded ``Support``) from one
  ranking (an env that exposes both views needs no second sort).
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
    "top_p_mask_and_support",
    "top_p_support",
]

# Top-k prefix lengths tried before the full sort (see the module docstring, "Speed").
_PREFIX_LENGTHS = (64, 512, 4096)


def check_p(p: float, name: str = "p") -> float:
    """Return ``p`` as a float if it lies in (0, 1], else raise ValueError naming it.

    >>> check_p(0.9)
    0.9
    """
    try:
        p = float(p)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in (0, 1], got {name}={p!r}") from None
    if math.isnan(p) or not 0.0 < p <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {name}={p}")
    return p


def _check_max_support(max_support: int | None) -> int | None:
    if max_support is None:
        return None
    if isinstance(max_support, bool) or int(max_support) != max_support or max_support < 1:
        raise ValueError(
            f"max_support must be an integer >= 1 or None, got max_support={max_support}"
        )
    return int(max_support)


def _log_probs(logits: torch.Tensor, name: str = "logits") -> torch.Tensor:
    """Checked float32 log_softmax(logits) over the last dim (the ranking key)."""
    if not isinstance(logits, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dim() == 0 or logits.shape[-1] == 0:
        raise ValueError(
            f"{name} needs a non-empty last (action) dimension, got shape {tuple(logits.shape)}"
        )
    if not logits.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {logits.dtype}")
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    # NaN, +inf, a row of only -inf and float32 overflow all show up as NaN log-probs; one
    # cheap pass here, the diagnosis only on failure. log-probs are never +inf, so their sum
    # is NaN iff one of them is (and a sum is ~20x cheaper than isnan(...).any()).
    if torch.isnan(log_probs.sum()):
        if torch.isnan(logits).any():
            raise ValueError(f"{name} contains NaN; check the model's outputs or the input ids")
        if (logits == float("inf")).any():
            raise ValueError(f"{name} contains +inf; logits must be finite or -inf (masked)")
        if not (logits > float("-inf")).any(dim=-1).all():
            raise ValueError(
                f"{name} has a row whose every entry is -inf: a state must allow at least one "
                "action"
            )
        raise ValueError(
            f"{name} has finite values beyond the float32 range (max {float(logits.max())}); "
            "shift the logits by their row maximum first"
        )
    return log_probs


def rank_log_probs(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher log-probs in ranking order and the token ids of that order (a full sort).

    Args:
        logits: [..., V] teacher logits.

    Returns:
        (sorted_log_probs [..., V] float32, sorted_ids [..., V] int64), descending probability,
        ties by ascending token id (a stable sort of the ids 0..V-1).

    >>> rank_log_probs(torch.tensor([0.0, 1.0, 0.0]))[1]
    tensor([1, 0, 2])
    """
    return torch.sort(_log_probs(logits), dim=-1, descending=True, stable=True)


def _inclusive_mass(sorted_log_probs: torch.Tensor) -> torch.Tensor:
    """float64 CPU [..., K]: sum_{j<=k} pi_sorted[j], accumulated sequentially on the CPU.

    The CPU cumsum is a sequential loop, so the sums over a prefix of a ranking equal the
    prefix of the sums over the whole ranking (what makes the top-k shortcut and
    ``RaggedSupport.restrict`` exact).
    """
    probs = sorted_log_probs.detach().to(device="cpu", dtype=torch.float64).exp()
    return torch.cumsum(probs, dim=-1)


def _count_inside(inclusive: torch.Tensor, finite: torch.Tensor, p: float) -> torch.Tensor:
    """int64 [...]: #{k : finite[k] and sum_{j<k} pi_sorted[j] < p} (a prefix of the ranking)."""
    if p == 1.0:
        return finite.sum(-1)
    below = torch.ones_like(finite)
    below[..., 1:] = inclusive[..., :-1] < p
    return (below & finite).sum(-1)


def nucleus_size(sorted_log_probs: torch.Tensor, p: float) -> torch.Tensor:
    """|A_p| from log-probs in ranking order: max(1, #{k : sum_{j<k} pi_sorted[j] < p}).

    Args:
        sorted_log_probs: [..., K] float log-probs in ranking order (a full ranking or any
            prefix of it that contains the nucleus; -inf entries are never counted, and a row
            of only -inf gets size 1).
        p: nucleus mass in (0, 1].

    Returns:
        int64 [...] nucleus sizes, each in [1, K], on the input's device.

    >>> nucleus_size(torch.tensor([0.5, 0.3, 0.2]).log(), 0.75)
    tensor(2)
    """
    p = check_p(p)
    if sorted_log_probs.dim() == 0 or sorted_log_probs.shape[-1] == 0:
        raise ValueError(
            "sorted_log_probs needs a non-empty last dimension, got shape "
            f"{tuple(sorted_log_probs.shape)}"
        )
    inclusive = _inclusive_mass(sorted_log_probs)
    finite = torch.isfinite(sorted_log_probs.detach()).cpu()
    size = _count_inside(inclusive, finite, p).clamp(min=1)
    return size.to(sorted_log_probs.device)


@dataclass(frozen=True)
class _RankedRows:
    """Exact ranking prefixes of some rows of a [N, V] log-prob matrix (internal).

    rows: int64 [n] row indices; log_probs / ids: [n, w] ranking prefix (w >= every size);
    inclusive: float64 CPU [n, w] inclusive prefix masses; size: int64 CPU [n] nucleus sizes.
    """

    rows: torch.Tensor
    log_probs: torch.Tensor
    ids: torch.Tensor
    inclusive: torch.Tensor
    size: torch.Tensor


def _full_rank(log_probs: torch.Tensor, rows: torch.Tensor, p: float) -> _RankedRows:
    all_rows = rows.numel() == log_probs.shape[0] and bool(
        (rows == torch.arange(rows.numel(), device=rows.device)).all()
    )
    block = log_probs if all_rows else log_probs[rows]
    sorted_log_probs, sorted_ids = torch.sort(block, dim=-1, descending=True, stable=True)
    inclusive = _inclusive_mass(sorted_log_probs)
    finite = torch.isfinite(sorted_log_probs).cpu()
    size = _count_inside(inclusive, finite, p).clamp(min=1)
    width = int(size.max()) if size.numel() else 1
    return _RankedRows(
        rows,
        sorted_log_probs[:, :width],
        sorted_ids[:, :width],
        inclusive[:, :width],
        size,
    )


def _prefix_rank(
    log_probs: torch.Tensor, rows: torch.Tensor | None, k: int, p: float
) -> tuple[_RankedRows, torch.Tensor, torch.Tensor]:
    """Rank the top-k of some rows exactly and find the rows whose nucleus ends inside.

    topk's choice among entries equal to its k-th value is unspecified, so only the entries
    strictly above the k-th value (all of which are in the top-k) form an exact prefix of the
    ranking; a row is resolved when its nucleus ends inside that prefix (or when the k-th
    value is -inf, i.e. every finite entry is in the top-k).

    Returns:
        (ranked rows that resolved, unresolved row indices, their top-k prefix: float32 CPU
        [n_unresolved, k] log-probs in ranking order).
    """
    block = log_probs if rows is None else log_probs[rows]
    if rows is None:
        rows = torch.arange(block.shape[0], device=block.device)
    values, ids = torch.topk(block, k, dim=-1, largest=True, sorted=True)
    ids, by_id = torch.sort(ids, dim=-1)
    values = values.gather(-1, by_id)
    values, by_value = torch.sort(values, dim=-1, descending=True, stable=True)
    ids = ids.gather(-1, by_value)
    values_cpu = values.detach().cpu()
    inclusive = _inclusive_mass(values_cpu)
    kth = values_cpu[:, -1:]
    exact = (values_cpu > kth).sum(-1)
    ranks = torch.arange(k)
    inside = _count_inside(inclusive, torch.isfinite(values_cpu) & (ranks < exact[:, None]), p)
    resolved = (inside < exact) | (kth.squeeze(-1) == float("-inf"))
    done = resolved.nonzero().squeeze(-1)
    todo = (~resolved).nonzero().squeeze(-1)
    size = inside[done]
    width = int(size.max()) if size.numel() else 1
    done_dev = done.to(block.device)
    ranked = _RankedRows(
        rows[done_dev],
        values[done_dev, :width],
        ids[done_dev, :width],
        inclusive[done, :width],
        size,
    )
    return ranked, rows[todo.to(block.device)], values_cpu[todo]


def _next_level(prefix: torch.Tensor, lengths: list[int], index: int, p: float) -> torch.Tensor:
    """For unresolved rows, the index into ``lengths`` of the next top-k to try (len = full sort).

    A row tries the first longer prefix k' that passes two tests on its top-k log-probs
    ``prefix`` [n, k] (a speed heuristic only: the result never depends on it):
    - the bound  mass(top-k) + (k' - k) pi_(k) >= p  (each later token has probability <= the
      k-th), without which the nucleus certainly does not end inside the top-k';
    - a power-law extrapolation pi_(r) ~ pi_(k) (r/k)^-a, with a fitted on ranks k/2 and k, that
      predicts mass(top-k') >= p (flat rows, e.g. random logits, go straight to the full sort).
    """
    k = prefix.shape[-1]
    log_half, log_kth = prefix[:, k // 2 - 1].double(), prefix[:, -1].double()
    mass = _inclusive_mass(prefix)[:, -1]
    kth = log_kth.exp()
    decay = ((log_half - log_kth) / math.log(2.0)).clamp(min=0.0)
    level = torch.full((prefix.shape[0],), len(lengths), dtype=torch.int64)
    for later in range(len(lengths) - 1, index, -1):
        ratio = lengths[later] / k
        flat_tail = (lengths[later] - k) * kth
        power = 1.0 - decay
        tail = torch.where(
            power.abs() < 1e-6,
            k * kth * math.log(ratio),
            k * kth * (ratio**power - 1.0) / torch.where(power.abs() < 1e-6, 1.0, power),
        )
        worth = (mass + flat_tail >= p) & (mass + tail >= p)
        level = torch.where(worth, torch.full_like(level, later), level)
    return level


def _rank_nuclei(log_probs: torch.Tensor, p: float) -> list[_RankedRows]:
    """Exact ranking prefixes covering the nucleus of every row of [N, V] log-probs.

    Rows go through the top-k prefixes of ``_PREFIX_LENGTHS`` and then the full sort, skipping
    the lengths ``_next_level`` predicts to be too short. Which path a row takes changes only
    the work, never the result.
    """
    n, vocab = log_probs.shape
    device = log_probs.device
    lengths = [k for k in _PREFIX_LENGTHS if k < vocab] if p < 1.0 else []
    ranked: list[_RankedRows] = []
    # Pending rows and, for each, the index into `lengths` of its next prefix length
    # (len(lengths) = the full sort). None = every row, still at the first length.
    pending: torch.Tensor | None = None
    level = torch.zeros(n, dtype=torch.int64)
    for index, k in enumerate(lengths):
        rows = None
        if pending is not None:
            here = level == index
            rows = pending[here.to(device)]
            pending, level = pending[(~here).to(device)], level[~here]
            if rows.numel() == 0:
                continue
        done, todo, prefix = _prefix_rank(log_probs, rows, k, p)
        ranked.append(done)
        if todo.numel() == 0 and (pending is None or pending.numel() == 0):
            pending = todo  # every row resolved: the longer prefixes have nothing to do
            break
        next_level = _next_level(prefix, lengths, index, p)
        if pending is None:
            pending, level = todo, next_level
        else:
            pending, level = torch.cat([pending, todo]), torch.cat([level, next_level])
    rest = torch.arange(n, device=device) if pending is None else pending
    if rest.numel():
        ranked.append(_full_rank(log_probs, rest, p))
    return ranked


def _dense_mask(parts: list[_RankedRows], log_probs: torch.Tensor) -> torch.Tensor:
    """bool [N, V]: True on each row's nucleus, from the ranked rows of [N, V] log-probs."""
    n, vocab = log_probs.shape
    dense = torch.zeros(n * vocab, dtype=torch.bool, device=log_probs.device)
    for part in parts:
        inside = (torch.arange(part.ids.shape[-1]) < part.size.unsqueeze(-1)).to(dense.device)
        dense[(part.rows.unsqueeze(-1) * vocab + part.ids)[inside]] = True
    return dense.reshape(n, vocab)


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
    log_probs = _log_probs(logits)
    if p == 1.0:
        return torch.isfinite(log_probs)
    flat = log_probs.reshape(-1, log_probs.shape[-1])
    return _dense_mask(_rank_nuclei(flat, p), flat).reshape(logits.shape)


@dataclass(frozen=True)
class Support:
    """A padded sparse nucleus, K = the batch's own largest support.

    Attributes:
        ids: int64 [..., K] token ids in ranking order (0 at padding).
        log_probs: float32 [..., K] teacher log-probs log pi_T(a|s) (-inf at padding).
        mask: bool [..., K] True for real entries (a prefix of each row).
        covered_mass: float32 [...] teacher mass of the kept entries.
        dropped_mass: float32 [...] teacher mass of nucleus entries removed by ``max_support``
            (exactly 0 where the cap did not bite).
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


def _mass_at(inclusive: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """float64 [n]: inclusive[i, count[i] - 1] (the mass of the first count[i] entries)."""
    return inclusive.gather(-1, (count - 1).clamp(min=0).unsqueeze(-1)).squeeze(-1)


def _padded_support(
    parts: list[_RankedRows], n: int, device: torch.device, cap: int | None
) -> Support:
    """``Support`` [N, K] from the ranked rows of N states (K = largest kept nucleus)."""
    size = torch.ones(n, dtype=torch.int64)
    for part in parts:
        size[part.rows.cpu()] = part.size
    kept = size if cap is None else size.clamp(max=cap)
    width = max(int(kept.max()) if n else 1, 1)
    ids = torch.zeros((n, width), dtype=torch.int64, device=device)
    ranked_log_probs = torch.full((n, width), float("-inf"), dtype=torch.float32, device=device)
    covered = torch.zeros(n, dtype=torch.float64)
    nucleus = torch.zeros(n, dtype=torch.float64)
    for part in parts:
        cols = min(part.ids.shape[-1], width)
        ids[part.rows, :cols] = part.ids[:, :cols]
        ranked_log_probs[part.rows, :cols] = part.log_probs[:, :cols]
        rows_cpu = part.rows.cpu()
        covered[rows_cpu] = _mass_at(part.inclusive, kept[rows_cpu])
        nucleus[rows_cpu] = _mass_at(part.inclusive, part.size)
    mask = (torch.arange(width) < kept.unsqueeze(-1)).to(device)
    return Support(
        ids=ids.masked_fill(~mask, 0),
        log_probs=ranked_log_probs.masked_fill(~mask, float("-inf")),
        mask=mask,
        covered_mass=covered.float().to(device),
        dropped_mass=(nucleus - covered).float().to(device),
    )


def _reshape_support(support: Support, lead: torch.Size) -> Support:
    """A flat [N, K] ``Support`` with its N states laid out as ``lead`` (prod(lead) = N)."""
    width = support.ids.shape[-1]
    return Support(
        ids=support.ids.reshape(*lead, width),
        log_probs=support.log_probs.reshape(*lead, width),
        mask=support.mask.reshape(*lead, width),
        covered_mass=support.covered_mass.reshape(lead),
        dropped_mass=support.dropped_mass.reshape(lead),
    )


def top_p_support(logits: torch.Tensor, p: float, *, max_support: int | None = None) -> Support:
    """Sparse nucleus of the teacher, padded to the batch's own largest support.

    Args:
        logits: [..., V] teacher logits.
        p: nucleus mass in (0, 1].
        max_support: optional cap on K; entries past it are dropped and their mass is
            recorded in ``dropped_mass`` (the kept ones are still the top ones).

    Returns:
        ``Support`` with [..., K] ids / log_probs / mask and [...] covered / dropped mass.

    >>> s = top_p_support(torch.tensor([[2.0, 1.0, 0.0], [0.0, 5.0, 0.0]]), 0.7)
    >>> s.ids.tolist(), s.mask.tolist()
    ([[0, 1], [1, 0]], [[True, True], [True, False]])
    """
    p = check_p(p)
    cap = _check_max_support(max_support)
    log_probs = _log_probs(logits)
    flat = log_probs.reshape(-1, log_probs.shape[-1])
    support = _padded_support(_rank_nuclei(flat, p), flat.shape[0], flat.device, cap)
    return _reshape_support(support, log_probs.shape[:-1])


def top_p_mask_and_support(
    logits: torch.Tensor, p: float, *, max_support: int | None = None
) -> tuple[torch.Tensor, Support]:
    """Dense mask and padded support of the teacher's nucleus from one ranking.

    Equals ``(top_p_mask(logits, p), top_p_support(logits, p, max_support=max_support))`` bit
    for bit, ranking the vocabulary once instead of twice. With a cap the dense mask still
    holds the whole nucleus, so |A_p| = mask.sum(-1) and

        pi_T(A_p) = covered_mass + dropped_mass.

    Args:
        logits: [..., V] teacher logits.
        p: nucleus mass in (0, 1].
        max_support: optional cap on the support's K (not on the dense mask).

    Returns:
        (bool [..., V] nucleus mask, ``Support`` with [..., K] entries).

    >>> mask, s = top_p_mask_and_support(torch.tensor([[2.0, 1.0, 0.0]]), 0.7, max_support=1)
    >>> mask.tolist(), s.ids.tolist(), s.dropped_mass.gt(0).tolist()
    ([[True, True, False]], [[0]], [True])
    """
    p = check_p(p)
    cap = _check_max_support(max_support)
    log_probs = _log_probs(logits)
    flat = log_probs.reshape(-1, log_probs.shape[-1])
    parts = _rank_nuclei(flat, p)
    dense = torch.isfinite(log_probs) if p == 1.0 else _dense_mask(parts, flat)
    support = _padded_support(parts, flat.shape[0], flat.device, cap)
    return dense.reshape(logits.shape), _reshape_support(support, log_probs.shape[:-1])


def support_to_mask(ids: torch.Tensor, mask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Dense bool [..., V] mask from a padded support (ids int [..., K], mask bool [..., K]).

    >>> support_to_mask(torch.tensor([2, 0]), torch.tensor([True, False]), 4)
    tensor([False, False,  True, False])
    """
    if ids.shape != mask.shape:
        raise ValueError(
            f"ids and mask must have the same shape, got {tuple(ids.shape)} and {tuple(mask.shape)}"
        )
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor, got dtype {mask.dtype}")
    if int(vocab_size) < 1:
        raise ValueError(f"vocab_size must be >= 1, got vocab_size={vocab_size}")
    real = ids[mask]
    if real.numel() and (int(real.max()) >= vocab_size or int(real.min()) < 0):
        raise ValueError(
            f"support ids must lie in [0, {vocab_size}), got ids in "
            f"[{int(real.min())}, {int(real.max())}]; is vocab_size the teacher's vocabulary?"
        )
    dense = torch.zeros((*ids.shape[:-1], vocab_size), dtype=torch.bool, device=ids.device)
    # Padding entries may carry any id with mask False; scatter with "amax" so they never
    # erase a real entry.
    safe_ids = ids.long().masked_fill(~mask, 0)
    return dense.scatter_reduce(-1, safe_ids, mask, reduce="amax")


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
        [..., K] gathered values (differentiable w.r.t. ``values``).

    >>> gather_support(torch.tensor([0.0, 1.0, 2.0]), torch.tensor([2, 0]),
    ...                torch.tensor([True, False]))
    tensor([2., -inf])
    """
    if values.shape[:-1] != ids.shape[:-1] or ids.shape != mask.shape:
        raise ValueError(
            "values [..., V], ids [..., K] and mask [..., K] must share leading dims, got "
            f"values {tuple(values.shape)}, ids {tuple(ids.shape)}, mask {tuple(mask.shape)}"
        )
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor, got dtype {mask.dtype}")
    safe_ids = ids.long().masked_fill(~mask, 0)
    real = safe_ids[mask]
    if real.numel() and (int(real.max()) >= values.shape[-1] or int(real.min()) < 0):
        raise ValueError(
            f"support ids must lie in [0, {values.shape[-1]}) (the last dim of values), got ids "
            f"in [{int(real.min())}, {int(real.max())}]"
        )
    gathered = torch.gather(values, -1, safe_ids)
    return gathered.masked_fill(~mask, fill)


def proj_p_log_probs(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log proj_p(softmax(logits)): log-softmax over the allowed entries, -inf elsewhere.

        log proj_p(pi)(a|s) = logits(a) - log sum_{b : mask(b)} exp logits(b)   (mask(a))

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
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor, got dtype {mask.dtype}")
    if mask.dim() == 0 or mask.shape[-1] == 0 or not mask.any(dim=-1).all():
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

    >>> store = RaggedSupport.from_logits(torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]]), 0.9)
    >>> store.lengths.tolist(), store.restrict(0.5).lengths.tolist()
    ([3, 3], [1, 2])
    """

    offsets: torch.Tensor
    ids: torch.Tensor
    log_probs: torch.Tensor
    p: float
    dropped_mass: torch.Tensor

    def __post_init__(self) -> None:
        n = self.offsets.numel() - 1
        if self.offsets.dim() != 1 or n < 0:
            raise ValueError(f"offsets must be 1-D [N + 1], got shape {tuple(self.offsets.shape)}")
        if int(self.offsets[0]) != 0 or int(self.offsets[-1]) != self.ids.numel():
            raise ValueError(
                f"offsets must start at 0 and end at nnz={self.ids.numel()}, got "
                f"{self.offsets[:1].tolist()}..{self.offsets[-1:].tolist()}"
            )
        if self.ids.dim() != 1 or self.ids.shape != self.log_probs.shape:
            raise ValueError(
                f"ids and log_probs must be 1-D of the same length, got {tuple(self.ids.shape)} "
                f"and {tuple(self.log_probs.shape)}"
            )
        if n and bool((self.offsets[1:] <= self.offsets[:-1]).any()):
            raise ValueError("every state needs a non-empty nucleus (offsets must increase)")
        if self.dropped_mass.shape != (n,):
            raise ValueError(
                f"dropped_mass must have shape ({n},), got {tuple(self.dropped_mass.shape)}"
            )
        check_p(self.p)

    def __len__(self) -> int:
        return self.offsets.numel() - 1

    @property
    def lengths(self) -> torch.Tensor:
        """int64 [N] nucleus sizes."""
        return self.offsets[1:] - self.offsets[:-1]

    @classmethod
    def from_support(cls, support: Support, p: float) -> RaggedSupport:
        """Flatten a padded ``Support`` (any leading dims) into N = prod(leading) states."""
        mask = support.mask.reshape(-1, support.mask.shape[-1]).cpu()
        lengths = mask.sum(-1)
        offsets = torch.zeros(lengths.numel() + 1, dtype=torch.int64)
        offsets[1:] = torch.cumsum(lengths, 0)
        return cls(
            offsets=offsets,
            ids=support.ids.reshape(mask.shape).cpu()[mask].to(torch.int32),
            log_probs=support.log_probs.reshape(mask.shape).cpu()[mask].float(),
            p=check_p(p),
            dropped_mass=support.dropped_mass.reshape(-1).float().cpu(),
        )

    @classmethod
    def from_logits(
        cls, logits: torch.Tensor, p: float, *, max_support: int | None = None
    ) -> RaggedSupport:
        """Nuclei of [N, V] (or [..., V]) teacher logits in ragged form."""
        return cls.from_support(top_p_support(logits, p, max_support=max_support), p)

    def select(self, index: torch.Tensor | slice | list[int] | int) -> RaggedSupport:
        """The states ``index`` (a slice, an int, a list or a 1-D int tensor), in that order."""
        rows = torch.arange(len(self))[index].reshape(-1)
        starts, ends = self.offsets[rows], self.offsets[rows + 1]
        lengths = ends - starts
        offsets = torch.zeros(rows.numel() + 1, dtype=torch.int64)
        offsets[1:] = torch.cumsum(lengths, 0)
        flat = _ragged_arange(starts, lengths)
        return RaggedSupport(
            offsets, self.ids[flat], self.log_probs[flat], self.p, self.dropped_mass[rows]
        )

    def _padded_log_probs(self) -> torch.Tensor:
        """float32 [N, K_max] stored log-probs, -inf at padding."""
        width = max(int(self.lengths.max()) if len(self) else 1, 1)
        ranks = torch.arange(width)
        inside = ranks < self.lengths.unsqueeze(-1)
        flat = (self.offsets[:-1].unsqueeze(-1) + ranks).masked_fill(~inside, 0)
        flat = flat.clamp(max=max(self.ids.numel() - 1, 0))
        return self.log_probs[flat].masked_fill(~inside, float("-inf"))

    def restrict(self, p: float) -> RaggedSupport:
        """The nuclei at p <= self.p, re-derived exactly as a prefix of each stored nucleus.

        ids and log_probs equal those of a fresh ``top_p_support(logits, p, max_support=cap)``
        bit for bit. With an uncapped store the dropped mass is 0. With a store capped at
        ``max_support``, a state whose nucleus at p still exceeds the cap (its stored entries
        hold mass c < p) keeps all its entries and gets dropped_mass = p - c, a lower bound on
        the true value, which lies in [p - c, p - c + pi_last) (pi_last = the smallest stored
        probability): the entries past the cap are not stored.
        """
        p = check_p(p)
        if p > self.p:
            raise ValueError(
                f"p={p} is above the mass the supports were stored at (p_store={self.p}); "
                "re-run `tdkd prepare` with a larger --p-store or train with p <= p_store"
            )
        if p == self.p:
            return self
        padded = self._padded_log_probs()
        inclusive = _inclusive_mass(padded)
        size = _count_inside(inclusive, torch.isfinite(padded), p).clamp(min=1)
        stored_mass = _mass_at(inclusive, self.lengths)
        still_capped = (self.dropped_mass > 0) & (stored_mass < p)
        dropped = (p - stored_mass).clamp(min=0).float().minimum(self.dropped_mass)
        offsets = torch.zeros(len(self) + 1, dtype=torch.int64)
        offsets[1:] = torch.cumsum(size, 0)
        flat = _ragged_arange(self.offsets[:-1], size)
        return RaggedSupport(
            offsets,
            self.ids[flat],
            self.log_probs[flat],
            p,
            torch.where(still_capped, dropped, torch.zeros_like(self.dropped_mass)),
        )

    def to_padded(self, max_support: int | None = None) -> Support:
        """Padded [N, K] form, K = the largest stored nucleus (or at most ``max_support``).

        Entries past ``max_support`` are dropped and their mass is added to ``dropped_mass``;
        covered and dropped mass equal those of ``top_p_support(logits, p, max_support=...)``.
        """
        cap = _check_max_support(max_support)
        padded = self._padded_log_probs()
        inclusive = _inclusive_mass(padded)
        lengths = self.lengths
        kept = lengths if cap is None else lengths.clamp(max=cap)
        width = max(int(kept.max()) if len(self) else 1, 1)
        ranks = torch.arange(width)
        mask = ranks < kept.unsqueeze(-1)
        flat = (self.offsets[:-1].unsqueeze(-1) + ranks).masked_fill(~mask, 0)
        flat = flat.clamp(max=max(self.ids.numel() - 1, 0))
        ids = self.ids[flat].long().masked_fill(~mask, 0)
        covered = _mass_at(inclusive, kept)
        cut = _mass_at(inclusive, lengths) - covered
        return Support(
            ids=ids,
            log_probs=padded[:, :width].masked_fill(~mask, float("-inf")),
            mask=mask,
            covered_mass=covered.float(),
            dropped_mass=(self.dropped_mass.double() + cut).float(),
        )


def _ragged_arange(starts: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Concatenation of arange(starts[i], starts[i] + lengths[i]) over i, without a loop."""
    total = int(lengths.sum())
    if total == 0:
        return torch.zeros(0, dtype=torch.int64)
    seg = torch.repeat_interleave(torch.arange(lengths.numel()), lengths)
    seg_start = torch.cumsum(lengths, 0) - lengths
    return starts[seg] + torch.arange(total) - seg_start[seg]
