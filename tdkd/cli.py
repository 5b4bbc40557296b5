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
}

# `tdkd bench TARGET` -> (module, one-line help)
BENCHMARKS: dict[str, tuple[str, str]] = {}


def build_parser() -> argparse.ArgumentParser:
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
        _add_module_arguments(cmd, module)
    if BENCHMARKS:
        bench = sub.add_parser("bench", help="benchmarks that print one JSON line")
        targets = bench.add_subparsers(dest="target", required=True, metavar="TARGET")
        for name, (module, help_text) in BENCHMARKS.items():
            cmd = targets.add_parser(name, help=help_text, description=help_text)
            cmd.set_defaults(_module=module)
            _add_module_arguments(cmd, module)
    return parser


def _add_module_arguments(parser: argparse.ArgumentParser, module: str) -> None:
    # Argument definitions are needed for --help, so the module is imported here; modules
    # keep their heavy imports (torch models, transformers) inside run().
    importlib.import_module(module).add_arguments(parser)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
