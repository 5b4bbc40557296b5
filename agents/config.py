"""Dataclass configs for training runs, savable to and loadable from YAML or JSON.

Library constructors take explicit keyword arguments; the CLI and experiments build these
configs, and every run writes its resolved config next to its outputs (``config.yaml``).
Loading validates: an unknown key or a value of the wrong type is a ``ValueError`` naming it.

>>> cfg = TrainConfig(max_steps=10, lr=1e-4)
>>> TrainConfig.from_dict(cfg.to_dict()) == cfg
True
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from tdkd.io import write_atomic

__all__ = [
    "TrainConfig",
    "OnlineConfig",
    "DistillConfig",
    "save_config",
    "load_config",
    "write_atomic",
]

C = TypeVar("C", bound="_Config")


class _Config:
    """Mixin: dict / file round-trips with validation of keys and types."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any]) -> C:
        if not isinstance(data, dict):
            raise ValueError(f"{cls.__name__} expects a mapping, got {type(data).__name__}")
        hints = typing.get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(
                f"unknown {cls.__name__} keys {unknown}; valid keys are {sorted(names)}"
            )
        kwargs = {}
        for key, value in data.items():
            kwargs[key] = _coerce(cls.__name__, key, hints[key], value)
        return cls(**kwargs)

    def replace(self: C, **changes: Any) -> C:
        """A copy with ``changes`` applied (validated like ``from_dict``)."""
        merged = self.to_dict()
        merged.update(changes)
        return type(self).from_dict(merged)


def _coerce(owner: str, key: str, hint: Any, value: Any) -> Any:
    """Check ``value`` against the field type ``hint`` (ints are accepted for floats)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if isinstance(hint, type) and issubclass(hint, _Config):
        return hint.from_dict(value)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(owner, key, inner[0], value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{owner}.{key} must be a mapping, got {value!r}")
        return dict(value)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{owner}.{key} must be a list, got {value!r}")
        return tuple(value) if origin is tuple else list(value)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{owner}.{key} must be a number, got {value!r}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{owner}.{key} must be an integer, got {value!r}")
        return value
    if hint is bool and not isinstance(value, bool):
        raise ValueError(f"{owner}.{key} must be true or false, got {value!r}")
    if hint is str and not isinstance(value, str):
        raise ValueError(f"{owner}.{key} must be a string, got {value!r}")
    return value


@dataclass(frozen=True)
class TrainConfig(_Config):
    """Optimisation, schedule, logging and checkpointing of a training run.

    The learning rate follows a linear warm-up over ``warmup_steps`` optimizer steps, then a
    cosine decay to ``min_lr_ratio * lr`` at ``max_steps``. One optimizer step consumes
    ``grad_accum`` micro-batches (per process; under torchrun the global batch is
    ``world_size * grad_accum * micro-batch``).
    """

    max_steps: int = 100
    lr: float = 5e-6
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    eps: float = 1e-8
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    grad_accum: int = 1
    max_grad_norm: float | None = 1.0
    log_every: int = 1
    debug_every: int = 10
    eval_every: int = 0
    checkpoint_every: int = 50
    keep_last: int = 2
    best_metric: str = "eval/loss"
    best_mode: str = "min"
    export: str = "best"
    seed: int = 0
    tensorboard: bool = True

    def __post_init__(self) -> None:
        positive = {"max_steps": self.max_steps, "grad_accum": self.grad_accum}
        positive |= {"log_every": self.log_every, "keep_last": self.keep_last}
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {name}={value}")
        for name in ("warmup_steps", "eval_every", "checkpoint_every", "debug_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0 disables), got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got lr={self.lr}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 or None, got {self.max_grad_norm}")
        if self.best_mode not in ("min", "max"):
            raise ValueError(f"best_mode must be 'min' or 'max', got {self.best_mode!r}")
        if self.export not in ("best", "last"):
            raise ValueError(f"export must be 'best' or 'last', got {self.export!r}")


@dataclass(frozen=True)
class OnlineConfig(_Config):
    """Online training: env rollouts through a TorchRL Collector into a uniform replay buffer.

    ``frames_per_batch`` env steps per collection; ``replay_size`` episodes kept;
    ``batch_size`` episodes per micro-batch; ``min_replay`` episodes before the first update;
    ``updates_per_collect`` micro-batches sampled between collections; ``target_update_tau``
    the SoftUpdate rate of loss modules with a target network.
    """

    frames_per_batch: int = 64
    replay_size: int = 1024
    batch_size: int = 8
    min_replay: int = 0
    updates_per_collect: int = 1
    target_update_tau: float = 0.005

    def __post_init__(self) -> None:
        for name in ("frames_per_batch", "replay_size", "batch_size", "updates_per_collect"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 < self.target_update_tau <= 1.0:
            raise ValueError(f"target_update_tau must lie in (0, 1], got {self.target_update_tau}")


@dataclass(frozen=True)
class DistillConfig(_Config):
    """`tdkd distill`: which algorithm, on which cache, with which student and budget.

    ``student`` is a spec of ``tdkd.models.load_student``: ``"layers:6"`` (6 evenly spaced
    teacher layers), ``"layers:0,5,29"``, ``"config:hidden=192,layers=4,heads=3"`` or a model
    folder. ``teacher`` must be the teacher the cache was made with (checked by fingerprint).
    Evaluation runs on the cache's ``eval_split`` (skipped when it has no rows); the best
    checkpoint is chosen by ``train.best_metric`` (default: the student's NLL of the teacher's
    held-out tokens, the same yardstick for every algorithm).
    """

    algo: str = "bd"
    cache: str = ""
    out: str = ""
    student: str = "layers:6"
    teacher: str = "smollm2-135m-instruct"
    p: float | None = None
    max_support: int | None = None
    batch_size: int = 8
    eval_split: str = "validation"
    eval_batches: int = 4
    device: str = "auto"
    loss_kwargs: dict[str, Any] = field(default_factory=dict)
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(best_metric="eval/token_nll", eval_every=100)
    )

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.eval_batches < 1:
            raise ValueError(f"eval_batches must be >= 1, got {self.eval_batches}")
        if self.p is not None and not 0.0 < self.p <= 1.0:
            raise ValueError(f"p must lie in (0, 1], got p={self.p}")


def save_config(config: _Config, path: str | os.PathLike) -> None:
    """Write ``config`` atomically as YAML (``.yaml``/``.yml``) or JSON (anything else)."""
    data = _plain(config.to_dict())
    if str(path).endswith((".yaml", ".yml")):
        import yaml

        text = yaml.safe_dump(data, sort_keys=False)
    else:
        text = json.dumps(data, indent=2) + "\n"
    write_atomic(path, text)


def load_config(cls: type[C], path: str | os.PathLike) -> C:
    """Read a config written by ``save_config`` (or by hand) and validate it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ValueError(f"config file {str(path)!r} is not valid YAML: {err}") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"config file {str(path)!r} is not valid JSON: {err}") from None
    return cls.from_dict(data or {})


def _plain(value: Any) -> Any:
    """Tuples -> lists so YAML/JSON stay plain."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
