"""The theory table (issue item 2d): `tdkd theory` on random tabular soft MDPs, as JSON.

    python experiments/theory_table.py            # 300 MDPs, the paper's four propositions
    python experiments/theory_table.py --mdps 50

Runs ``tdkd.theory.measure`` + ``summarise`` (see ``tdkd theory --help`` for what is checked)
and writes ``experiments/results/theory.json`` (the report, with the fixed-width table under
"table"); ``experiments/report.py`` puts the table into RESULTS.md. Exit code 1 when any
proposition fails, like ``tdkd theory``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.common import RESULTS  # noqa: E402
from tdkd.demo import write_json_atomic  # noqa: E402


def theory_report(mdps: int = 300, seed: int = 0) -> dict:
    """``tdkd.theory``'s report for ``mdps`` random MDPs, with its table and the wall time."""
    from tdkd.theory import TheoryConfig, format_table, measure, summarise

    config = TheoryConfig(mdps=mdps, seed=seed)
    start = time.perf_counter()
    report = summarise(measure(config), config)
    report["seconds"] = round(time.perf_counter() - start, 2)
    report["table"] = format_table(report)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mdps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results-dir", default=str(RESULTS))
    args = parser.parse_args(argv)
    report = theory_report(args.mdps, args.seed)
    write_json_atomic(Path(args.results_dir) / "theory.json", report)
    print(report["table"])
    print(f"{args.mdps} MDPs in {report['seconds']:.1f} s")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
