"""`tdkd demo`: the main job. Teacher data -> BD and KD students -> evaluation -> table + plots.

With the embedded teacher (SmolLM2-135M-Instruct) and a layer-dropped student, in one command
(``make demo``, <= 20 minutes on 2 CPU cores at the default size):

1. ``tdkd prepare``: short chatterbot + synthetic prompts, K teacher samples each, the sparse
   top-p teacher cache (``OUT/data``);
1b. the initial student (``InitSpec``, ``OUT/init``): the layer-dropped copy is distilled once
   (KD, full-vocabulary student) on the train split of a second, larger ``tdkd prepare`` (its
   prompts include stage 1's), so that every algorithm starts from a language model
   (``--no-init`` skips it);
2. ``tdkd distill`` once per algorithm (default BD and KD) from the same cache, initial
   student, budget (steps x batch), learning rate and seed (``OUT/runs/<algo>``);
3. ``tdkd eval`` of the teacher (the reference) and of each student on the test prompts, over
   ``seeds`` sampling seeds, with the teacher as judge; the first two algorithms are evaluated
   together, which adds the teacher-judged win rate of the first over the second
   (``OUT/eval/<name>.json``);
4. the comparison table (printed, and ``OUT/results.json`` / ``OUT/table.md``) and the plots
   ``OUT/plots/learning_curves.png`` and ``OUT/plots/bars.png``.

``OUT/config.json`` is the resolved ``DemoConfig``; every stage also writes its own resolved
config beside its outputs. Rerunning the same command resumes: the prepared data is reused, a
finished training run is skipped (an unfinished one resumes from its last checkpoint) and an
evaluation is redone only when its config changed or its student was retrained.

Deviations from the paper's protocol, for CPU scale: a layer-dropped student healed by one
short KD run instead of an SFT-initialised pretrained LM, a few dozen optimizer steps on ~100
responses of <= 32 tokens,
one training seed (the +- in the table is over *sampling* seeds of the evaluation, so it
measures decoding noise, not training noise; ``experiments/run_benchmark.py`` repeats training
over seeds). Differences smaller than twice their standard error are reported as within noise.

BD runs with ``q_min=None`` (Q = the raw logits) instead of the paper's max-shift and clip at
Q_min = -10. The paper's student is SFT-initialised, so the teacher's tokens are near the top of
its logits; a layer-dropped student starts far from the teacher, and measured on the default
demo (4 layers, lr 1e-4), 98% of the nucleus Q-values sat at the clip at step 1 (mean Q
-9.83), the gradient through the max-shift raised a token outside the nucleus (max Q 38-44), the
gradient norm fell to 0 by step 20 and the student's validation NLL of the teacher's tokens went
from 25 to 49 nats. Without the shift and clip BD learns (18.2 -> 15.3 over the 30 steps; KD
14.0 -> 11.9). Since the max-shift became a stop-gradient (``tdkd.td.q_max_shift_clip``) the
clipped form learns too (validation NLL 13.1 -> 12.1, gradient norm 669 -> 196), but its
sampled generations were judged worse than KD's in that demo, so the demo keeps
``q_min=None``; the benchmark's ablations measure the clipped form from the initial student
(row ``bd_clip10`` of experiments/RESULTS.md).
``--loss-kwarg bd:q_min=-10`` restores the paper's form.

The helpers for tables and plots (``read_metrics_csv``, ``compare``, ``format_table``,
``plot_learning_curves``, ``plot_bars``) are shared with ``experiments/``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tdkd import io as atomic_io

log = logging.getLogger(__name__)

__all__ = [
    "CURVE_TITLES",
    "TABLE_METRICS",
    "DemoConfig",
    "InitSpec",
    "compare",
    "distill_run",
    "drop_checkpoints",
    "evaluate_models",
    "format_table",
    "init_student",
    "pin_initial_student",
    "plot_bars",
    "plot_learning_curves",
    "prepare_data",
    "read_metrics_csv",
    "run_demo",
    "within_noise",
    "write_json_atomic",
]

# metric -> (column title, higher is better; None: no direction)
TABLE_METRICS: dict[str, tuple[str, bool]] = {
    "rougeL": ("Rouge-L (gold)", True),
    "rougeL_teacher": ("Rouge-L (teacher)", True),
    "exact_match": ("exact match", True),
    "teacher_nll": ("teacher NLL", False),
    "coverage": ("coverage", True),
    "gen_length": ("length", None),  # neither direction is better
}

# learning-curve metric (trainer's metrics.csv name) -> panel title
CURVE_TITLES: dict[str, str] = {
    "eval/token_nll": "validation: student NLL of teacher tokens",
    "eval/kl_fwd_p": "validation: KL(teacher_p || student_p)",
    "losses/total": "training loss (own scale per algorithm)",
}


@dataclass(frozen=True)
class InitSpec:
    """The student every algorithm starts from (the paper's are pretrained LMs, SFT-ed).

    A layer-dropped copy of the teacher is not a language model yet (on the embedded teacher,
    ``layers:4`` puts 0.2% of its mass on the teacher's p = 0.8 nucleus). So, once per demo or
    benchmark, it is distilled with ``algo`` for ``steps`` steps (``lr``) on the train split of
    a second, larger ``tdkd prepare`` run (``prompts`` prompts x ``samples`` teacher samples,
    the setup's lengths, fractions and data seed; its prompts include the setup's own, drawn
    in the same order). Splits are decided by a hash of the prompt with the same fractions, so
    no test prompt is ever trained on. The result, ``OUT/init/run/student``, replaces
    ``DemoConfig.student`` for every algorithm; each algorithm's run folder pins the initial
    student's weights (``pin_initial_student``), so a retrained one is never mixed with runs
    of the previous one.

    >>> DemoConfig(init={"prompts": 50, "steps": 20}).init
    InitSpec(prompts=50, samples=1, algo='kd', steps=20, lr=0.001, batch_size=None)
    """

    prompts: int = 300
    samples: int = 1
    algo: str = "kd"
    steps: int = 100
    lr: float = 1e-3
    batch_size: int | None = None  # None: the setup's

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "lr", float(self.lr))  # YAML reads 1e-3 as a string
        except (TypeError, ValueError):
            raise ValueError(f"init.lr must be a number, got {self.lr!r}") from None
        for name in ("prompts", "samples", "steps"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(
                    f"init.{name} must be an integer >= 1, got {getattr(self, name)!r}"
                )
        if self.batch_size is not None and (
            not isinstance(self.batch_size, int) or self.batch_size < 1
        ):
            raise ValueError(f"init.batch_size must be None or >= 1, got {self.batch_size!r}")
        if not self.lr > 0:
            raise ValueError(f"init.lr must be > 0, got {self.lr}")
        if not isinstance(self.algo, str) or not self.algo.strip():
            raise ValueError(f"init.algo must be an algorithm name such as 'kd', got {self.algo!r}")

    @classmethod
    def from_value(cls, value: Any) -> InitSpec:
        """An ``InitSpec`` from itself or a mapping of its fields (clear errors otherwise)."""
        if isinstance(value, cls):
            return value
        if not isinstance(value, Mapping):
            raise ValueError(
                f"init must be a mapping of {[f.name for f in dataclasses.fields(cls)]} or null, "
                f"got {value!r}"
            )
        extra = sorted(set(value) - {f.name for f in dataclasses.fields(cls)})
        if extra:
            raise ValueError(
                f"init has unknown keys {extra}; valid: {[f.name for f in dataclasses.fields(cls)]}"
            )
        return cls(**value)


@dataclass(frozen=True)
class DemoConfig:
    """Everything that decides what `tdkd demo` produces (sizes are options: scale them up).

    Data: ``prompts`` prompts (half chatterbot, half synthetic), ``samples`` teacher responses
    each of <= ``max_new_tokens`` tokens, cache at ``p_store``; splits by prompt
    (``val_fraction``, ``test_fraction``). Training: ``steps`` AdamW steps of ``batch_size``
    responses, ``lr`` with ``warmup_steps`` linear warm-up then cosine, nucleus ``p``, seed
    ``train_seed``, validation every ``eval_every`` steps on ``eval_batches`` batches (the best
    step by the student's NLL of the teacher's held-out tokens is exported). Evaluation:
    ``seeds`` sampling seeds (top-p ``eval_top_p``, temperature 1) on at most ``eval_prompts``
    test prompts, coverage at ``p``. ``init``: the shared initial student (``InitSpec``; a dict
    is converted), trained once before the algorithms; None starts them from ``student`` as is.
    """

    out: str = "runs/demo"
    teacher: str = "smollm2-135m-instruct"
    student: str = "layers:4"
    algos: tuple[str, ...] = ("bd", "kd")
    prompts: int = 64
    samples: int = 2
    max_new_tokens: int = 32
    max_prompt_tokens: int = 96
    p_store: float = 0.95
    p: float = 0.8
    val_fraction: float = 0.1
    test_fraction: float = 0.25
    steps: int = 30
    batch_size: int = 8
    lr: float = 1e-4
    warmup_steps: int = 3
    eval_every: int = 5
    eval_batches: int = 2
    train_seed: int = 0
    seeds: int = 3
    eval_prompts: int | None = 16
    eval_top_p: float = 1.0
    data_seed: int = 0
    device: str = "cpu"
    # algo -> loss kwargs; see the module docstring for why BD runs without the Q shift/clip
    loss_kwargs: dict[str, dict[str, Any]] = field(default_factory=lambda: {"bd": {"q_min": None}})
    init: InitSpec | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "algos", tuple(self.algos))
        if self.init is not None:
            object.__setattr__(self, "init", InitSpec.from_value(self.init))
        for name in ("prompts", "samples", "max_new_tokens", "steps", "batch_size", "seeds"):
            if getattr(self, name) < 1:
                raise ValueError(
                    f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}"
                )
        if not self.algos:
            raise ValueError("--algos is empty; give at least one algorithm, e.g. bd,kd")
        if len(set(self.algos)) != len(self.algos) or "teacher" in self.algos:
            raise ValueError(f"--algos must be distinct algorithm names, got {list(self.algos)}")
        if not 0.0 < self.p <= self.p_store <= 1.0:
            raise ValueError(f"need 0 < p <= p_store <= 1, got p={self.p}, p_store={self.p_store}")
        if self.eval_prompts is not None and self.eval_prompts < 1:
            raise ValueError(f"--eval-prompts must be >= 1, got {self.eval_prompts}")

    @property
    def data_dir(self) -> Path:
        return Path(self.out) / "data"

    def run_dir(self, algo: str) -> Path:
        return Path(self.out) / "runs" / algo

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["algos"] = list(self.algos)
        data["loss_kwargs"] = {k: dict(v) for k, v in self.loss_kwargs.items()}
        return data


# ----------------------------------------------------------------------------- small helpers


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Results JSON, atomically (``tdkd.io``): keys in insertion order, str() for the rest."""
    atomic_io.write_json_atomic(path, data, sort_keys=False, default=str)


def read_json(path: str | os.PathLike) -> Any | None:
    """The JSON in ``path``, or None when the file is missing or not valid JSON."""
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def read_metrics_csv(path: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
    """``metrics.csv`` of a training run (columns step,name,value) -> {name: [(step, value)]}.

    Rows are sorted by step; a torn or malformed row is skipped.

    >>> import tempfile, pathlib
    >>> f = pathlib.Path(tempfile.mkdtemp()) / "metrics.csv"
    >>> _ = f.write_text("step,name,value\\n2,eval/loss,0.5\\n1,eval/loss,0.7\\n2,x\\n")
    >>> read_metrics_csv(f)
    {'eval/loss': [(1, 0.7), (2, 0.5)]}
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"metrics file {path} does not exist; train the run first")
    series: dict[str, list[tuple[int, float]]] = {}
    with open(path, newline="") as handle:
        for row in csv.reader(handle):
            if len(row) != 3 or row[0] == "step":
                continue
            try:
                step, value = int(row[0]), float(row[2])
            except ValueError:
                continue
            series.setdefault(row[1], []).append((step, value))
    return {name: sorted(points) for name, points in series.items()}


def within_noise(
    mean_a: float, std_a: float, n_a: int, mean_b: float, std_b: float, n_b: int, *, z: float = 2.0
) -> bool:
    """True when |mean_a - mean_b| <= z * SE, SE = sqrt(std_a^2 / n_a + std_b^2 / n_b).

    The stds are sample stds over n_a and n_b seeds. With one seed on each side (SE = 0) only an
    exact tie is within noise, so one-seed comparisons are flagged by the caller instead.

    >>> within_noise(20.0, 2.0, 3, 21.0, 2.0, 3)
    True
    >>> within_noise(20.0, 0.5, 3, 23.0, 0.5, 3)
    False
    """
    if n_a < 1 or n_b < 1:
        raise ValueError(f"n_a and n_b must be >= 1, got {n_a} and {n_b}")
    se = math.sqrt(std_a**2 / n_a + std_b**2 / n_b)
    return abs(mean_a - mean_b) <= z * se


def compare(
    results: Mapping[str, Mapping[str, Any]],
    a: str,
    b: str,
    metrics: Sequence[str] = tuple(TABLE_METRICS),
) -> list[str]:
    """One line per metric: how method ``a`` compares with ``b`` (better / worse / within noise).

    "better"/"worse" only when ``within_noise`` says the gap exceeds twice its standard error;
    with a single seed on either side there is no noise estimate, and the line says so (giving
    the face-value direction, which is not evidence).

    ``results[name]`` holds ``{metric}_mean``, ``{metric}_std`` and ``seeds`` (as written by
    ``tdkd eval``); a metric that either side lacks (None) is skipped.
    """
    lines = []
    for metric in metrics:
        title, higher = TABLE_METRICS.get(metric, (metric, True))
        ra, rb = results[a], results[b]
        ma, mb = ra.get(f"{metric}_mean"), rb.get(f"{metric}_mean")
        if ma is None or mb is None:
            continue
        sa, sb = ra.get(f"{metric}_std") or 0.0, rb.get(f"{metric}_std") or 0.0
        na, nb = int(ra.get("seeds", 1)), int(rb.get("seeds", 1))
        if ma == mb:
            face = "tie"
        elif higher is None:
            face = f"{a} {'higher' if ma > mb else 'lower'}"
        else:
            face = f"{a} {'better' if (ma > mb) == higher else 'worse'}"
        if min(na, nb) < 2:
            verdict = f"one seed: no noise estimate (at face value: {face})"
        elif within_noise(ma, sa, na, mb, sb, nb):
            verdict = "within noise"
        else:
            verdict = face
        lines.append(f"{title}: {a} {ma:.2f} +- {sa:.2f} vs {b} {mb:.2f} +- {sb:.2f} -> {verdict}")
    return lines


def format_table(
    results: Mapping[str, Mapping[str, Any]],
    metrics: Sequence[str] = tuple(TABLE_METRICS),
    *,
    markdown: bool = False,
) -> str:
    """A table of mean +- std per method (rows) and metric (columns); "-" where missing.

    >>> print(format_table({"kd": {"rougeL_mean": 12.5, "rougeL_std": 1.25, "seeds": 3}},
    ...                    ["rougeL"]))
    method       seeds    Rouge-L (gold)
    kd               3     12.50 +- 1.25
    """
    titles = [TABLE_METRICS.get(m, (m, True))[0] for m in metrics]
    rows = []
    for name, result in results.items():
        cells = []
        for metric in metrics:
            mean, std = result.get(f"{metric}_mean"), result.get(f"{metric}_std")
            cells.append("-" if mean is None else f"{mean:.2f} +- {std or 0.0:.2f}")
        rows.append((name, str(result.get("seeds", "-")), cells))
    if markdown:
        lines = ["| method | seeds | " + " | ".join(titles) + " |"]
        lines.append("|" + "---|" * (len(titles) + 2))
        lines += [f"| {n} | {s} | " + " | ".join(c) + " |" for n, s, c in rows]
        return "\n".join(lines)
    width = max(18, *(len(t) + 2 for t in titles))
    name_width = max(12, *(len(n) + 1 for n, _, _ in rows)) if rows else 12
    lines = [f"{'method':<{name_width}}{'seeds':>6}" + "".join(f"{t:>{width}}" for t in titles)]
    lines += [
        f"{n:<{name_width}}{s:>6}" + "".join(f"{c:>{width}}" for c in cells) for n, s, cells in rows
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- plots


def _save_figure(fig, path: Path) -> None:
    with atomic_io.atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip("."), dpi=110, bbox_inches="tight")


def plot_learning_curves(
    runs: Mapping[str, Mapping[str, Sequence[tuple[int, float]]]],
    metrics: Sequence[str],
    path: str | os.PathLike,
    *,
    titles: Mapping[str, str] | None = None,
) -> Path:
    """One panel per metric, one line per run: ``runs[label][metric] = [(step, value), ...]``
    (``read_metrics_csv`` output). Runs lacking a metric are left out of its panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.2), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for label, series in runs.items():
            points = series.get(metric)
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, marker="o", markersize=3, label=label)
        ax.set_title((titles or {}).get(metric, metric), fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    _save_figure(fig, path)
    plt.close(fig)
    return path


def plot_bars(
    results: Mapping[str, Mapping[str, Any]],
    metrics: Sequence[str],
    path: str | os.PathLike,
) -> Path:
    """One panel per metric: a bar per method at ``{metric}_mean`` with a ``{metric}_std`` error
    bar (std over seeds). Metrics that no method has are skipped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in metrics if any(r.get(f"{m}_mean") is not None for r in results.values())]
    fig, axes = plt.subplots(
        1, max(len(metrics), 1), figsize=(3.4 * max(len(metrics), 1), 3.2), squeeze=False
    )
    names = list(results)
    for ax, metric in zip(axes[0], metrics):
        means = [results[n].get(f"{metric}_mean") for n in names]
        stds = [results[n].get(f"{metric}_std") or 0.0 for n in names]
        shown = [i for i, m in enumerate(means) if m is not None]
        ax.bar(
            [names[i] for i in shown],
            [means[i] for i in shown],
            yerr=[stds[i] for i in shown],
            capsize=4,
            color=[f"C{i}" for i in shown],
        )
        title, higher = TABLE_METRICS.get(metric, (metric, True))
        direction = "" if higher is None else f" ({'higher' if higher else 'lower'} is better)"
        ax.set_title(f"{title}{direction}", fontsize=9)
        ax.tick_params(axis="x", labelrotation=45, labelsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    _save_figure(fig, path)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- stages


def init_student(setup: DemoConfig, *, progress: bool = True) -> tuple[str, bool]:
    """Train the shared initial student of ``setup.init`` once; returns (its folder, trained now).

    Reused when finished: its data is ``tdkd prepare``'s (resumable) and its run is
    ``tdkd distill``'s (skipped once finished with the same config).
    """
    init = setup.init
    if init is None:
        raise ValueError("setup.init is None: there is no initial student to train")
    init_setup = dataclasses.replace(
        setup,
        out=str(Path(setup.out) / "init"),
        prompts=init.prompts,
        samples=init.samples,
        init=None,
    )
    prepare_data(init_setup, progress=progress)
    config = distill_config(
        dataclasses.replace(
            init_setup,
            steps=init.steps,
            lr=init.lr,
            batch_size=init.batch_size or setup.batch_size,
            warmup_steps=max(1, init.steps // 20),
            eval_every=max(1, init.steps // 10),
            train_seed=0,
        ),
        init.algo,
    )
    config["out"] = str(Path(init_setup.out) / "run")
    config["p"] = setup.p_store  # the widest nucleus the cache serves
    trained = distill_run(config, progress=progress)
    return str(Path(config["out"]) / "student"), trained


def drop_checkpoints(run_out: str | os.PathLike) -> None:
    """Delete a *finished* run's ``ckpt/`` (its best student is already exported).

    A checkpoint holds the student and its AdamW state (~0.5 GB for the 4-layer student), and a
    run keeps up to three; a benchmark of ~35 runs would need ~50 GB. A finished run keeps
    ``summary.json``, ``student/``, ``metrics.csv`` and its config. Without checkpoints, a longer
    ``--steps`` cannot continue the run: delete its folder to retrain it.
    """
    out = Path(run_out)
    if not (out / "summary.json").is_file():
        raise ValueError(f"{out} has not finished (no summary.json); its checkpoints are kept")
    shutil.rmtree(out / "ckpt", ignore_errors=True)


def pin_initial_student(run_out: str | os.PathLike, initial: str | os.PathLike) -> None:
    """Record in ``run_out`` which initial student (SHA-256 of its weights) the run starts from.

    A run folder that already records another one was trained from a previous initial student
    (retrained since): ValueError, saying which folder to delete; reusing it would silently mix
    two starting points in one table.
    """
    weights = sorted(Path(initial).glob("*.safetensors"))
    if not weights:
        raise FileNotFoundError(f"no *.safetensors in the initial student folder {initial}")
    digest = hashlib.sha256()  # over the files' own digests, in name order
    for path in weights:
        digest.update(bytes.fromhex(atomic_io.file_sha256(path)))
    current = {"path": str(initial), "weights_sha256": digest.hexdigest()}
    marker = Path(run_out) / "initial_student.json"
    saved = read_json(marker)
    if saved is None:
        write_json_atomic(marker, current)
    elif saved.get("weights_sha256") != current["weights_sha256"]:
        raise ValueError(
            f"{run_out} was trained from another initial student than {initial} (retrained "
            "since); delete that run folder (and its evaluation) to train it again"
        )


def prepare_data(config: DemoConfig, *, progress: bool = True) -> dict:
    """Stage 1, ``tdkd prepare`` into ``OUT/data`` (reused when already complete)."""
    from tdkd.prepare import PrepareConfig, prepare

    prepare_config = PrepareConfig(
        out=str(config.data_dir),
        teacher=config.teacher,
        prompts=config.prompts,
        samples=config.samples,
        max_new_tokens=config.max_new_tokens,
        max_prompt_tokens=config.max_prompt_tokens,
        p_store=config.p_store,
        val_fraction=config.val_fraction,
        test_fraction=config.test_fraction,
        seed=config.data_seed,
    )
    return prepare(prepare_config, progress=progress)


def distill_config(config: DemoConfig, algo: str) -> dict[str, Any]:
    """The ``DistillConfig`` (as a plain dict, ``agents.config`` field names) of one run."""
    return {
        "algo": algo,
        "loss_kwargs": dict(config.loss_kwargs.get(algo, {})),
        "cache": str(config.data_dir / "cache"),
        "out": str(config.run_dir(algo)),
        "student": config.student,
        "teacher": config.teacher,
        "p": config.p,
        "batch_size": config.batch_size,
        "eval_batches": config.eval_batches,
        "device": config.device,
        "train": {
            "max_steps": config.steps,
            "lr": config.lr,
            "warmup_steps": config.warmup_steps,
            "eval_every": config.eval_every,
            "checkpoint_every": config.eval_every,
            "best_metric": "eval/token_nll",
            "seed": config.train_seed,
        },
    }


def _is_subset(wanted: Any, have: Any) -> bool:
    """Every key of ``wanted`` is in ``have`` with an equal value (recursively; floats ~=)."""
    if isinstance(wanted, Mapping):
        return isinstance(have, Mapping) and all(
            k in have and _is_subset(v, have[k]) for k, v in wanted.items()
        )
    if isinstance(wanted, float) and isinstance(have, (int, float)):
        return math.isclose(wanted, have, rel_tol=1e-9)
    return wanted == have


def _saved_run_config(out: Path) -> dict | None:
    import yaml

    try:
        saved = yaml.safe_load((out / "config.yaml").read_text())
    except (FileNotFoundError, yaml.YAMLError):
        return None
    return saved if isinstance(saved, dict) else None


def finished_run(run_config: Mapping[str, Any]) -> bool:
    """A run folder whose ``summary.json`` reached ``max_steps`` with this very config."""
    out = Path(run_config["out"])
    summary = read_json(out / "summary.json")
    saved = _saved_run_config(out)
    if summary is None or saved is None:
        return False
    return summary.get("steps") == run_config["train"]["max_steps"] and _is_subset(
        run_config, saved
    )


def check_resumable(run_config: Mapping[str, Any]) -> None:
    """ValueError when ``out`` holds checkpoints of a run that differs in more than its length.

    Only ``train.max_steps`` may change between a run and its continuation; anything else (the
    loss arguments, the learning rate, ...) would silently mix two runs in one folder.
    """
    out = Path(run_config["out"])
    saved = _saved_run_config(out)
    if saved is None or not (out / "ckpt").is_dir():
        return
    wanted = {**run_config, "train": {**run_config["train"]}}
    wanted["train"].pop("max_steps", None)
    if not _is_subset(wanted, saved):
        changed = sorted(
            k for k, v in wanted.items() if k not in saved or not _is_subset(v, saved[k])
        )
        raise ValueError(
            f"{out} holds a run with a different config ({', '.join(changed)} changed); delete "
            "that folder or use another --out to train this one"
        )


def distill_run(run_config: Mapping[str, Any], *, progress: bool = True) -> bool:
    """Stage 2 for one algorithm: ``tdkd distill --config`` unless the run already finished.

    The config (``distill_config``) is written to ``OUT/runs/<algo>.yaml``; ``tdkd distill``
    writes the resolved one into the run folder and resumes from its checkpoints. Runs through
    the ``tdkd`` command, the one place that imports ``agents``. Returns True when it trained.
    """
    import yaml

    from tdkd import cli

    if finished_run(run_config):
        log.info("run %s already finished: skipped", run_config["out"])
        return False
    check_resumable(run_config)
    out = Path(run_config["out"])
    spec = out.parent / f"{out.name}.yaml"
    atomic_io.write_atomic(spec, yaml.safe_dump(dict(run_config), sort_keys=False))
    argv = ["distill", "--config", str(spec)] + ([] if progress else ["--no-progress"])
    code = cli.main(argv)
    if code != 0:
        raise RuntimeError(f"`tdkd {' '.join(argv)}` failed with exit code {code}")
    return True


def evaluate_models(
    config: DemoConfig,
    student: str,
    student_b: str | None,
    out: str | os.PathLike,
    *,
    retrained: bool = False,
    progress: bool = True,
) -> dict:
    """Stage 3 for one or two models: ``tdkd eval`` (``tdkd.eval_cli.evaluate``) into ``out``.

    Reused when ``out`` holds a result of the same config and ``retrained`` is False.
    """
    from tdkd.eval_cli import EvalConfig, evaluate

    eval_config = EvalConfig(
        student=student,
        student_b=student_b,
        data=str(config.data_dir),
        split="test",
        seeds=config.seeds,
        top_p=config.eval_top_p,
        max_new_tokens=config.max_new_tokens,
        teacher=config.teacher,
        p=config.p,
        max_prompts=config.eval_prompts,
        device=config.device,
        out=str(out),
    )
    previous = read_json(out)
    if (
        not retrained
        and previous is not None
        and previous.get("config") == json.loads(json.dumps(dataclasses.asdict(eval_config)))
    ):
        log.info("evaluation %s is up to date: reused", out)
        return previous
    return evaluate(eval_config, progress=progress)


def _method_result(output: Mapping[str, Any]) -> dict[str, Any]:
    keep = ("seeds", "per_seed", "win_rate_mean", "win_rate_std")
    return {k: v for k, v in output.items() if k.endswith(("_mean", "_std")) or k in keep}


def run_demo(config: DemoConfig, *, progress: bool = True) -> dict:
    """All stages; returns the results (also ``OUT/results.json``, ``OUT/table.md``, plots).

    Returns:
        {"config", "methods": {"teacher"|algo: {metric_mean, metric_std, seeds, per_seed,
        best_val_token_nll (algos)}}, "win_rate": {"a", "b", "mean", "std"} (two algos or
        more), "comparison": [lines], "prepare": summary, "times": {stage: seconds}}.
    """
    out = Path(config.out)
    write_json_atomic(out / "config.json", config.to_dict())
    times: dict[str, float] = {}

    start = time.perf_counter()
    summary = prepare_data(config, progress=progress)
    times["prepare_s"] = time.perf_counter() - start
    given, initial = config, None  # the results record the config as given
    if config.init is not None:
        start = time.perf_counter()
        initial, _ = init_student(config, progress=progress)
        config = dataclasses.replace(config, student=initial)
        times["init_s"] = time.perf_counter() - start

    retrained: dict[str, bool] = {}
    for algo in config.algos:
        start = time.perf_counter()
        if initial is not None:
            pin_initial_student(config.run_dir(algo), initial)
        retrained[algo] = distill_run(distill_config(config, algo), progress=progress)
        times[f"distill_{algo}_s"] = time.perf_counter() - start

    start = time.perf_counter()
    evals = out / "eval"
    methods: dict[str, dict] = {}
    teacher = evaluate_models(
        config, config.teacher, None, evals / "teacher.json", progress=progress
    )
    methods["teacher"] = _method_result(teacher)
    win = None
    algos = list(config.algos)
    pairs = [algos[i : i + 2] for i in range(0, len(algos), 2)]
    for pair in pairs:
        name = "_vs_".join(pair)
        output = evaluate_models(
            config,
            str(config.run_dir(pair[0])),
            str(config.run_dir(pair[1])) if len(pair) == 2 else None,
            evals / f"{name}.json",
            retrained=any(retrained[a] for a in pair),
            progress=progress,
        )
        methods[pair[0]] = _method_result(output)
        if len(pair) == 2:
            methods[pair[1]] = _method_result(output["student_b"])
            if win is None:
                win = {
                    "a": pair[0],
                    "b": pair[1],
                    "mean": output.get("win_rate_mean"),
                    "std": output.get("win_rate_std"),
                }
    times["eval_s"] = time.perf_counter() - start
    for algo in algos:
        run_summary = read_json(config.run_dir(algo) / "summary.json") or {}
        methods[algo]["best_val_token_nll"] = run_summary.get("best_value")
        methods[algo]["best_step"] = run_summary.get("best_step")

    curves = {algo: read_metrics_csv(config.run_dir(algo) / "metrics.csv") for algo in config.algos}
    plot_learning_curves(
        curves, list(CURVE_TITLES), out / "plots" / "learning_curves.png", titles=CURVE_TITLES
    )
    plot_bars(methods, list(TABLE_METRICS), out / "plots" / "bars.png")
    comparison = compare(methods, algos[0], algos[1]) if len(algos) >= 2 else []
    results = {
        "config": given.to_dict(),
        "initial_student": initial,
        "methods": methods,
        "curves": {
            algo: {m: [list(p) for p in series.get(m, [])] for m in CURVE_TITLES}
            for algo, series in curves.items()
        },
        "win_rate": win,
        "comparison": comparison,
        "prepare": summary,
        "times": {k: round(v, 1) for k, v in times.items()},
    }
    write_json_atomic(out / "results.json", results)
    table = format_table(methods, list(TABLE_METRICS), markdown=True)
    text = [
        "# tdkd demo",
        "",
        f"Test prompts: {teacher['prompts']}; +- = sample std over {config.seeds} sampling seeds "
        "of the evaluation (one training seed).",
        "",
        table,
        "",
    ]
    if win is not None:
        text.append(
            f"Teacher-judged win rate {win['a']} over {win['b']}: {win['mean']:.3f} +- "
            f"{win['std']:.3f}"
        )
    text += ["", *[f"- {line}" for line in comparison], ""]
    atomic_io.write_atomic(out / "table.md", "\n".join(text))
    return results


# ----------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = DemoConfig()
    parser.add_argument("--out", default=d.out, help="output folder (default %(default)s)")
    parser.add_argument("--teacher", default=d.teacher, help="embedded teacher name or HF folder")
    parser.add_argument("--student", default=d.student, help="student spec (default %(default)s)")
    parser.add_argument(
        "--algos", default=",".join(d.algos), help="comma list (default %(default)s)"
    )
    for name in ("prompts", "samples", "max_new_tokens", "steps", "batch_size", "seeds"):
        parser.add_argument(
            f"--{name.replace('_', '-')}",
            type=int,
            default=getattr(d, name),
            help="(default %(default)s)",
        )
    parser.add_argument("--eval-prompts", type=int, default=d.eval_prompts)
    parser.add_argument("--lr", type=float, default=d.lr, help="(default %(default)s)")
    parser.add_argument("--p", type=float, default=d.p, help="nucleus mass (default %(default)s)")
    parser.add_argument("--train-seed", type=int, default=d.train_seed)
    parser.add_argument("--device", default=d.device, help="cpu or cuda (default %(default)s)")
    parser.add_argument(
        "--loss-kwarg",
        action="append",
        default=None,
        metavar="ALGO:KEY=VALUE",
        help="loss hyperparameter of one algorithm (repeatable, merged over the defaults "
        "bd:q_min=null), e.g. bd:lm_coef=0.5 or bd:q_min=-10 (the paper's Q clip)",
    )
    init = InitSpec()
    parser.add_argument(
        "--init-prompts",
        type=int,
        default=init.prompts,
        help="prompts (x 1 teacher sample) the initial student is distilled on (default "
        "%(default)s; see InitSpec)",
    )
    parser.add_argument(
        "--init-steps", type=int, default=init.steps, help="its steps (default %(default)s)"
    )
    parser.add_argument(
        "--no-init", action="store_true", help="start every algorithm from --student as it is"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def config_from_args(args: argparse.Namespace) -> DemoConfig:
    import yaml

    algos = tuple(a.strip() for a in args.algos.split(",") if a.strip())
    loss_kwargs = {k: dict(v) for k, v in DemoConfig().loss_kwargs.items()}  # merged into
    for item in args.loss_kwarg or []:
        algo, sep, rest = item.partition(":")
        key, eq, value = rest.partition("=")
        if not (sep and eq and algo.strip() and key.strip()):
            raise ValueError(f"--loss-kwarg expects ALGO:KEY=VALUE, got {item!r}")
        if algo.strip() not in algos:
            raise ValueError(f"--loss-kwarg {item!r}: {algo.strip()!r} is not in --algos {algos}")
        loss_kwargs.setdefault(algo.strip(), {})[key.strip()] = yaml.safe_load(value)
    return DemoConfig(
        out=args.out,
        teacher=args.teacher,
        student=args.student,
        algos=algos,
        prompts=args.prompts,
        samples=args.samples,
        max_new_tokens=args.max_new_tokens,
        steps=args.steps,
        batch_size=args.batch_size,
        seeds=args.seeds,
        eval_prompts=args.eval_prompts,
        lr=args.lr,
        p=args.p,
        train_seed=args.train_seed,
        device=args.device,
        loss_kwargs={k: v for k, v in loss_kwargs.items() if k in algos},
        init=None if args.no_init else InitSpec(prompts=args.init_prompts, steps=args.init_steps),
    )


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    start = time.perf_counter()
    try:
        results = run_demo(config, progress=not args.no_progress)
    except RuntimeError as err:  # a stage failed and already printed why
        print(f"tdkd demo: error: {err}", file=sys.stderr)
        return 1
    total = time.perf_counter() - start
    print()
    print(
        f"tdkd demo: {config.teacher} -> {config.student}, {config.steps} steps x "
        f"{config.batch_size} responses per algorithm, p={config.p}; "
        f"{results['methods']['teacher']['seeds']} sampling seeds (one training seed)"
    )
    print(format_table(results["methods"]))
    win = results["win_rate"]
    if win is not None:
        print(
            f"win rate {win['a']} over {win['b']} (teacher-judged): {win['mean']:.3f} +- {win['std']:.3f}"
        )
    for line in results["comparison"]:
        print(f"  {line}")
    print(f"done in {total:.0f} s ({results['times']}) -> {config.out}")
    print(f"  plots: {Path(config.out) / 'plots'}; table: {Path(config.out) / 'table.md'}")
    return 0
