"""The sparse teacher cache: the teacher's nucleus at every response token, on disk.

What is stored (per response token i of a row, i.e. per state s_i = prompt + response[:i]):

    A_{p_store}(s_i)          size + ids in ranking order (uint16 when V < 65536, else int32)
    log pi_T(a | s_i)         float32 full-softmax log-probs on those ids
    dropped_mass(s_i)         float32 nucleus mass cut by ``max_support`` (stored only with a cap)
    log pi_T(a_i | s_i)       float32 log-prob of the token the response actually took

i.e. 6 bytes per nucleus entry and 6 per response token (+ 2 per prompt/response token id).

plus the rows' tokens, prompt lengths, splits and EOS flags. Because a nucleus at p <= p_store
is a prefix of the one at p_store (see ``tdkd.topp``), the reader re-derives any smaller p
exactly with ``RaggedSupport.restrict``; covered mass is recomputed from the kept log-probs.

Layout of a cache folder (format version ``FORMAT_VERSION``)::

    manifest.json         fingerprint, p_store, vocab, shard list with byte layout and SHA-256
    shard-00000.bin ...   raw little-endian arrays, 64-byte aligned, read with numpy.memmap

The folder is built under a temporary name and renamed into place when complete. Opening it
checks the format version and, when given, the expected fingerprint (teacher id, weights hash,
tokenizer hash, p_store, data hash); every shard's size is checked (a truncated shard is an
error) and, with ``verify=True`` (default), its SHA-256 too (a corrupted shard is an error).

Usage (``tdkd prepare`` writes ``runs/prepare/cache`` by default)::

    cache = TeacherCache("runs/prepare/cache", expect=teacher_fingerprint(teacher, tokenizer))
    for batch in cache.iter_batches(8, split="train", p=0.8, max_support=256, seed=epoch):
        ...  # the offline batch TensorDict, see TeacherCache.batch

Support extraction (``extract_supports``) is ``tdkd.topp.RaggedSupport.from_logits`` plus the
log-prob of the action taken; ``tdkd bench cache`` measures its cost against the teacher's
scoring forward.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from tdkd.io import file_sha256, replace_directory
from tdkd.topp import RaggedSupport, check_p

__all__ = [
    "FORMAT_VERSION",
    "CacheWriter",
    "ScoreTimings",
    "TeacherCache",
    "build_cache",
    "data_hash",
    "epoch_order",
    "extract_supports",
    "score_batch",
    "support_stats",
    "teacher_fingerprint",
]

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
MANIFEST = "manifest.json"
SPLIT_CODES = {"train": 0, "validation": 1, "test": 2}
_ALIGN = 64
# Fingerprint entries recorded for people, not compared on open.
_INFORMATIVE_KEYS = frozenset({"teacher_id"})


# ----------------------------------------------------------------------------- fingerprint


def teacher_fingerprint(model, tokenizer) -> dict:
    """The teacher part of a cache fingerprint: id, weights hash and tokenizer hash."""
    from tdkd.models import model_id, tokenizer_hash, weights_hash

    return {
        "teacher_id": model_id(model),
        "teacher_weights_hash": weights_hash(model),
        "tokenizer_hash": tokenizer_hash(tokenizer),
    }


def data_hash(rows: Sequence[tuple[int, Sequence[int], Sequence[int]]]) -> str:
    """SHA-256 (16 hex) of (row_id, prompt_ids, response_ids) triples, in order."""
    digest = hashlib.sha256()
    for row_id, prompt_ids, response_ids in rows:
        digest.update(
            np.asarray([row_id, len(prompt_ids), len(response_ids)], dtype=np.int64).tobytes()
        )
        digest.update(np.asarray(prompt_ids, dtype=np.int64).tobytes())
        digest.update(np.asarray(response_ids, dtype=np.int64).tobytes())
    return digest.hexdigest()[:16]


# ----------------------------------------------------------------------------- extraction


def extract_supports(
    logits: torch.Tensor,
    actions: torch.Tensor,
    p: float,
    *,
    max_support: int | None = None,
) -> tuple[RaggedSupport, torch.Tensor]:
    """Nuclei of N states and the log-prob of the action taken in each.

    The nuclei are ``RaggedSupport.from_logits`` (tdkd.topp's ranking, which ranks a top-k
    prefix and sorts the whole vocabulary only for rows that need it); the action log-prob
    uses the same float32 log-softmax, so it equals the stored log-prob whenever the action
    is in the nucleus.

    Args:
        logits: [N, V] teacher logits.
        actions: int [N] the token taken at each state.
        p: nucleus mass in (0, 1].
        max_support: optional cap; entries past it are dropped, their mass recorded.

    Returns:
        (RaggedSupport at p, teacher_log_prob float32 [N] = log softmax(logits)[actions]).
    """
    if logits.dim() != 2 or actions.shape != logits.shape[:1]:
        raise ValueError(
            f"logits must be [N, V] and actions [N], got {tuple(logits.shape)} and "
            f"{tuple(actions.shape)}"
        )
    support = RaggedSupport.from_logits(logits, p, max_support=max_support)
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    action_log_prob = log_probs.gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)
    return support, action_log_prob


@dataclass
class ScoreTimings:
    """Seconds spent in the teacher's scoring forward, in support extraction and in writing."""

    forward_s: float = 0.0
    extract_s: float = 0.0
    write_s: float = 0.0
    tokens: int = 0


@torch.inference_mode()
def score_batch(
    model,
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    *,
    pad_token_id: int,
    p_store: float,
    max_support: int | None = None,
    timings: ScoreTimings | None = None,
) -> tuple[RaggedSupport, torch.Tensor]:
    """Teacher nuclei at every response token of a batch of rows (one forward pass).

    The state before response token i sits at position j - 1 of the right-padded
    prompt+response sequence (j = the token's position), so its logits are logits[:, j-1].

    Returns:
        (RaggedSupport over the batch's response tokens in row-major order,
        teacher_log_prob float32 [S]).
    """
    from tdkd.data import pad_sequences

    timings = timings if timings is not None else ScoreTimings()
    tokens, attention, response = pad_sequences(prompt_ids, response_ids, pad_token_id)
    if any(len(p) == 0 for p in prompt_ids):
        raise ValueError("every row needs a non-empty prompt (the first state needs a context)")
    device = next(model.parameters()).device
    start = time.perf_counter()
    logits = model(input_ids=tokens.to(device), attention_mask=attention.long().to(device)).logits
    state_logits = logits[:, :-1][response[:, 1:].to(device)].cpu()
    timings.forward_s += time.perf_counter() - start
    start = time.perf_counter()
    support, action_log_prob = extract_supports(
        state_logits, tokens[response], p_store, max_support=max_support
    )
    timings.extract_s += time.perf_counter() - start
    timings.tokens += int(response.sum())
    return support, action_log_prob


# ----------------------------------------------------------------------------- writing


def _layout(arrays: Mapping[str, np.ndarray]) -> tuple[dict, int]:
    offset, layout = 0, {}
    for name, array in arrays.items():
        layout[name] = [array.dtype.str, offset, int(array.size)]
        offset += -(-array.nbytes // _ALIGN) * _ALIGN
    return layout, offset


class CacheWriter:
    """Writes a cache folder atomically: rows are added, ``close()`` renames it into place.

    Use as a context manager; an exception inside removes the temporary folder, so nothing
    half-written is ever left under ``path``.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        fingerprint: Mapping,
        vocab_size: int,
        pad_token_id: int,
        shard_rows: int = 256,
        overwrite: bool = False,
        extra: Mapping | None = None,
    ) -> None:
        self.path = Path(path)
        if self.path.exists() and not overwrite:
            raise ValueError(f"{self.path} already exists; pass overwrite=True or pick a new path")
        for key in ("p_store", "data_hash"):
            if key not in fingerprint:
                raise ValueError(f"fingerprint needs {key!r}, got keys {sorted(fingerprint)}")
        self.fingerprint = {"format_version": FORMAT_VERSION, **fingerprint}
        self.vocab_size = int(vocab_size)
        # Token ids and nucleus sizes (both < V, or <= V) fit 16 bits for vocabularies
        # below 65536 tokens; dropped mass is only stored when a cap can make it non-zero.
        self.id_dtype = np.dtype("<u2") if self.vocab_size < 65536 else np.dtype("<i4")
        self.store_dropped = fingerprint.get("max_support") is not None
        self.pad_token_id = int(pad_token_id)
        self.shard_rows = int(shard_rows)
        self.extra = dict(extra or {})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.tmp-", dir=self.path.parent))
        self._pending: list[dict] = []
        self._shards: list[dict] = []
        self._closed = False
        self.bytes_written = 0

    def add(
        self,
        *,
        row_id: int,
        split: str,
        prompt_ids: Sequence[int],
        response_ids: Sequence[int],
        terminated: bool,
        support: RaggedSupport,
        teacher_log_prob: torch.Tensor,
    ) -> None:
        """Add one row; ``support`` and ``teacher_log_prob`` cover its response tokens."""
        if split not in SPLIT_CODES:
            raise ValueError(f"split must be one of {list(SPLIT_CODES)}, got {split!r}")
        if len(support) != len(response_ids) or teacher_log_prob.shape != (len(response_ids),):
            raise ValueError(
                f"row {row_id}: {len(response_ids)} response tokens but {len(support)} supports "
                f"and {tuple(teacher_log_prob.shape)} log-probs"
            )
        self._pending.append(
            dict(
                row_id=row_id,
                split=split,
                prompt_ids=list(prompt_ids),
                response_ids=list(response_ids),
                terminated=bool(terminated),
                support=support,
                teacher_log_prob=teacher_log_prob.float().cpu(),
            )
        )
        if len(self._pending) >= self.shard_rows:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        rows, self._pending = self._pending, []
        lengths = [len(r["prompt_ids"]) + len(r["response_ids"]) for r in rows]
        states = [len(r["response_ids"]) for r in rows]
        supports = [r["support"] for r in rows]
        nnz = [int(s.offsets[-1]) for s in supports]
        dropped = np.concatenate([s.dropped_mass.numpy() for s in supports]).astype("<f4")
        if not self.store_dropped and np.any(dropped != 0):
            raise ValueError("supports carry dropped mass but the fingerprint has max_support=None")
        arrays = {
            "row_id": np.asarray([r["row_id"] for r in rows], dtype="<i8"),
            "split": np.asarray([SPLIT_CODES[r["split"]] for r in rows], dtype="u1"),
            "terminated": np.asarray([r["terminated"] for r in rows], dtype="u1"),
            "prompt_len": np.asarray([len(r["prompt_ids"]) for r in rows], dtype="<i4"),
            "token_offsets": np.concatenate([[0], np.cumsum(lengths)]).astype("<i8"),
            "tokens": np.concatenate(
                [np.asarray(r["prompt_ids"] + r["response_ids"]) for r in rows]
            ).astype(self.id_dtype),
            "state_offsets": np.concatenate([[0], np.cumsum(states)]).astype("<i8"),
            "support_sizes": np.concatenate([s.lengths.numpy() for s in supports]).astype(
                self.id_dtype
            ),
            "support_ids": np.concatenate([s.ids.numpy() for s in supports]).astype(self.id_dtype),
            "support_log_probs": np.concatenate([s.log_probs.numpy() for s in supports]).astype(
                "<f4"
            ),
            **({"dropped_mass": dropped} if self.store_dropped else {}),
            "teacher_log_prob": np.concatenate(
                [r["teacher_log_prob"].numpy() for r in rows]
            ).astype("<f4"),
        }
        layout, size = _layout(arrays)
        name = f"shard-{len(self._shards):05d}.bin"
        buffer = bytearray(size)
        for key, array in arrays.items():
            offset = layout[key][1]
            buffer[offset : offset + array.nbytes] = array.tobytes()
        (self._tmp / name).write_bytes(buffer)
        self.bytes_written += size
        self._shards.append(
            {
                "file": name,
                "rows": len(rows),
                "states": int(sum(states)),
                "nnz": int(sum(nnz)),
                "bytes": size,
                "sha256": hashlib.sha256(buffer).hexdigest(),
                "arrays": layout,
            }
        )

    def close(self) -> Path:
        """Write the manifest and move the finished cache to ``path``."""
        if self._closed:
            return self.path
        self._flush()
        if not self._shards:
            self.abort()
            raise ValueError("no rows were added to the cache; give at least one response")
        manifest = {
            "format_version": FORMAT_VERSION,
            "fingerprint": self.fingerprint,
            "vocab_size": self.vocab_size,
            "pad_token_id": self.pad_token_id,
            "id_dtype": self.id_dtype.str,
            "rows": sum(s["rows"] for s in self._shards),
            "states": sum(s["states"] for s in self._shards),
            "nnz": sum(s["nnz"] for s in self._shards),
            "shards": self._shards,
            **({"extra": self.extra} if self.extra else {}),
        }
        (self._tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        replace_directory(self._tmp, self.path)
        self._closed = True
        return self.path

    def abort(self) -> None:
        shutil.rmtree(self._tmp, ignore_errors=True)
        self._closed = True

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        else:
            self.close()


def build_cache(
    model,
    tokenizer,
    rows: Sequence[Mapping],
    path: str | os.PathLike,
    *,
    p_store: float = 0.95,
    max_support: int | None = None,
    batch_size: int = 8,
    overwrite: bool = False,
    progress: bool = False,
    timings: ScoreTimings | None = None,
) -> Path:
    """Score response rows with the teacher and write the sparse cache at ``path``.

    Args:
        rows: mappings with row_id, split, prompt_ids, response_ids, terminated (e.g. the
            ``datasets.Dataset`` of ``tdkd.data.generate_responses``).
        p_store: the largest p the cache can serve.
        max_support: optional cap on stored supports (dropped mass recorded).
        timings: filled with the forward / extraction / write seconds.
    """
    p_store = check_p(p_store, "p_store")
    if len(rows) == 0:
        raise ValueError("no responses to cache; generate some first")
    timings = timings if timings is not None else ScoreTimings()
    records = [
        (
            int(r["row_id"]),
            list(r["prompt_ids"]),
            list(r["response_ids"]),
            r["split"],
            bool(r["terminated"]),
        )
        for r in rows
    ]
    fingerprint = {
        **teacher_fingerprint(model, tokenizer),
        "p_store": p_store,
        "max_support": max_support,
        "data_hash": data_hash([(i, p, r) for i, p, r, _, _ in records]),
    }
    # Rows with similar lengths together pad least; the cache keeps the input order.
    order = sorted(range(len(records)), key=lambda i: len(records[i][1]) + len(records[i][2]))
    results: dict[int, tuple[RaggedSupport, torch.Tensor]] = {}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(records), desc="score+cache", unit="resp")
    writer = CacheWriter(
        path,
        fingerprint=fingerprint,
        vocab_size=model.config.vocab_size,
        pad_token_id=tokenizer.pad_token_id,
        overwrite=overwrite,
    )
    with writer:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            scored = [i for i in chunk if records[i][2]]
            if scored:
                support, action_lp = score_batch(
                    model,
                    [records[i][1] for i in scored],
                    [records[i][2] for i in scored],
                    pad_token_id=tokenizer.pad_token_id,
                    p_store=p_store,
                    max_support=max_support,
                    timings=timings,
                )
                t0 = time.perf_counter()
                bounds = np.cumsum([0] + [len(records[i][2]) for i in scored])
                for j, i in enumerate(scored):
                    rows_j = slice(int(bounds[j]), int(bounds[j + 1]))
                    results[i] = (support.select(rows_j), action_lp[rows_j])
                timings.extract_s += time.perf_counter() - t0
            if bar is not None:
                bar.update(len(chunk))
        write_start = time.perf_counter()
        empty = RaggedSupport(
            torch.zeros(1, dtype=torch.int64),
            torch.zeros(0, dtype=torch.int32),
            torch.zeros(0),
            p_store,
            torch.zeros(0),
        )
        for i, (row_id, prompt_ids, response_ids, split, terminated) in enumerate(records):
            support, action_lp = results.pop(i, (empty, torch.zeros(0)))
            writer.add(
                row_id=row_id,
                split=split,
                prompt_ids=prompt_ids,
                response_ids=response_ids,
                terminated=terminated,
                support=support,
                teacher_log_prob=action_lp,
            )
        writer.close()
        timings.write_s += time.perf_counter() - write_start
    if bar is not None:
        bar.close()
    return Path(path)


# ----------------------------------------------------------------------------- reading


@dataclass
class _Shard:
    path: Path
    info: dict
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


class TeacherCache:
    """Read a cache folder; yields offline training batches (see ``batch``).

    Args:
        path: the cache folder.
        expect: fingerprint entries the cache must have (e.g. ``teacher_fingerprint(model,
            tokenizer)``); any difference is refused with ValueError.
        verify: re-hash every shard on open (else only sizes are checked).
    """

    def __init__(
        self, path: str | os.PathLike, *, expect: Mapping | None = None, verify: bool = True
    ) -> None:
        self.path = Path(path)
        manifest_path = self.path / MANIFEST
        if not manifest_path.is_file():
            raise FileNotFoundError(
                f"{self.path} is not a tdkd teacher cache ({MANIFEST} missing); build one with "
                "`tdkd prepare`"
            )
        try:
            self.manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{manifest_path} is damaged ({err}); rebuild the cache") from None
        version = self.manifest.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(
                f"cache {self.path} has format version {version}, this tdkd reads "
                f"{FORMAT_VERSION}; rebuild it with `tdkd prepare`"
            )
        self.fingerprint: dict = self.manifest["fingerprint"]
        for key, value in (expect or {}).items():
            # teacher_id records where the teacher was loaded from; what it *is* is the weights
            # and tokenizer hashes, so the same teacher from another folder is accepted.
            if key in _INFORMATIVE_KEYS:
                continue
            if self.fingerprint.get(key) != value:
                raise ValueError(
                    f"cache {self.path} was made with {key}={self.fingerprint.get(key)!r}, "
                    f"expected {value!r}; rebuild it with `tdkd prepare` for this teacher/data"
                )
        self.p_store = float(self.fingerprint["p_store"])
        self.pad_token_id = int(self.manifest["pad_token_id"])
        self.vocab_size = int(self.manifest["vocab_size"])
        self._shards = [_Shard(self.path / s["file"], s) for s in self.manifest["shards"]]
        for shard in self._shards:
            self._check_shard(shard, verify)
        counts = [s.info["rows"] for s in self._shards]
        self._row_starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._splits = np.concatenate([self._array(s, "split") for s in self._shards])

    def _check_shard(self, shard: _Shard, verify: bool) -> None:
        if not shard.path.is_file():
            raise FileNotFoundError(f"cache shard {shard.path} is missing; rebuild the cache")
        size = shard.path.stat().st_size
        if size != shard.info["bytes"]:
            raise ValueError(
                f"cache shard {shard.path} has {size} bytes, expected {shard.info['bytes']}: it "
                "is truncated or damaged; rebuild the cache with `tdkd prepare`"
            )
        if verify:
            if file_sha256(shard.path) != shard.info["sha256"]:
                raise ValueError(
                    f"cache shard {shard.path} is corrupted (SHA-256 mismatch); rebuild the "
                    "cache with `tdkd prepare`"
                )

    def _array(self, shard: _Shard, name: str) -> np.ndarray:
        if name == "support_offsets" and name not in shard.arrays:
            sizes = self._array(shard, "support_sizes")
            offsets = np.zeros(len(sizes) + 1, dtype=np.int64)
            np.cumsum(sizes, dtype=np.int64, out=offsets[1:])
            shard.arrays[name] = offsets
        if name == "dropped_mass" and name not in shard.info["arrays"]:
            return np.zeros(shard.info["states"], dtype=np.float32)
        if name not in shard.arrays:
            dtype, offset, count = shard.info["arrays"][name]
            shard.arrays[name] = (
                np.memmap(
                    shard.path, dtype=np.dtype(dtype), mode="r", offset=offset, shape=(count,)
                )
                if count
                else np.zeros(0, dtype=np.dtype(dtype))
            )
        return shard.arrays[name]

    def __len__(self) -> int:
        return int(self._row_starts[-1])

    def indices(self, split: str | None = None) -> np.ndarray:
        """Row indices (0..len-1) of a split ("train", "validation", "test") or of all rows."""
        if split is None:
            return np.arange(len(self))
        if split not in SPLIT_CODES:
            raise ValueError(f"split must be one of {list(SPLIT_CODES)} or None, got {split!r}")
        return np.nonzero(self._splits == SPLIT_CODES[split])[0]

    def _locate(self, index: int) -> tuple[_Shard, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"row index {index} out of range for a cache of {len(self)} rows")
        s = int(np.searchsorted(self._row_starts, index, side="right") - 1)
        return self._shards[s], index - int(self._row_starts[s])

    def row(self, index: int) -> dict:
        """One row: row_id, prompt_ids, response_ids, terminated, support (RaggedSupport at
        p_store over its response tokens) and teacher_log_prob [n]."""
        shard, i = self._locate(int(index))
        a = lambda name: self._array(shard, name)  # noqa: E731
        t0, t1 = int(a("token_offsets")[i]), int(a("token_offsets")[i + 1])
        tokens = np.asarray(a("tokens")[t0:t1], dtype=np.int64)
        prompt_len = int(a("prompt_len")[i])
        s0, s1 = int(a("state_offsets")[i]), int(a("state_offsets")[i + 1])
        offsets = np.asarray(a("support_offsets")[s0 : s1 + 1], dtype=np.int64)
        if (
            t1 - t0 != prompt_len + (s1 - s0)
            or len(offsets) != s1 - s0 + 1
            or (len(offsets) > 1 and np.any(np.diff(offsets) <= 0))
        ):
            raise ValueError(f"cache shard {shard.path} is inconsistent at row {i}; rebuild it")
        n0, n1 = int(offsets[0]), int(offsets[-1])
        support = RaggedSupport(
            offsets=torch.from_numpy(offsets - n0),
            ids=torch.from_numpy(np.asarray(a("support_ids")[n0:n1], dtype=np.int32)),
            log_probs=torch.from_numpy(np.array(a("support_log_probs")[n0:n1], dtype=np.float32)),
            p=self.p_store,
            dropped_mass=torch.from_numpy(np.array(a("dropped_mass")[s0:s1], dtype=np.float32)),
        )
        return {
            "row_id": int(a("row_id")[i]),
            "prompt_ids": tokens[:prompt_len],
            "response_ids": tokens[prompt_len:],
            "terminated": bool(a("terminated")[i]),
            "support": support,
            "teacher_log_prob": torch.from_numpy(
                np.array(a("teacher_log_prob")[s0:s1], dtype=np.float32)
            ),
        }

    def row_ids(self, indices: Sequence[int]) -> list[int]:
        """The generation row ids (``row_id`` of the responses dataset) of cache rows."""
        return [self.row(int(i))["row_id"] for i in indices]

    def supports(
        self, indices: Sequence[int] | None = None, *, p: float | None = None
    ) -> RaggedSupport:
        """All response-token nuclei of the given rows (default all), restricted to p."""
        indices = range(len(self)) if indices is None else indices
        return _concat_ragged(
            [self.row(int(i))["support"] for i in indices], self.p_store
        ).restrict(self._check_read_p(p))

    def _check_read_p(self, p: float | None) -> float:
        p = self.p_store if p is None else check_p(p)
        if p > self.p_store:
            raise ValueError(
                f"p={p} is above the cache's p_store={self.p_store}; train with p <= p_store or "
                "rebuild the cache with `tdkd prepare --p-store` >= p"
            )
        return p

    def batch(
        self, indices: Sequence[int], *, p: float | None = None, max_support: int | None = None
    ):
        """The offline batch of rows ``indices`` at nucleus mass p (default p_store).

        Returns a ``TensorDict`` with batch_size [B] (L = longest row, K = largest kept support
        of the batch, capped at ``max_support``):
            tokens int64 [B, L] (right-padded with the pad id), attention_mask bool [B, L],
            response_mask bool [B, L], support_ids int64 [B, L, K], support_log_probs float32
            [B, L, K] (-inf at padding), support_mask bool [B, L, K], teacher_log_prob float32
            [B, L], covered_mass float32 [B, L] (0 off the response), terminated bool [B].
        """
        from tensordict import TensorDict

        from tdkd.data import pad_sequences

        p = self._check_read_p(p)
        if max_support is not None and int(max_support) < 1:
            raise ValueError(f"max_support must be >= 1 or None, got max_support={max_support}")
        rows = [self.row(int(i)) for i in indices]
        if not rows:
            raise ValueError("indices is empty; a batch needs at least one row")
        tokens, attention, response = pad_sequences(
            [r["prompt_ids"].tolist() for r in rows],
            [r["response_ids"].tolist() for r in rows],
            self.pad_token_id,
        )
        ragged = _concat_ragged([r["support"] for r in rows], self.p_store).restrict(p)
        padded = ragged.to_padded(max_support)
        batch, length, width = tokens.shape[0], tokens.shape[1], padded.ids.shape[-1]
        support_ids = torch.zeros((batch, length, width), dtype=torch.int64)
        support_log_probs = torch.full((batch, length, width), float("-inf"))
        support_mask = torch.zeros((batch, length, width), dtype=torch.bool)
        teacher_log_prob = torch.zeros((batch, length))
        covered_mass = torch.zeros((batch, length))
        support_ids[response] = padded.ids
        support_log_probs[response] = padded.log_probs
        support_mask[response] = padded.mask
        covered_mass[response] = padded.covered_mass
        teacher_log_prob[response] = torch.cat([r["teacher_log_prob"] for r in rows])
        return TensorDict(
            {
                "tokens": tokens,
                "attention_mask": attention,
                "response_mask": response,
                "support_ids": support_ids,
                "support_log_probs": support_log_probs,
                "support_mask": support_mask,
                "teacher_log_prob": teacher_log_prob,
                "covered_mass": covered_mass,
                "terminated": torch.tensor([r["terminated"] for r in rows], dtype=torch.bool),
            },
            batch_size=[batch],
        )

    def iter_batches(
        self,
        batch_size: int,
        *,
        split: str | None = "train",
        p: float | None = None,
        max_support: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
    ) -> Iterator:
        """Offline batches over a split (one epoch), shuffled with ``seed`` when asked."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        indices = epoch_order(self.indices(split), shuffle=shuffle, seed=seed)
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            if drop_last and len(chunk) < batch_size:
                break
            yield self.batch(chunk, p=p, max_support=max_support)

    @property
    def bytes_on_disk(self) -> int:
        return (
            sum(s.path.stat().st_size for s in self._shards) + (self.path / MANIFEST).stat().st_size
        )


def epoch_order(indices: np.ndarray, *, shuffle: bool, seed: int) -> np.ndarray:
    """The rows of one epoch: ``numpy.random.default_rng(seed).permutation(indices)``, or
    ``indices`` as they are without ``shuffle``.

    >>> epoch_order(np.arange(4), shuffle=False, seed=0).tolist()
    [0, 1, 2, 3]
    """
    return np.random.default_rng(seed).permutation(indices) if shuffle else indices


def _concat_ragged(parts: Sequence[RaggedSupport], p: float) -> RaggedSupport:
    lengths = torch.cat([s.lengths for s in parts]) if parts else torch.zeros(0, dtype=torch.int64)
    offsets = torch.zeros(lengths.numel() + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(lengths, 0)
    return RaggedSupport(
        offsets=offsets,
        ids=torch.cat([s.ids for s in parts]) if parts else torch.zeros(0, dtype=torch.int32),
        log_probs=torch.cat([s.log_probs for s in parts]) if parts else torch.zeros(0),
        p=p,
        dropped_mass=torch.cat([s.dropped_mass for s in parts]) if parts else torch.zeros(0),
    )


def support_stats(support: RaggedSupport) -> dict:
    """Nucleus-size statistics: states, mean, median, p95, max (sizes as stored)."""
    sizes = support.lengths.double()
    if sizes.numel() == 0:
        return {"states": 0, "mean": 0.0, "median": 0.0, "p95": 0.0, "max": 0}
    return {
        "states": int(sizes.numel()),
        "mean": round(float(sizes.mean()), 2),
        "median": float(sizes.median()),
        "p95": round(float(torch.quantile(sizes, 0.95)), 2),
        "max": int(sizes.max()),
    }
