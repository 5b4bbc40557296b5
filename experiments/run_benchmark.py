"""The benchmark: BD against the baselines (main table) and BD's ablations, run by run.

    python experiments/run_benchmark.py                                  # main + ablations
    python experiments/run_benchmark.py --config experiments/configs/main.yaml
    python experiments/run_benchmark.py --steps 400 --prompts 2000 --device cuda   # scale up
    python experiments/run_benchmark.py --list                           # what is done / to do

Reads top to bottom:
1. the configs (``experiments/configs/*.yaml``; sizes overridable by options below);
2. ``tdkd prepare`` once (embedded teacher samples + sparse top-p cache), plus a cache over
   the datasets' gold answers for SFT and one of the whole teacher distribution for p = 1.0;
   the shared initial student (``init:``), trained once;
3. the teacher's own evaluation and the initial student's (the reference rows);
4. for every method and training seed: ``tdkd distill`` (skipped once finished; resumed from
   its checkpoint when interrupted), then ``tdkd eval`` on the test prompts over sampling seeds
   (skipped when up to date);
5. mean and std over training seeds -> ``experiments/results/<name>.json``;
6. ``experiments/report.py``: plots and ``experiments/RESULTS.md``.

Deviations from the paper (PAPER.md section 5), all for 2-CPU scale: SmolLM2-135M-Instruct
teacher and a 4-layer layer-dropped student (not GPT-2/OPT/Qwen pairs), initialised not by SFT
of a pretrained LM but by one shared KD run on the train split of 600 prompts' teacher samples
(``init:``, see ``tdkd.demo.InitSpec``: the layer-dropped copy is not a language model yet);
chatterbot + synthetic prompts instead of Dolly, 2 teacher samples per prompt (not 8),
responses <= 32 tokens (not 512); 40 steps of 8 responses at lr 1e-4 (not 3 epochs of batch 64
at 5e-6); BD without the pre-training LM loss (lm_coef = 0: there is no pre-training corpus
offline) and without the Q max-shift + clip at -10 (``q_min: null``; the clipped form did worse
on a layer-dropped student in the demo, see tdkd/demo.py; the ablations keep one clipped row); the
checkpoint is chosen by the student's NLL of held-out teacher tokens (not validation Rouge-L);
3 sampling seeds (not 5). p = 1.0 is the real thing: a cache of the whole teacher distribution.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.common import (  # noqa: E402
    CONFIGS,
    BenchConfig,
    load_bench_config,
    run_benchmark,
    run_dir,
)

DEFAULT_CONFIGS = (CONFIGS / "main.yaml", CONFIGS / "ablations.yaml")
SIZE_OPTIONS = {
    "prompts": int,
    "samples": int,
    "max_new_tokens": int,
    "steps": int,
    "batch_size": int,
    "lr": float,
    "seeds": int,
    "eval_prompts": int,
    "student": str,
    "device": str,
    "out": str,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--config", action="append", default=None, help="benchmark YAML (repeatable)"
    )
    for name, kind in SIZE_OPTIONS.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, default=None)
    parser.add_argument(
        "--train-seeds", type=int, default=None, help="cap on training seeds per method"
    )
    parser.add_argument("--methods", default=None, help="comma list: run only these rows")
    parser.add_argument("--results-dir", default=None, help="default experiments/results")
    parser.add_argument(
        "--no-init",
        action="store_true",
        help="start every row from --student as it is (no shared initial distillation)",
    )
    parser.add_argument(
        "--keep-checkpoints",
        action="store_true",
        help="keep finished runs' checkpoints (~1.5 GB each) so a longer --steps continues them",
    )
    parser.add_argument("--list", action="store_true", help="list the runs and their state")
    parser.add_argument("--no-report", action="store_true", help="do not regenerate RESULTS.md")
    parser.add_argument("--progress", action="store_true", help="progress bars per stage")
    return parser.parse_args(argv)


def load_configs(args: argparse.Namespace) -> list[BenchConfig]:
    import dataclasses

    overrides = {name: getattr(args, name) for name in SIZE_OPTIONS}
    configs = []
    for path in args.config or DEFAULT_CONFIGS:
        config = load_bench_config(path, results_dir=args.results_dir, **overrides)
        methods = config.methods
        if args.methods:
            keep = {m.strip() for m in args.methods.split(",") if m.strip()}
            methods = tuple(m for m in methods if m.name in keep)
        if args.train_seeds is not None:
            if args.train_seeds < 1:
                raise ValueError(f"--train-seeds must be >= 1, got {args.train_seeds}")
            methods = tuple(
                dataclasses.replace(m, seeds=min(m.seeds, args.train_seeds)) for m in methods
            )
        if methods:
            if args.no_init:
                config = dataclasses.replace(
                    config, setup=dataclasses.replace(config.setup, init=None)
                )
            configs.append(dataclasses.replace(config, methods=methods))
    if not configs:
        raise ValueError(f"no method left to run (--methods {args.methods!r})")
    return configs


def list_runs(configs: list[BenchConfig]) -> list[str]:
    """One line per (config, method, seed): finished, evaluated, or to do."""
    lines = []
    for config in configs:
        for method in config.methods:
            for seed in range(method.seeds):
                folder = run_dir(config.setup, method, seed)
                state = (
                    "evaluated"
                    if (folder / "eval.json").is_file()
                    else "trained"
                    if (folder / "summary.json").is_file()
                    else "started"
                    if (folder / "ckpt").is_dir()
                    else "to do"
                )
                lines.append(
                    f"{config.name:<10} {method.name:<12} seed {seed}  {state:<9} {folder}"
                )
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    configs = load_configs(args)
    if args.list:
        print("\n".join(list_runs(configs)))
        return 0
    from tdkd.demo import format_table

    for config in configs:
        start = time.perf_counter()
        results = run_benchmark(
            config, progress=args.progress, keep_checkpoints=args.keep_checkpoints
        )
        print(f"\n{config.name}: {time.perf_counter() - start:.0f} s -> {config.results_path}")
        initial = {"initial student": results["initial"]} if results.get("initial") else {}
        print(format_table({"teacher": results["teacher"], **initial, **results["methods"]}))
    if not args.no_report:
        from experiments import report

        report.main(["--results-dir", str(configs[0].results_dir)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
