"""Atomic training checkpoints: model, optimizer, scheduler, RNG states, step, data position.

Layout of a checkpoint folder::

    ckpt/
      step_00000040/state.pt        torch.save of the state dict
      step_00000040/manifest.json   {"format_version", "step", "sha256", "bytes", "metric"}
      latest.json                   {"name": "step_00000040", "step": 40}
      best.json                     {"name": ..., "step": ..., "metric": ...}

A checkpoint is written into a hidden temp folder and renamed into place once complete, then
the pointer files are replaced atomically, so a run killed at any moment leaves either the old
or the new checkpoint visible, never a half-written one. Reading checks the manifest (format
version and SHA-256 of ``state.pt``) and refuses anything else with a clear error.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tdkd.io import atomic_directory, file_sha256, write_atomic

__all__ = ["CheckpointManager", "capture_rng_state", "restore_rng_state", "FORMAT_VERSION"]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
_STATE = "state.pt"
_MANIFEST = "manifest.json"


def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU (and CUDA when present) generator states as plain data."""
    np_state = np.random.get_state()  # noqa: NPY002 - the global state is what we save
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "kind": np_state[0],
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of ``capture_rng_state``."""
    random.setstate(_as_tuple(state["python"]))
    np_state = state["numpy"]
    np.random.set_state(  # noqa: NPY002
        (
            np_state["kind"],
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(value: Any) -> Any:
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


class CheckpointManager:
    """Saves, lists, validates and prunes checkpoints in one folder.

    Args:
        directory: the checkpoint folder (created on first save).
        keep_last: how many most recent checkpoints to keep; the best one is always kept.
    """

    def __init__(self, directory: str | os.PathLike, *, keep_last: int = 2) -> None:
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got keep_last={keep_last}")
        self.directory = Path(directory)
        self.keep_last = keep_last

    @staticmethod
    def name(step: int) -> str:
        return f"step_{step:08d}"

    def save(
        self, step: int, state: dict[str, Any], *, metric: float | None = None, best: bool = False
    ) -> Path:
        """Write ``state`` as the checkpoint of ``step``; mark it best when ``best``."""
        self.directory.mkdir(parents=True, exist_ok=True)
        final = self.directory / self.name(step)
        with atomic_directory(final) as tmp:  # a re-saved step (after a resume) replaces the old
            torch.save(state, tmp / _STATE)
            manifest = {
                "format_version": FORMAT_VERSION,
                "step": int(step),
                "sha256": file_sha256(tmp / _STATE),
                "bytes": (tmp / _STATE).stat().st_size,
                "metric": metric,
            }
            write_atomic(tmp / _MANIFEST, json.dumps(manifest, indent=2))
        pointer = {"name": final.name, "step": int(step), "metric": metric}
        write_atomic(self.directory / "latest.json", json.dumps(pointer))
        if best:
            write_atomic(self.directory / "best.json", json.dumps(pointer))
        self._prune()
        log.info("checkpoint saved: %s", final)
        return final

    def _pointer(self, which: str) -> Path | None:
        path = self.directory / f"{which}.json"
        if not path.is_file():
            return None
        try:
            name = json.loads(path.read_text())["name"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ValueError(
                f"checkpoint pointer {str(path)!r} is corrupt; delete it to fall back to the "
                "newest valid checkpoint"
            ) from None
        return self.directory / name

    def steps(self) -> list[int]:
        """Steps of the complete checkpoints present (temp folders are ignored)."""
        if not self.directory.is_dir():
            return []
        found = []
        for child in self.directory.iterdir():
            if child.name.startswith("step_") and (child / _MANIFEST).is_file():
                found.append(int(child.name[5:]))
        return sorted(found)

    def latest(self) -> Path | None:
        """The newest checkpoint folder, or None when there is none."""
        pointed = self._pointer("latest")
        if pointed is not None and (pointed / _MANIFEST).is_file():
            return pointed
        steps = self.steps()
        return self.directory / self.name(steps[-1]) if steps else None

    def best(self) -> Path | None:
        """The checkpoint marked best, or None."""
        pointed = self._pointer("best")
        return pointed if pointed is not None and (pointed / _MANIFEST).is_file() else None

    def load(self, path: str | os.PathLike | None = None) -> dict[str, Any]:
        """Validate and read a checkpoint (default: the latest)."""
        folder = Path(path) if path is not None else self.latest()
        if folder is None:
            raise FileNotFoundError(f"no checkpoint in {str(self.directory)!r}")
        manifest_path, state_path = folder / _MANIFEST, folder / _STATE
        if not manifest_path.is_file() or not state_path.is_file():
            raise FileNotFoundError(
                f"{str(folder)!r} is not a complete checkpoint (needs {_MANIFEST} and {_STATE})"
            )
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"checkpoint {str(folder)!r} has format_version "
                f"{manifest.get('format_version')!r}, this tdkd reads {FORMAT_VERSION}"
            )
        if file_sha256(state_path) != manifest["sha256"]:
            raise ValueError(
                f"checkpoint {str(folder)!r} is corrupt (state.pt does not match its SHA-256); "
                "delete it to resume from an older one"
            )
        return torch.load(state_path, map_location="cpu", weights_only=True)

    def _prune(self) -> None:
        keep = set(self.steps()[-self.keep_last :])
        best = self.best()
        for step in self.steps():
            folder = self.directory / self.name(step)
            if step not in keep and folder != best:
                shutil.rmtree(folder, ignore_errors=True)
        for child in self.directory.iterdir():
            if child.name.startswith((".tmp-", ".trash-")):
                shutil.rmtree(child, ignore_errors=True)
