"""Batched incremental decoding of an HF causal LM over rows that start and stop independently.

Layout: one ``transformers.DynamicCache`` for all B rows, **right-aligned** (left padding).
Every row's latest token sits in the last cache column, so one decode step appends one column
for all rows. Each row carries its own position ids (the number of its real tokens), so rotary
embeddings see positions 0..n-1 whatever the padding; ``mask`` [B, C] marks real columns.

Restarting rows (a partial reset) never re-runs the other rows' prefixes:

1. the n restarted sequences are prefilled alone, left-padded to their own width W;
2. if W exceeds the cache width C, every row is left-padded by W - C zero columns (a memory
   copy, no forward pass);
3. their keys/values are written into their rows' last W columns, earlier columns zeroed and
   masked;
4. leading columns that are padding in every row are trimmed, so C stays the longest live row.

Cost of a restart: one forward over the restarted rows' tokens plus O(B * C) copies per layer
(the same order as one decode step's ``torch.cat`` in ``DynamicCache``). A row may also sit out
a step (``append(..., rows=...)``): it gets a masked column and keeps its last logits.

``use_cache=False`` gives the naive reference: every step re-runs the whole (left-padded)
prefix. Both modes share the bookkeeping, so tests compare them directly.

``forward_seconds`` accumulates wall time spent inside the model's forward calls (what the
env benchmark counts as "raw" compute).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

__all__ = ["IncrementalLM", "context_length", "output_vocab_size"]


def context_length(model) -> int | None:
    """The model's maximum number of positions (``config.max_position_embeddings``), if known."""
    value = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return int(value) if value is not None else None


def output_vocab_size(model) -> int:
    """Width V of the model's logits (its output embedding rows, else ``config.vocab_size``)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return int(model.config.vocab_size)


def _left_pad(
    sequences: Sequence[torch.Tensor], pad_id: int, device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids [n, W] and bool mask [n, W] of 1-D int sequences (each non-empty)."""
    width = max(int(s.numel()) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(sequences), width), dtype=torch.bool, device=device)
    for i, seq in enumerate(sequences):
        n = int(seq.numel())
        ids[i, width - n :] = seq.to(device=device, dtype=torch.long)
        mask[i, width - n :] = True
    return ids, mask


class IncrementalLM:
    """Per-row incremental next-token logits of a causal LM (see the module docstring).

    Args:
        model: an HF causal LM (eval mode; called under ``torch.no_grad``).
        use_cache: keep a KV cache (True) or re-run every prefix each step (False, naive).
        pad_token_id: filler id for padding columns (always masked).

    State after ``start``: ``ids`` int64 [B, C] right-aligned tokens, ``mask`` bool [B, C],
    ``lengths`` int64 [B] real tokens per row, ``last_logits`` float [B, V] next-token logits.
    """

    def __init__(self, model, *, use_cache: bool = True, pad_token_id: int = 0) -> None:
        self.model = model
        self.use_cache = bool(use_cache)
        self.pad_token_id = int(pad_token_id)
        self.device = next(model.parameters()).device
        self.cache = None
        self.ids = torch.zeros((0, 0), dtype=torch.long, device=self.device)
        self.mask = torch.zeros((0, 0), dtype=torch.bool, device=self.device)
        self.lengths = torch.zeros(0, dtype=torch.long, device=self.device)
        self.last_logits: torch.Tensor | None = None
        self.forward_seconds = 0.0
        self.forward_tokens = 0

    @property
    def batch_size(self) -> int:
        return int(self.lengths.numel())

    def _forward(self, ids, mask, positions, cache) -> torch.Tensor:
        start = time.perf_counter()
        with torch.no_grad():
            kwargs = (
                {"cache": cache, "use_cache": True} if cache is not None else {"use_cache": False}
            )
            out = self.model(
                input_ids=ids,
                attention_mask=mask.long(),
                position_ids=positions,
                logits_to_keep=1,
                **kwargs,
            )
        self.forward_seconds += time.perf_counter() - start
        self.forward_tokens += int(ids.numel())
        return out.logits[:, -1]

    def _new_cache(self):
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        cache = DynamicCache(config=self.model.config)
        if any(type(layer) is not DynamicLayer for layer in cache.layers):
            kinds = sorted({type(layer).__name__ for layer in cache.layers})
            raise ValueError(
                f"the model's cache has {kinds} layers; row splicing supports plain DynamicLayer "
                "caches only (full attention). Use kv_cache=False for this model"
            )
        return cache

    def _prefill(self, sequences: Sequence[torch.Tensor]):
        """Forward of left-padded sequences: (logits [n, V], cache or None, ids, mask)."""
        ids, mask = _left_pad(sequences, self.pad_token_id, self.device)
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        cache = self._new_cache() if self.use_cache else None
        logits = self._forward(ids, mask, positions, cache)
        return logits, cache, ids, mask

    def start(self, sequences: Sequence[torch.Tensor]) -> torch.Tensor:
        """(Re)start every row from ``sequences`` (B non-empty 1-D id tensors); logits [B, V]."""
        logits, cache, ids, mask = self._prefill(sequences)
        self.cache, self.ids, self.mask = cache, ids, mask
        self.lengths = mask.sum(-1)
        self.last_logits = logits
        return logits

    def restart_rows(self, rows: torch.Tensor, sequences: Sequence[torch.Tensor]) -> torch.Tensor:
        """Restart rows ``rows`` (int64 [n]) from ``sequences``; other rows keep their cache.

        Returns the restarted rows' next-token logits [n, V] (also written to ``last_logits``).
        """
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.device).reshape(-1)
        if len(sequences) != rows.numel():
            raise ValueError(f"got {rows.numel()} rows but {len(sequences)} sequences")
        every_row = rows.unique().numel() == rows.numel() == self.batch_size
        if self.last_logits is None or every_row:
            if not bool(
                (rows.sort().values == torch.arange(rows.numel(), device=self.device)).all()
            ):
                raise ValueError(
                    f"the first start needs every row 0..n-1 once, got rows={rows.tolist()}"
                )
            order = torch.argsort(rows)
            return self.start([sequences[int(i)] for i in order])[rows]
        logits, cache, ids, mask = self._prefill(sequences)
        width = ids.shape[1]
        grow = width - self.ids.shape[1]
        if grow > 0:
            self._pad_left(grow)
        cols = self.ids.shape[1]
        self.ids[rows] = self.pad_token_id
        self.ids[rows, cols - width :] = ids
        self.mask[rows] = False
        self.mask[rows, cols - width :] = mask
        if self.use_cache:
            for layer, new in zip(self.cache.layers, cache.layers, strict=True):
                for name in ("keys", "values"):
                    old = getattr(layer, name)
                    old[rows] = 0
                    old[rows, :, cols - width :] = getattr(new, name)
        self.lengths[rows] = mask.sum(-1)
        self.last_logits = self.last_logits.clone()
        self.last_logits[rows] = logits.to(self.last_logits.dtype)
        self._trim()
        return logits

    def append(self, tokens: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Append one token per row (int64 [B]) and return the next-token logits [B, V].

        ``rows`` (bool [B]) limits the step to those rows; the others get a masked column
        and keep their previous logits.
        """
        batch = self.batch_size
        tokens = tokens.to(device=self.device, dtype=torch.long).reshape(batch, 1)
        live = (
            torch.ones(batch, dtype=torch.bool, device=self.device)
            if rows is None
            else rows.to(device=self.device, dtype=torch.bool).reshape(batch)
        )
        tokens = torch.where(live[:, None], tokens, torch.full_like(tokens, self.pad_token_id))
        positions = self.lengths[:, None].clone()
        self.ids = torch.cat([self.ids, tokens], 1)
        self.mask = torch.cat([self.mask, live[:, None]], 1)
        self.lengths = self.lengths + live.long()
        if self.use_cache:
            logits = self._forward(tokens, self.mask, positions, self.cache)
        else:
            full_positions = (self.mask.long().cumsum(-1) - 1).clamp(min=0)
            logits = self._forward(self.ids, self.mask, full_positions, None)
        if rows is not None:
            logits = torch.where(live[:, None], logits, self.last_logits.to(logits.dtype))
        self.last_logits = logits
        self._trim()
        return logits

    def _pad_left(self, extra: int) -> None:
        batch = self.batch_size
        self.ids = torch.cat([self.ids.new_full((batch, extra), self.pad_token_id), self.ids], 1)
        self.mask = torch.cat([self.mask.new_zeros((batch, extra)), self.mask], 1)
        if self.use_cache:
            for layer in self.cache.layers:
                for name in ("keys", "values"):
                    old = getattr(layer, name)
                    pad = old.new_zeros((*old.shape[:2], extra, old.shape[3]))
                    setattr(layer, name, torch.cat([pad, old], 2))

    def _trim(self) -> None:
        """Drop leading columns that are padding in every row."""
        if self.mask.shape[1] == 0:
            return
        first = int(self.mask.any(0).long().argmax())
        if first == 0:
            return
        self.ids = self.ids[:, first:]
        self.mask = self.mask[:, first:]
        if self.use_cache:
            for layer in self.cache.layers:
                layer.keys = layer.keys[:, :, first:]
                layer.values = layer.values[:, :, first:]
