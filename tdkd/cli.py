"""The ``tdkd`` command.

Each subcommand lives in its own module, which exposes ``add_arguments(parser)`` and
``run(args) -> int``; this file only wires them together and imports a module when its
subcommand is used, so ``tdkd theory`` never pays for loading transformers.

The CLI is the top of the stack: it is the one place in ``tdkd`` that may import from
``envs`` and ``agents`` (lazily, for ``bench env``, ``bench step`` and ``distill``).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "theory": ("tdkd.theory", "check the paper's Propositions 1-4 on random tabular soft MDPs"),
    "prepare": ("tdkd.prepare", "teacher responses + sparse top-p teacher cache in one command"),
    "distill": ("agents.distill_cli", "train a student with any algorithm on a prepared cache"),
    "eval": ("tdkd.eval_cli", "Rouge-L, exact match, teacher NLL, coverage, win rate over seeds"),
    "demo": ("tdkd.demo", "the main job: prepare, distil with BD and KD, evaluate, table + plots"),
}

# `tdkd bench TARGET` -> (module, one-line help)
BENCHMARKS: dict[str, tuple[str, str]] = {
    "cache": ("tdkd.bench_cache", "sparse teacher cache: bytes per token, extraction cost"),
    "env": ("envs.bench", "rollout throughput of the batched top-p token env vs a naive env"),
    "step": ("agents.bench_step", "seconds per step: BD vs KD from the cache, cached vs live KD"),
}


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser; only the subcommand named in ``argv`` imports its module for its options.

    ``tdkd --help`` lists every command without importing any; ``tdkd NAME --help`` imports
    NAME's module alone, so a slow or broken module never affects another command.
    """
    words = [w for w in (sys.argv[1:] if argv is None else argv) if not w.startswith("-")]
    chosen = words[0] if words else None
    target = words[1] if len(words) > 1 else None
    parser = argparse.ArgumentParser(
        prog="tdkd",
        description="Distil language models with temporal-difference learning on the "
        "teacher's top-p MDP.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        cmd.set_defaults(_module=module)
        if name == chosen:
            importlib.import_module(module).add_arguments(cmd)
    if BENCHMARKS:
        bench = sub.add_parser("bench", help="benchmarks that print one JSON line")
        targets = bench.add_subparsers(dest="target", required=True, metavar="TARGET")
        for name, (module, help_text) in BENCHMARKS.items():
            cmd = targets.add_parser(name, help=help_text, description=help_text)
            cmd.set_defaults(_module=module)
            if chosen == "bench" and name == target:
                importlib.import_module(module).add_arguments(cmd)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser(argv).parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except (ValueError, FileNotFoundError) as err:
        # User errors: one clear line, no traceback.
        print(f"tdkd {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
