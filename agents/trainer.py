"""The offline trainer (cached teacher batches -> student) and what it shares with the online one.

One optimizer step: ``grad_accum`` micro-batches, each this process's shard of a global batch,
``loss = sum of the loss module's loss_* entries``, backward of ``loss / grad_accum``, gradients
averaged over processes (torchrun), clipped to ``max_grad_norm``, AdamW step, learning-rate
schedule step (linear warm-up, then cosine), target-network update when the loss module has
target parameters (TorchRL ``SoftUpdate``).

Logged metrics (CSV ``metrics.csv`` with columns step,name,value and TensorBoard ``tb/``):

- ``losses/<key>``: every ``loss_*`` entry, and ``losses/total`` (their sum), mean over the
  step's micro-batches and processes.
- ``charts/lr``, ``charts/grad_norm`` (before clipping), ``charts/epoch``,
  ``charts/response_tokens`` (cumulative, all processes), ``charts/token_nll`` (student NLL of
  the teacher's tokens, on debug steps).
- ``debug/<key>``: the loss module's other (detached) outputs, and every ``debug_every`` steps
  ``support_diagnostics``: support size, covered mass, Q of the taken action, max Q, V_p
  (nucleus soft value), V (full soft value), student mass on the nucleus, and the KL on the
  nucleus in both directions, KL(teacher_p || student_p) and KL(student_p || teacher_p).
- ``eval/<key>``: the evaluator's metrics every ``eval_every`` steps; ``best_metric`` of them
  chooses the best checkpoint.

Resuming: the latest checkpoint restores model, optimizer, scheduler, RNG states, step and data
position (epoch, batch index), so the run continues as if it had not stopped.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from tensordict import TensorDictBase

from agents import distributed
from agents.checkpoint import CheckpointManager, capture_rng_state, restore_rng_state
from agents.config import TrainConfig, write_atomic
from tdkd.io import atomic_directory
from tdkd.sequence import align_steps

__all__ = [
    "BatchSource",
    "CacheBatchSource",
    "ListBatchSource",
    "MetricLogger",
    "NonFiniteLossError",
    "OfflineTrainer",
    "TrainResult",
    "loss_evaluator",
    "make_optimizer",
    "make_target_updater",
    "save_student",
    "support_diagnostics",
    "total_loss",
    "warmup_cosine_factor",
]

log = logging.getLogger(__name__)

Evaluator = Callable[[], dict[str, float]]


class NonFiniteLossError(RuntimeError):
    """The loss or the gradient norm became NaN or infinite; training stopped."""


# ----------------------------------------------------------------------------------------
# Pure helpers


def warmup_cosine_factor(
    step: int, *, warmup_steps: int, max_steps: int, min_lr_ratio: float = 0.0
) -> float:
    """Learning-rate multiplier for optimizer step ``step`` (0-based).

    f(t) = (t + 1) / W                                         for t < W
    f(t) = m + (1 - m) * (1 + cos(pi * (t - W) / (T - W))) / 2  for W <= t < T (clamped at T)

    with W = warmup_steps, T = max_steps, m = min_lr_ratio.

    >>> [round(warmup_cosine_factor(t, warmup_steps=2, max_steps=6), 3) for t in range(7)]
    [0.5, 1.0, 1.0, 0.854, 0.5, 0.146, 0.0]
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(max_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / span, 1.0)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def total_loss(loss_td: TensorDictBase) -> torch.Tensor:
    """Sum of the ``loss_*`` entries of a loss module's output (each reduced to a scalar)."""
    keys = [k for k in loss_td.keys() if isinstance(k, str) and k.startswith("loss")]
    if not keys:
        raise ValueError(
            f"the loss module returned no loss_* entry (keys: {sorted(map(str, loss_td.keys()))})"
        )
    return sum(loss_td.get(k).mean() for k in keys)


def support_diagnostics(logits: torch.Tensor, batch: TensorDictBase) -> dict[str, float]:
    """Per-response-token diagnostics of student Q = logits against the teacher's nucleus.

    On the step grid of ``tdkd.sequence.align_steps`` (q [B, T, V] = Q(s_t, .), nucleus
    A = support ids [B, T, K]): V_p = logsumexp_{a in A} q_a, V = logsumexp_a q_a,
    log pi_S,p = q_A - V_p, log pi_T,p = log pi_T(A) - logsumexp log pi_T(A). Returns means
    over response steps of: support_size, covered_mass, q_action, q_max, v_p, v_full,
    student_nucleus_mass (= exp(V_p - V)), kl_fwd_p = KL(pi_T,p || pi_S,p),
    kl_rev_p = KL(pi_S,p || pi_T,p) and token_nll = V - q_action (student NLL of the teacher's
    token over the full vocabulary).
    """
    per_token = {k: batch[k] for k in ("support_ids", "support_mask", "support_log_probs")}
    per_token["covered_mass"] = batch["covered_mass"]
    steps = align_steps(logits.float(), batch["tokens"], batch["response_mask"], per_token)
    q, resp = steps.q, steps.mask  # [B, T, V], [B, T]
    ids, mask = steps.fields["support_ids"].long(), steps.fields["support_mask"].bool()
    q_support = torch.gather(q, -1, ids).masked_fill(~mask, float("-inf"))  # [B, T, K]
    v_p = torch.logsumexp(q_support, -1)  # [B, T]
    v_full = torch.logsumexp(q, -1)
    q_action = torch.gather(q, -1, steps.actions.unsqueeze(-1)).squeeze(-1)
    log_student = (q_support - v_p.unsqueeze(-1)).masked_fill(~mask, 0.0)
    teacher = steps.fields["support_log_probs"].float().masked_fill(~mask, float("-inf"))
    log_teacher = (teacher - torch.logsumexp(teacher, -1, keepdim=True)).masked_fill(~mask, 0.0)
    p_teacher, p_student = log_teacher.exp() * mask, log_student.exp() * mask
    per_step = {
        "support_size": mask.sum(-1).float(),
        "covered_mass": steps.fields["covered_mass"].float(),
        "q_action": q_action,
        "q_max": q.amax(-1),
        "v_p": v_p,
        "v_full": v_full,
        "student_nucleus_mass": (v_p - v_full).exp(),
        "kl_fwd_p": (p_teacher * (log_teacher - log_student)).sum(-1),
        "kl_rev_p": (p_student * (log_student - log_teacher)).sum(-1),
        "token_nll": v_full - q_action,
    }
    count = resp.sum().clamp(min=1)
    return {k: float(v.masked_fill(~resp, 0.0).sum() / count) for k, v in per_step.items()}


def student_logits(student: torch.nn.Module, batch: TensorDictBase) -> torch.Tensor:
    """[B, L, V] logits of a HF causal LM on the batch's tokens."""
    return student(input_ids=batch["tokens"], attention_mask=batch["attention_mask"].long()).logits


def make_optimizer(
    parameters: Sequence[torch.nn.Parameter], config: TrainConfig
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (weight decay on matrices only) and the warm-up + cosine schedule."""
    decay = [p for p in parameters if p.ndim >= 2]
    no_decay = [p for p in parameters if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, eps=config.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: warmup_cosine_factor(
            step,
            warmup_steps=config.warmup_steps,
            max_steps=config.max_steps,
            min_lr_ratio=config.min_lr_ratio,
        ),
    )
    return optimizer, scheduler


def make_target_updater(loss_module: torch.nn.Module, tau: float = 0.005) -> Any | None:
    """TorchRL ``SoftUpdate`` when the loss module has ``target_*_params``, else None."""
    if not any(
        name.startswith("target_") and name.endswith("_params")
        for name, _ in loss_module.named_children()
    ):
        return None
    from torchrl.objectives import SoftUpdate

    return SoftUpdate(loss_module, tau=tau)


def trainable_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Parameters that require grad, each once (shared ones are not repeated)."""
    seen: set[int] = set()
    params = []
    for p in module.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            params.append(p)
    return params


def save_student(student: torch.nn.Module, directory: str | os.PathLike, tokenizer=None) -> Path:
    """``save_pretrained`` into a temp folder, then rename it into place (atomic)."""
    directory = Path(directory)
    with atomic_directory(directory) as tmp:
        student.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return directory


# ----------------------------------------------------------------------------------------
# Data


class BatchSource(Protocol):
    """Deterministic batches addressed by (epoch, index): what makes resuming exact.

    ``len(source)`` is the number of global batches per epoch; ``source.batch(epoch, i)``
    returns the i-th global batch of that epoch (the same on every process and every call).
    """

    def __len__(self) -> int: ...

    def batch(self, epoch: int, index: int) -> TensorDictBase: ...


class ListBatchSource:
    """Batches from a list of equally sized TensorDicts [B], reshuffled every epoch.

    The order of epoch e is ``torch.randperm(n)`` under a generator seeded with seed + e.
    """

    def __init__(
        self, batches: Sequence[TensorDictBase], *, shuffle: bool = True, seed: int = 0
    ) -> None:
        if not batches:
            raise ValueError("batches is empty; give at least one batch")
        self.batches = list(batches)
        self.shuffle = shuffle
        self.seed = seed

    def __len__(self) -> int:
        return len(self.batches)

    def order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(len(self.batches)))
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(len(self.batches), generator=generator).tolist()

    def batch(self, epoch: int, index: int) -> TensorDictBase:
        return self.batches[self.order(epoch)[index]]


class CacheBatchSource:
    """Global batches of ``batch_size`` rows of one split of a ``tdkd.cache.TeacherCache``.

    Epoch e visits the split's rows in the order ``numpy.random.default_rng(seed + e)
    .permutation`` (or in order without ``shuffle``), in full batches only (a last partial
    batch is dropped, so every global batch has the same size and shards evenly).

    Args:
        cache: an open ``TeacherCache``.
        batch_size: rows per global batch.
        split: "train", "validation", "test" or None (all rows).
        p: nucleus mass to read the supports at (<= the cache's p_store; None = p_store).
        max_support: optional cap on K.
    """

    def __init__(
        self,
        cache: Any,
        batch_size: int,
        *,
        split: str | None = "train",
        p: float | None = None,
        max_support: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got batch_size={batch_size}")
        self.cache = cache
        self.rows = cache.indices(split)
        if len(self.rows) < batch_size:
            raise ValueError(
                f"the cache's {split!r} split has {len(self.rows)} rows, fewer than "
                f"batch_size={batch_size}; lower the batch size or prepare more data"
            )
        if p is not None and p > cache.p_store:
            raise ValueError(
                f"p={p} is above the cache's p_store={cache.p_store}; train with p <= p_store "
                "or rebuild the cache with a larger p_store"
            )
        self.batch_size, self.split, self.p, self.max_support = batch_size, split, p, max_support
        self.shuffle, self.seed = shuffle, seed
        self._order: tuple[int, Any] | None = None

    def __len__(self) -> int:
        return len(self.rows) // self.batch_size

    def order(self, epoch: int):
        if self._order is None or self._order[0] != epoch:
            from tdkd.cache import epoch_order

            rows = epoch_order(self.rows, shuffle=self.shuffle, seed=self.seed + epoch)
            self._order = (epoch, rows)
        return self._order[1]

    def batch(self, epoch: int, index: int) -> TensorDictBase:
        if not 0 <= index < len(self):
            raise IndexError(f"batch index {index} out of range [0, {len(self)})")
        rows = self.order(epoch)[index * self.batch_size : (index + 1) * self.batch_size]
        return self.cache.batch(rows, p=self.p, max_support=self.max_support)


# ----------------------------------------------------------------------------------------
# Logging


class MetricLogger:
    """Scalars to ``metrics.csv`` (step,name,value) and to TensorBoard under ``tb/``.

    On resume from step s, rows after s are dropped (the CSV is rewritten atomically) and
    TensorBoard purges events after s, so a resumed run's logs read like an uninterrupted one.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        tensorboard: bool = True,
        enabled: bool = True,
        resume_step: int | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.enabled = enabled
        self._writer = None
        self._csv = None
        if not enabled:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / "metrics.csv"
        rows = _read_metric_rows(path) if resume_step is not None else []
        kept = [r for r in rows if r[0] <= resume_step] if resume_step is not None else []
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["step", "name", "value"])
        writer.writerows(kept)
        write_atomic(path, buffer.getvalue())
        self._csv = open(path, "a", newline="")  # noqa: SIM115 - closed in close()
        self._csv_writer = csv.writer(self._csv)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(
                str(self.directory / "tb"),
                purge_step=None if resume_step is None else resume_step + 1,
            )

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        for name, value in sorted(metrics.items()):
            self._csv_writer.writerow([step, name, repr(float(value))])
            if self._writer is not None:
                self._writer.add_scalar(name, float(value), step)
        self._csv.flush()

    def close(self) -> None:
        if self._csv is not None:
            self._csv.close()
            self._csv = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _read_metric_rows(path: Path) -> list[tuple[int, str, str]]:
    """Rows of a metrics CSV; a torn last line (killed mid-write) is skipped."""
    if not path.is_file():
        return []
    rows = []
    with open(path, newline="") as handle:
        for row in csv.reader(handle):
            if len(row) != 3 or row[0] == "step":
                continue
            try:
                rows.append((int(row[0]), row[1], repr(float(row[2]))))
            except ValueError:
                continue
    return rows


# ----------------------------------------------------------------------------------------
# Evaluation


def loss_evaluator(
    loss_module: torch.nn.Module,
    student: torch.nn.Module,
    source: BatchSource,
    *,
    max_batches: int | None = None,
    device: torch.device | str | None = None,
) -> Evaluator:
    """An evaluator: mean loss terms and ``support_diagnostics`` over held-out batches.

    Keys: ``eval/loss`` (sum of loss_* terms), ``eval/<loss key>``, ``eval/<diagnostic>``.
    """
    count = len(source) if max_batches is None else min(len(source), max_batches)

    def evaluate() -> dict[str, float]:
        was_training = loss_module.training
        loss_module.eval()
        totals: dict[str, float] = {}
        try:
            with torch.no_grad():
                for index in range(count):
                    batch = source.batch(0, index)
                    if device is not None:
                        batch = batch.to(device)
                    out = loss_module(batch)
                    values = {"loss": float(total_loss(out))}
                    values |= {
                        k: float(out.get(k).mean()) for k in out.keys() if k.startswith("loss_")
                    }
                    values |= support_diagnostics(student_logits(student, batch), batch)
                    for k, v in values.items():
                        totals[k] = totals.get(k, 0.0) + v / count
        finally:
            loss_module.train(was_training)
        return {f"eval/{k}": v for k, v in totals.items()}

    return evaluate


# ----------------------------------------------------------------------------------------
# The offline trainer


@dataclass
class TrainResult:
    """What a finished run reports."""

    step: int
    last_metrics: dict[str, float] = field(default_factory=dict)
    best_step: int | None = None
    best_value: float | None = None
    student_dir: Path | None = None
    losses: list[float] = field(default_factory=list)


class OfflineTrainer:
    """Trains ``student`` through ``loss_module`` on deterministic cached batches.

    Args:
        loss_module: a TorchRL LossModule whose forward takes an offline batch TensorDict and
            returns ``loss_*`` entries plus detached diagnostics (e.g. ``agents.make(...)``).
        student: the HF causal LM inside ``loss_module`` (exported with ``save_pretrained``).
        data: the training ``BatchSource`` (global batches; sharded over processes).
        config: ``TrainConfig``.
        out_dir: where ``metrics.csv``, ``tb/``, ``ckpt/`` and ``student/`` go.
        evaluator: a no-argument callable returning ``eval/*`` metrics, run on rank 0 every
            ``config.eval_every`` steps; ``config.best_metric`` of them picks the best checkpoint.
        dist_info: this process's place under torchrun (default: single process).
        tokenizer: saved next to the exported student when given.
        target_tau: SoftUpdate rate for loss modules with target networks.
        device: where batches are moved before the loss (the loss module must already be
            there); None leaves them where the source puts them.
    """

    def __init__(
        self,
        loss_module: torch.nn.Module,
        student: torch.nn.Module,
        data: BatchSource | None,
        *,
        config: TrainConfig,
        out_dir: str | os.PathLike,
        evaluator: Evaluator | None = None,
        dist_info: distributed.DistInfo | None = None,
        tokenizer: Any = None,
        target_tau: float = 0.005,
        device: torch.device | str | None = None,
    ) -> None:
        if data is not None and len(data) < 1:
            raise ValueError("the training data has no batches; prepare a larger cache")
        self.loss_module = loss_module
        self.student = student
        self.data = data
        self.config = config
        self.out_dir = Path(out_dir)
        self.evaluator = evaluator
        self.dist = dist_info or distributed.DistInfo()
        self.tokenizer = tokenizer
        self.device = device
        self.params = trainable_parameters(loss_module)
        if not self.params:
            raise ValueError("the loss module has no trainable parameters")
        self.optimizer, self.scheduler = make_optimizer(self.params, config)
        self.target_updater = make_target_updater(loss_module, tau=target_tau)
        self.checkpoints = CheckpointManager(self.out_dir / "ckpt", keep_last=config.keep_last)
        self.step = 0
        self.epoch = 0
        self.index = 0
        self.response_tokens = 0
        self.best_value: float | None = None
        self.best_step: int | None = None

    # -- state -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.loss_module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": capture_rng_state(),
            "step": self.step,
            "data": {"epoch": self.epoch, "index": self.index},
            "response_tokens": self.response_tokens,
            "best": {"value": self.best_value, "step": self.best_step},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loss_module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        restore_rng_state(state["rng"])
        self.step = int(state["step"])
        self.epoch = int(state["data"]["epoch"])
        self.index = int(state["data"]["index"])
        self.response_tokens = int(state["response_tokens"])
        self.best_value = state["best"]["value"]
        self.best_step = state["best"]["step"]

    def save_checkpoint(self, *, best: bool = False, metric: float | None = None) -> None:
        if self.dist.is_main:
            self.checkpoints.save(self.step, self.state_dict(), best=best, metric=metric)

    def resume(self) -> bool:
        """Restore the latest checkpoint if there is one; True when resumed."""
        if self.checkpoints.latest() is None:
            return False
        self.load_state_dict(self.checkpoints.load())
        log.info("resumed from step %d (epoch %d, batch %d)", self.step, self.epoch, self.index)
        return True

    # -- data --------------------------------------------------------------------------
    def _next_batch(self) -> TensorDictBase:
        if self.index >= len(self.data):
            self.epoch, self.index = self.epoch + 1, 0
        batch = self.data.batch(self.epoch, self.index)
        self.index += 1
        if self.dist.enabled:
            batch = distributed.shard_batch(batch, self.dist)
        return batch.to(self.device) if self.device is not None else batch

    # -- one optimizer step ------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        """Run one optimizer step (``grad_accum`` micro-batches); return its metrics."""
        config = self.config
        self.loss_module.train()
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        tokens = 0
        batch: TensorDictBase | None = None
        for _ in range(config.grad_accum):
            batch = self._next_batch()
            out = self.loss_module(batch)
            loss = total_loss(out)
            (loss / config.grad_accum).backward()
            values = {"losses/total": float(loss.detach())}
            for key in out.keys():
                if not isinstance(key, str):
                    continue
                value = out.get(key)
                if not isinstance(value, torch.Tensor) or not value.is_floating_point():
                    continue
                prefix = "losses" if key.startswith("loss") else "debug"
                values[f"{prefix}/{key}"] = float(value.detach().float().mean())
            for k, v in values.items():
                sums[k] = sums.get(k, 0.0) + v / config.grad_accum
            tokens += int(batch["response_mask"].sum())
        metrics = distributed.all_reduce_mean(sums)
        if not math.isfinite(metrics["losses/total"]):
            raise NonFiniteLossError(self._nonfinite_message("loss", metrics["losses/total"]))
        distributed.all_reduce_gradients(self.params)
        max_norm = config.max_grad_norm if config.max_grad_norm is not None else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
        if not math.isfinite(grad_norm):
            raise NonFiniteLossError(self._nonfinite_message("gradient norm", grad_norm))
        metrics["charts/lr"] = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        if self.target_updater is not None:
            self.target_updater.step()
        self.step += 1
        self.response_tokens += tokens * self.dist.world_size
        metrics["charts/grad_norm"] = grad_norm
        metrics |= self._data_metrics()
        metrics["charts/response_tokens"] = float(self.response_tokens)
        if config.debug_every and self.step % config.debug_every == 0 and batch is not None:
            metrics |= self._debug_metrics(batch)
        return metrics

    def _data_metrics(self) -> dict[str, float]:
        return {"charts/epoch": self.epoch + self.index / len(self.data)}

    def _debug_metrics(self, batch: TensorDictBase) -> dict[str, float]:
        with torch.no_grad():
            diag = support_diagnostics(student_logits(self.student, batch), batch)
        diag = distributed.all_reduce_mean(diag)
        out = {f"debug/{k}": v for k, v in diag.items() if k != "token_nll"}
        out["charts/token_nll"] = diag["token_nll"]
        return out

    def _nonfinite_message(self, what: str, value: float) -> str:
        last = self.checkpoints.latest()
        kept = f"the last good checkpoint is {str(last)!r}" if last else "no checkpoint was saved"
        return (
            f"the {what} became {value} at step {self.step + 1}; training stopped and {kept}. "
            "Lower the learning rate, enable max_grad_norm, or check the batch data."
        )

    def _is_better(self, value: float) -> bool:
        if self.best_value is None:
            return True
        if self.config.best_mode == "min":
            return value < self.best_value
        return value > self.best_value

    def _evaluate(self) -> dict[str, float]:
        if self.evaluator is None or not self.dist.is_main:
            return {}
        metrics = self.evaluator()
        name = self.config.best_metric
        if name not in metrics:
            raise ValueError(
                f"best_metric={name!r} is not among the evaluator's metrics {sorted(metrics)}"
            )
        value = metrics[name]
        best = math.isfinite(value) and self._is_better(value)
        if best:
            self.best_value, self.best_step = value, self.step
        self.save_checkpoint(best=best, metric=value)
        return metrics

    # -- the loop ----------------------------------------------------------------------
    def train(
        self,
        *,
        resume: bool = True,
        on_step: Callable[[int, dict[str, float]], None] | None = None,
    ) -> TrainResult:
        """Train to ``config.max_steps`` (resuming first when ``resume``); export the student.

        ``on_step(step, metrics)`` is called after every optimizer step (progress bars, tests).
        """
        config = self.config
        if not resume and self.checkpoints.steps():
            raise ValueError(
                f"{self.out_dir} already holds checkpoints {self.checkpoints.steps()}: train with "
                "resume=True to continue that run, or choose a new out_dir (two runs in one "
                "folder would prune and export each other's checkpoints)"
            )
        resumed = resume and self.resume()
        if not resumed:
            torch.manual_seed(config.seed)
        if self.dist.enabled:
            distributed.broadcast_module(self.loss_module)
        logger = MetricLogger(
            self.out_dir,
            tensorboard=config.tensorboard,
            enabled=self.dist.is_main,
            resume_step=self.step if resumed else None,
        )
        result = TrainResult(step=self.step)
        try:
            while self.step < config.max_steps:
                metrics = self.train_step()
                result.losses.append(metrics["losses/total"])
                evaluated = {}
                if config.eval_every and self.step % config.eval_every == 0:
                    evaluated = self._evaluate()
                    metrics |= evaluated
                elif config.checkpoint_every and self.step % config.checkpoint_every == 0:
                    self.save_checkpoint()
                last = self.step == config.max_steps
                if evaluated or last or self.step % config.log_every == 0:
                    logger.log(self.step, metrics)
                result.last_metrics = metrics
                if on_step is not None:
                    on_step(self.step, metrics)
            if self.checkpoints.latest() is None or self.checkpoints.steps()[-1] != self.step:
                self.save_checkpoint()
        finally:
            logger.close()
        result.step = self.step
        result.best_step, result.best_value = self.best_step, self.best_value
        result.student_dir = self.export()
        return result

    def export(self) -> Path | None:
        """Write the student (best checkpoint if ``export='best'`` and one exists) on rank 0."""
        if not self.dist.is_main:
            return None
        best = self.checkpoints.best() if self.config.export == "best" else None
        if best is not None:
            current = {k: v.clone() for k, v in self.loss_module.state_dict().items()}
            self.loss_module.load_state_dict(self.checkpoints.load(best)["model"])
            try:
                path = save_student(self.student, self.out_dir / "student", self.tokenizer)
            finally:
                self.loss_module.load_state_dict(current)
            log.info("exported the best student (step %s) to %s", self.best_step, path)
        else:
            path = save_student(self.student, self.out_dir / "student", self.tokenizer)
            log.info("exported the final student (step %d) to %s", self.step, path)
        return path
