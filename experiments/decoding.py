"""The main table's students decoded with the paper script's top-p instead of top-p 1.0.

    python experiments/decoding.py                     # bd and kd at student top-p 0.8
    python experiments/decoding.py --top-p 0.9 --methods bd,kd,seqkd

The benchmark decodes by sampling at top-p 1.0 (the MiniLLM/DistiLLM protocol); the paper's
released script samples at top-p 0.8, which drops the student's low-probability tail. BD's
students put most of their mass outside the teacher's nucleus (see RESULTS.md), so the
decoding nucleus may change the comparison. This script re-evaluates the *finished* runs of
``configs/main.yaml`` (nothing is trained) with ``tdkd eval`` at ``--top-p``, each run into
``<run>/eval_top_p<p>.json`` (reused when up to date), and writes
``experiments/results/decoding.json``: ``{"top_p", "config", "methods": {name: row}}`` with
rows aggregated over training seeds exactly like the main table (``aggregate_runs``);
``experiments/report.py`` puts it next to the top-p 1.0 rows.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.common import (  # noqa: E402
    CONFIGS,
    RESULTS,
    aggregate_runs,
    load_bench_config,
    run_dir,
)
from tdkd.demo import evaluate_models, write_json_atomic  # noqa: E402


def evaluate_decoding(
    config_path: str | Path, top_p: float, methods: list[str], *, results_dir: str | Path
) -> dict:
    """Every finished run of ``methods`` evaluated at student top-p ``top_p``; the JSON above.

    Raises:
        ValueError: an unknown method, or a run that has not finished (run the benchmark first).
    """
    config = load_bench_config(config_path, results_dir=results_dir)
    setup = dataclasses.replace(config.setup, eval_top_p=float(top_p))
    by_name = {m.name: m for m in config.methods}
    unknown = [m for m in methods if m not in by_name]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; {config_path} has {sorted(by_name)}")
    rows = {}
    for name in methods:
        evals = []
        for seed in range(by_name[name].seeds):
            folder = run_dir(setup, by_name[name], seed)
            if not (folder / "summary.json").is_file():
                raise ValueError(
                    f"{folder} has not finished; run experiments/run_benchmark.py first"
                )
            evals.append(
                evaluate_models(
                    setup, str(folder), None, folder / f"eval_top_p{top_p}.json", progress=False
                )
            )
        rows[name] = aggregate_runs(evals)
    return {"top_p": float(top_p), "config": str(config_path), "methods": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(CONFIGS / "main.yaml"))
    parser.add_argument("--top-p", type=float, default=0.8, help="student sampling nucleus")
    parser.add_argument("--methods", default="bd,kd", help="comma list of the config's rows")
    parser.add_argument("--results-dir", default=str(RESULTS))
    args = parser.parse_args(argv)
    if not 0.0 < args.top_p <= 1.0:
        raise ValueError(f"--top-p must lie in (0, 1], got {args.top_p}")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    results = evaluate_decoding(args.config, args.top_p, methods, results_dir=args.results_dir)
    write_json_atomic(Path(args.results_dir) / "decoding.json", results)
    from tdkd.demo import format_table

    print(f"student decoding at top-p {args.top_p}:")
    print(format_table(results["methods"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
