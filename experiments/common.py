"""What the experiment scripts share: the benchmark config, the initial student, the gold-answer
and full-distribution caches, one run, aggregation over training seeds.

A benchmark config (``experiments/configs/*.yaml``) is::

    name: main                          # results go to experiments/results/<name>.json
    setup: {...}                        # tdkd.demo.DemoConfig fields: data, student, budget, eval
    init: {prompts: 600, steps: 150}    # optional: InitSpec, the shared initial student
    methods:                            # table rows, in order
      bd:  {algo: bd, seeds: 3}
      sft: {algo: sft, seeds: 3, data: gold}          # trains on the dataset's gold answers
      bd_p0.5: {algo: bd, seeds: 3, p: 0.5, group: p} # any DistillConfig p / loss_kwargs
      bd_p1.0: {algo: bd, seeds: 3, p: 1.0, data: full}  # whole teacher distribution stored
      bd_no_chi2: {algo: bd, seeds: 3, loss_kwargs: {alpha_chi: null}}

Every method of every config trains from the same prepared data (``setup.out/data``), student
initialisation, steps x batch budget and learning rate; a run is ``setup.out/runs/<method>/
seed<k>`` and is skipped once finished, so configs that share a method (the ablations' ``bd``
is the main table's ``bd``) share its runs.

Aggregation (honest reporting): each run is evaluated over ``setup.seeds`` sampling seeds; the
run's score is the mean over them; a method's ``<metric>_mean`` / ``<metric>_std`` are the mean
and sample std over its *training* seeds (std 0.0 and a flag when it has one seed), and
``<metric>_sampling_std`` is the mean over runs of the std over sampling seeds.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tdkd.demo import (
    TABLE_METRICS,
    DemoConfig,
    InitSpec,
    distill_config,
    distill_run,
    drop_checkpoints,
    evaluate_models,
    init_student,
    pin_initial_student,
    read_json,
    read_metrics_csv,
    write_json_atomic,
)

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "experiments" / "results"
CONFIGS = REPO / "experiments" / "configs"
CURVE_METRICS = ("eval/token_nll", "eval/kl_fwd_p")
# method.data -> the cache folder under setup.out/data it trains on
DATA_CACHES = {"teacher": "cache", "gold": "gold_cache", "full": "full_cache"}

__all__ = [
    "BenchConfig",
    "MethodSpec",
    "aggregate_runs",
    "build_side_cache",
    "load_bench_config",
    "mean_curve",
    "run_method",
]


@dataclass(frozen=True)
class MethodSpec:
    """One row of a table: an algorithm, its overrides, and how many training seeds."""

    name: str
    algo: str
    seeds: int = 1
    p: float | None = None  # None: setup.p
    loss_kwargs: dict[str, Any] = field(default_factory=dict)
    # "teacher": the teacher's samples; "gold": the dataset's answers; "full": the teacher's
    # samples with the whole teacher distribution stored (p_store = 1.0, for p = 1.0 rows)
    data: str = "teacher"
    group: str = ""  # a label for plots (e.g. the ablation a row belongs to)

    def __post_init__(self) -> None:
        if self.seeds < 1:
            raise ValueError(f"method {self.name!r}: seeds must be >= 1, got {self.seeds}")
        if self.data not in DATA_CACHES:
            raise ValueError(
                f"method {self.name!r}: data must be one of {sorted(DATA_CACHES)}, "
                f"got {self.data!r}"
            )
        if self.p is not None and not 0.0 < self.p <= 1.0:
            raise ValueError(f"method {self.name!r}: p must lie in (0, 1], got {self.p}")


@dataclass(frozen=True)
class BenchConfig:
    name: str
    setup: DemoConfig
    methods: tuple[MethodSpec, ...]
    results_dir: str = str(RESULTS)

    @property
    def init(self) -> InitSpec | None:
        """The shared initial student's spec (``setup.init``; None: ``setup.student`` as is)."""
        return self.setup.init

    @property
    def results_path(self) -> Path:
        return Path(self.results_dir) / f"{self.name}.json"


def load_bench_config(
    path: str | os.PathLike, *, results_dir: str | os.PathLike | None = None, **overrides: Any
) -> BenchConfig:
    """Read a benchmark YAML; ``overrides`` replace ``setup`` fields (None values are ignored).

    ``results_dir`` (default ``experiments/results``) receives ``<name>.json``.

    Raises:
        FileNotFoundError: no such file. ValueError: unknown keys or bad values, named.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"benchmark config {path} does not exist (see {CONFIGS})")
    data = yaml.safe_load(path.read_text()) or {}
    unknown = sorted(set(data) - {"name", "setup", "setup_from", "init", "methods"})
    if unknown:
        raise ValueError(
            f"{path}: unknown top-level keys {unknown}; use name, setup, setup_from, init, methods"
        )
    setup, init = {}, None
    if data.get("setup_from"):  # another config's setup and init (same data, student, budget)
        base = path.parent / f"{data['setup_from']}.yaml"
        if not base.is_file():
            raise FileNotFoundError(f"{path}: setup_from {data['setup_from']!r}: no file {base}")
        base_data = yaml.safe_load(base.read_text()) or {}
        setup, init = dict(base_data.get("setup") or {}), base_data.get("init")
    setup.update(data.get("setup") or {})
    init = data.get("init", init)
    if init is not None:
        try:
            setup["init"] = InitSpec.from_value(init)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path}: {err}") from None
    setup.update({k: v for k, v in overrides.items() if v is not None})
    fields = {f.name for f in dataclasses.fields(DemoConfig)}
    bad = sorted(set(setup) - fields)
    if bad:
        raise ValueError(f"{path}: unknown setup keys {bad}; valid: {sorted(fields)}")
    if "algos" in setup:
        setup["algos"] = tuple(setup["algos"])
    methods_data = data.get("methods") or {}
    if not methods_data:
        raise ValueError(f"{path}: 'methods' is empty; list at least one method")
    methods = []
    for name, spec in methods_data.items():
        spec = dict(spec or {})
        allowed = {f.name for f in dataclasses.fields(MethodSpec)} - {"name"}
        extra = sorted(set(spec) - allowed)
        if extra:
            raise ValueError(
                f"{path}: method {name!r} has unknown keys {extra}; valid: {sorted(allowed)}"
            )
        spec.setdefault("algo", name)
        methods.append(MethodSpec(name=str(name), **spec))
    setup["algos"] = tuple(dict.fromkeys(m.algo for m in methods))
    return BenchConfig(
        name=str(data.get("name") or path.stem),
        setup=DemoConfig(**setup),
        methods=tuple(methods),
        results_dir=str(results_dir or RESULTS),
    )


# ----------------------------------------------------------------------------- data


def _cache_rows(setup: DemoConfig, kind: str, tokenizer) -> list[dict]:
    """The rows a side cache scores: the prepared responses (``full``) or the gold answers.

    ``gold``: one row per distinct prompt of the prepared responses that has a gold answer:
    response = the answer's tokens, cut at ``max_new_tokens`` (terminated, with EOS appended,
    when it fits). ``full``: the prepared teacher responses unchanged.
    """
    from tdkd.data import load_responses

    responses = load_responses(setup.data_dir / "responses")
    if kind == "full":
        return [dict(r) for r in responses]
    rows, seen = [], set()
    for row in responses.select_columns(["prompt_id", "prompt_ids", "answer", "split"]):
        if row["prompt_id"] in seen or not (row["answer"] or "").strip():
            continue
        seen.add(row["prompt_id"])
        ids = tokenizer(row["answer"].strip(), add_special_tokens=False)["input_ids"]
        fits = len(ids) < setup.max_new_tokens
        ids = ids + [tokenizer.eos_token_id] if fits else ids[: setup.max_new_tokens]
        rows.append(
            {
                "row_id": len(rows),
                "split": row["split"],
                "prompt_ids": list(row["prompt_ids"]),
                "response_ids": ids,
                "terminated": fits,
            }
        )
    if not rows:
        raise ValueError(f"no prompt of {setup.data_dir} has a gold answer; SFT needs one")
    return rows


def build_side_cache(setup: DemoConfig, kind: str, *, progress: bool = False) -> Path:
    """A second teacher cache next to ``tdkd prepare``'s, for the rows that need one.

    ``kind="gold"`` (SFT rows): the teacher scores the datasets' *gold answers*, stored at
    ``setup.p_store``. ``kind="full"`` (the p = 1.0 ablation): the same teacher responses as
    the main cache, stored at p_store = 1.0, i.e. the teacher's whole distribution over every
    token with a finite logit (49,152 entries per state on the embedded teacher, ~300 KB per
    response token; the main cache stays sparse). Either has the usual format and fingerprint,
    so ``tdkd distill`` reads it unchanged; an up-to-date one is reused.
    """
    from tdkd.cache import TeacherCache, build_cache, data_hash, teacher_fingerprint
    from tdkd.models import load_teacher

    if kind not in ("gold", "full"):
        raise ValueError(f"kind must be 'gold' or 'full', got {kind!r}")
    path = setup.data_dir / DATA_CACHES[kind]
    p_store = 1.0 if kind == "full" else setup.p_store
    teacher, tokenizer = load_teacher(setup.teacher)
    rows = _cache_rows(setup, kind, tokenizer)
    expect = {
        **teacher_fingerprint(teacher, tokenizer),
        "p_store": p_store,
        "data_hash": data_hash([(r["row_id"], r["prompt_ids"], r["response_ids"]) for r in rows]),
    }
    try:
        TeacherCache(path, expect=expect)  # up to date: reused
        return path
    except (FileNotFoundError, ValueError):
        pass
    build_cache(teacher, tokenizer, rows, path, p_store=p_store, overwrite=True, progress=progress)
    return path


# ----------------------------------------------------------------------------- runs


def run_dir(setup: DemoConfig, method: MethodSpec, seed: int) -> Path:
    return Path(setup.out) / "runs" / method.name / f"seed{seed}"


def run_method(
    setup: DemoConfig,
    method: MethodSpec,
    seed: int,
    *,
    progress: bool = False,
    keep_checkpoints: bool = False,
) -> dict[str, Any]:
    """Train (unless finished) and evaluate (unless up to date) one (method, seed) run.

    A finished run's checkpoints are deleted unless ``keep_checkpoints`` (``drop_checkpoints``:
    ~1.5 GB per run otherwise; without them a longer ``--steps`` needs the run folder deleted).

    Returns the run's evaluation (``tdkd eval`` output) with ``train_seconds`` (the wall time
    of the training done now, or the one recorded when it was trained).
    """
    out = run_dir(setup, method, seed)
    config = distill_config(dataclasses.replace(setup, train_seed=seed), method.algo)
    config["out"] = str(out)
    if method.p is not None:
        config["p"] = method.p
    config["loss_kwargs"] = {**config["loss_kwargs"], **method.loss_kwargs}
    config["cache"] = str(setup.data_dir / DATA_CACHES[method.data])
    if setup.init is not None:  # setup.student is the initial student's folder
        pin_initial_student(out, setup.student)
    start = time.perf_counter()
    trained = distill_run(config, progress=progress)
    if trained:
        write_json_atomic(out / "timing.json", {"train_seconds": time.perf_counter() - start})
    if not keep_checkpoints:
        drop_checkpoints(out)
    result = evaluate_models(
        setup, str(out), None, out / "eval.json", retrained=trained, progress=progress
    )
    return {**result, "train_seconds": (read_json(out / "timing.json") or {}).get("train_seconds")}


def mean_curve(curves: Sequence[Sequence[tuple[int, float]]]) -> list[tuple[int, float]]:
    """Pointwise mean over runs at the steps every run logged.

    >>> mean_curve([[(1, 1.0), (2, 3.0)], [(1, 3.0), (3, 0.0)]])
    [(1, 2.0)]
    """
    if not curves:
        return []
    common = set.intersection(*({s for s, _ in c} for c in curves))
    tables = [dict(c) for c in curves]
    return [(s, sum(t[s] for t in tables) / len(tables)) for s in sorted(common)]


def aggregate_runs(
    evals: Sequence[Mapping[str, Any]], metrics: Sequence[str] = tuple(TABLE_METRICS)
) -> dict[str, Any]:
    """Mean and sample std over training seeds of each run's mean over sampling seeds.

    ``evals[k]`` is the ``tdkd eval`` output of training seed k (``{metric}_mean``,
    ``{metric}_std``). Returns ``{metric}_mean``, ``{metric}_std`` (over training seeds; 0.0
    with one seed), ``{metric}_sampling_std`` (mean over runs), ``seeds``, ``per_seed`` (the run
    means) and ``one_seed`` (True when the std is not an estimate).
    """
    from tdkd.metrics import mean_std

    if not evals:
        raise ValueError("no runs to aggregate")
    out: dict[str, Any] = {"seeds": len(evals), "one_seed": len(evals) == 1}
    out["per_seed"] = [{m: e.get(f"{m}_mean") for m in metrics} for e in evals]
    for metric in metrics:
        values = [e.get(f"{metric}_mean") for e in evals]
        if any(v is None for v in values):
            out[f"{metric}_mean"] = out[f"{metric}_std"] = out[f"{metric}_sampling_std"] = None
            continue
        out[f"{metric}_mean"], out[f"{metric}_std"] = mean_std(values)
        out[f"{metric}_sampling_std"] = sum(e.get(f"{metric}_std") or 0.0 for e in evals) / len(
            evals
        )
    return out


def _reference_row(evaluation: Mapping[str, Any]) -> dict[str, Any]:
    """A reference row (teacher, initial student): its means and stds over sampling seeds."""
    return {k: v for k, v in evaluation.items() if k.endswith(("_mean", "_std")) or k == "seeds"}


def run_benchmark(
    config: BenchConfig, *, progress: bool = False, keep_checkpoints: bool = False
) -> dict[str, Any]:
    """Every (method, seed) run of ``config``, then the aggregated results JSON.

    Finished runs (and the initial student's run) drop their checkpoints unless
    ``keep_checkpoints`` (see ``run_method``).

    Writes ``experiments/results/<name>.json``:
    ``{"name", "config", "teacher": {...}, "initial": {...} | None (the initial student),
    "methods": {name: {rougeL_mean, rougeL_std, seeds,
    rougeL_teacher_*, exact_match_*, teacher_nll_*, coverage_*, gen_length_*,
    best_val_token_nll_*, train_seconds_mean, algo, group, p, loss_kwargs, data}},
    "curves": {name: {metric: [[step, mean over seeds]]}}}``. Metrics are in points (0-100)
    for Rouge-L and exact match, nats per token for the teacher NLL, fractions otherwise.
    """
    from tdkd.demo import prepare_data
    from tdkd.metrics import mean_std

    setup = config.setup
    prepare_data(setup, progress=progress)
    initial, initial_trained = None, False
    if setup.init is not None:
        initial, initial_trained = init_student(setup, progress=progress)
        setup = dataclasses.replace(setup, student=initial)
        if not keep_checkpoints:
            drop_checkpoints(Path(initial).parent)
    for kind in sorted({m.data for m in config.methods} - {"teacher"}):
        build_side_cache(setup, kind, progress=progress)
    teacher = evaluate_models(
        setup, setup.teacher, None, Path(setup.out) / "eval" / "teacher.json", progress=progress
    )
    methods: dict[str, Any] = {}
    curves: dict[str, Any] = {}
    for method in config.methods:
        evals = []
        for seed in range(method.seeds):
            log.info("%s seed %d", method.name, seed)
            evals.append(
                run_method(
                    setup, method, seed, progress=progress, keep_checkpoints=keep_checkpoints
                )
            )
        row = aggregate_runs(evals)
        best = []
        for seed in range(method.seeds):
            summary = read_json(run_dir(setup, method, seed) / "summary.json") or {}
            best.append(summary.get("best_value"))
        if best and all(b is not None for b in best):
            row["best_val_token_nll_mean"], row["best_val_token_nll_std"] = mean_std(best)
        times = [e["train_seconds"] for e in evals if e.get("train_seconds") is not None]
        row["train_seconds_mean"] = sum(times) / len(times) if times else None
        row |= {
            "algo": method.algo,
            "group": method.group,
            "p": method.p if method.p is not None else setup.p,
            "loss_kwargs": {**setup.loss_kwargs.get(method.algo, {}), **method.loss_kwargs},
            "data": method.data,
            "prompts": teacher["prompts"],
        }
        methods[method.name] = row
        per_run = [
            read_metrics_csv(run_dir(setup, method, s) / "metrics.csv") for s in range(method.seeds)
        ]
        curves[method.name] = {
            metric: [list(p) for p in mean_curve([r.get(metric, []) for r in per_run])]
            for metric in CURVE_METRICS
        }
    teacher_row = _reference_row(teacher)
    initial_row = None
    if initial is not None:  # the rows' common starting point, evaluated like them
        initial_eval = evaluate_models(
            setup,
            initial,
            None,
            Path(setup.out) / "eval" / "initial.json",
            retrained=initial_trained,
            progress=progress,
        )
        initial_row = _reference_row(initial_eval)
    results = {
        "name": config.name,
        "config": {
            "setup": config.setup.to_dict(),  # as given; the rows start from initial_student
            "initial_student": initial,
            "methods": [dataclasses.asdict(m) for m in config.methods],
        },
        "teacher": {
            **teacher_row,
            "prompts": teacher["prompts"],
            "sampling_seeds": teacher["seeds"],
        },
        "initial": initial_row,
        "methods": methods,
        "curves": curves,
    }
    write_json_atomic(config.results_path, results)
    return results
