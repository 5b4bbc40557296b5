"""Regenerate ``experiments/RESULTS.md`` and its plots from the JSON results.

    python experiments/report.py

Reads ``experiments/results/{demo,main,ablations,decoding,sparsity,theory}.json`` (whichever exist;
a missing one becomes a "not measured yet" line naming the command that measures it) and
writes PNG plots into ``experiments/results/plots/`` and ``experiments/RESULTS.md``. Nothing
here measures anything: every number in RESULTS.md comes from a JSON file written by a run.

Comparisons: BD against each other row, metric by metric, with ``tdkd.demo.compare``: "better"
or "worse" only when the difference exceeds twice its standard error over training seeds,
"within noise" otherwise, and "one seed: no noise estimate" when a row has a single seed.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.common import REPO, RESULTS  # noqa: E402
from tdkd.demo import (  # noqa: E402
    CURVE_TITLES,
    TABLE_METRICS,
    compare,
    format_table,
    plot_bars,
    plot_learning_curves,
    read_json,
)
from tdkd.io import write_atomic  # noqa: E402

TABLE = ("rougeL", "rougeL_teacher", "exact_match", "teacher_nll", "coverage", "gen_length")


def _rel(path: Path, start: Path) -> str:
    return os.path.relpath(path, start).replace(os.sep, "/")


def _curves(results: dict) -> dict[str, dict[str, list[tuple[int, float]]]]:
    return {
        name: {m: [tuple(p) for p in points] for m, points in series.items()}
        for name, series in (results.get("curves") or {}).items()
    }


# metrics with a direction (length has none: neither longer nor shorter is better)
RANKED = tuple(m for m in TABLE if TABLE_METRICS[m][1] is not None)


def bd_verdicts(methods: dict[str, dict], reference: str = "bd") -> tuple[list[str], list[str]]:
    """(all comparison lines of ``reference`` vs every other row, the ones where it did not
    come out better: worse, within noise, or worse / tied at face value with one seed; length,
    which has no better direction, is compared but never counted)."""
    lines, not_better = [], []
    for name in methods:
        if name == reference:
            continue
        for metric in TABLE:
            for line in compare(methods, reference, name, [metric]):
                lines.append(line)
                if metric in RANKED and not line.endswith(
                    (f"{reference} better", f"{reference} better)")
                ):
                    not_better.append(line)
    return lines, not_better


def summary_lines(
    methods: dict[str, dict], reference: str = "bd", initial: dict | None = None
) -> list[str]:
    """Per ranked metric: the best trained row, where ``reference`` ranks (by mean) and, given
    the ``initial`` student's row, which rows ended above their common starting point.

    >>> rows = {"bd": {"teacher_nll_mean": 8.0}, "kd": {"teacher_nll_mean": 6.0}}
    >>> summary_lines(rows, initial={"teacher_nll_mean": 6.5})
    ['- teacher NLL: best kd 6.00; bd ranks 2 of 2; above the initial student (6.50): kd']
    """
    out = []
    for metric in RANKED:
        title, higher = TABLE_METRICS[metric]
        values = {n: r.get(f"{metric}_mean") for n, r in methods.items()}
        values = {n: v for n, v in values.items() if v is not None}
        if not values or len(set(values.values())) == 1:
            continue
        order = sorted(values, key=lambda n: values[n], reverse=higher)
        line = f"- {title}: best {order[0]} {values[order[0]]:.2f}"
        if reference in values:
            line += f"; {reference} ranks {order.index(reference) + 1} of {len(order)}"
        start = (initial or {}).get(f"{metric}_mean")
        if start is not None:
            above = [n for n in order if (values[n] > start) == higher and values[n] != start]
            line += f"; above the initial student ({start:.2f}): {', '.join(above) or 'none'}"
        out.append(line)
    return out


def init_text(init: dict | None) -> str:
    """How the rows' shared initial student was made (``tdkd.demo.InitSpec``), or ''.

    >>> init_text({"algo": "kd", "prompts": 600, "samples": 1, "steps": 150, "lr": 0.001})
    ' initialised once by kd on the train split of 600 prompts x 1 teacher samples (150 steps at lr 0.001)'
    """
    if not init:
        return ""
    return (
        f" initialised once by {init['algo']} on the train split of {init['prompts']} prompts x "
        f"{init['samples']} teacher samples ({init['steps']} steps at lr {init['lr']})"
    )


def demo_section(
    demo: dict | None,
    plots: Path,
    md_dir: Path,
    *,
    title: str = "The demo (`make demo`)",
    stem: str = "demo",
) -> list[str]:
    out = [f"## {title}", ""]
    if demo is None:
        return out + ["Not measured yet: `make demo`, then copy `runs/demo/results.json` to "
                      "`experiments/results/demo.json`.", ""]  # fmt: skip
    config = demo["config"]
    methods = demo["methods"]
    out += [
        f"{config['teacher']} -> student `{config['student']}`{init_text(config.get('init'))}, "
        f"{config['steps']} steps x "
        f"{config['batch_size']} responses per algorithm at lr {config['lr']}, p = {config['p']}; "
        f"{methods['teacher'].get('seeds')} sampling seeds on the test prompts, **one training "
        "seed** (the +- is decoding noise only). Loss arguments: "
        f"{config.get('loss_kwargs') or 'defaults'}.",
        "",
        format_table(methods, TABLE, markdown=True),
        "",
    ]
    win = demo.get("win_rate")
    if win:
        out += [f"Teacher-judged win rate {win['a']} over {win['b']}: {win['mean']:.3f} +- "
                f"{win['std']:.3f}.", ""]  # fmt: skip
    out += [f"- {line}" for line in demo.get("comparison", [])] + [""]
    times = demo.get("times")
    if times:
        out += [f"Stage times (s): {times}.", ""]
    if demo.get("note"):
        out += [f"Note: {demo['note']}.", ""]
    curves = _curves(demo)
    if curves:
        path = plot_learning_curves(curves, list(CURVE_TITLES), plots / f"{stem}_curves.png",
                                    titles=CURVE_TITLES)  # fmt: skip
        out += [f"![demo learning curves]({_rel(path, md_dir)})", ""]
    path = plot_bars(methods, TABLE, plots / f"{stem}_bars.png")
    out += [f"![demo bars]({_rel(path, md_dir)})", ""]
    return out


def table_section(
    title: str, results: dict | None, command: str, plots: Path, md_dir: Path, stem: str
) -> tuple[list[str], list[str]]:
    out = [f"## {title}", ""]
    if results is None:
        return out + [f"Not measured yet: `{command}`.", ""], []
    setup = results["config"]["setup"]
    methods = results["methods"]
    rows = {"teacher": {**results["teacher"], "seeds": "ref"}}
    if results.get("initial"):  # the common starting point of every row
        rows["initial student"] = {**results["initial"], "seeds": "ref"}
    rows |= methods
    out += [
        f"Teacher {setup['teacher']}, student `{setup['student']}`{init_text(setup.get('init'))}, "
        f"{setup['prompts']} prompts x "
        f"{setup['samples']} teacher samples (<= {setup['max_new_tokens']} tokens), "
        f"{setup['steps']} steps x {setup['batch_size']} responses at lr {setup['lr']}, "
        f"p = {setup['p']} unless stated; {results['teacher']['prompts']} test prompts x "
        f"{setup['seeds']} sampling seeds per run. +- = sample std over **training seeds** "
        "(`seeds` column; the reference rows' +- is over sampling seeds); Rouge-L and exact match in "
        "points (Rouge-L (gold) against the prompt's gold answer), teacher NLL in nats/token, "
        "coverage = share of generated tokens inside the teacher's nucleus at p.",
        "",
        format_table(rows, TABLE, markdown=True),
        "",
    ]
    extra = ["| method | algo | p | loss kwargs | data | best val token NLL | train s/run |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, row in methods.items():
        nll = row.get("best_val_token_nll_mean")
        nll_text = (
            "-" if nll is None else f"{nll:.3f} +- {row.get('best_val_token_nll_std', 0):.3f}"
        )
        secs = row.get("train_seconds_mean")
        extra.append(
            f"| {name} | {row['algo']} | {row['p']} | {row['loss_kwargs'] or '-'} | "
            f"{row['data']} | {nll_text} | {'-' if secs is None else f'{secs:.0f}'} |"
        )
    out += extra + [""]
    lines, not_better = [], []
    summary = summary_lines(methods, initial=results.get("initial"))
    if summary:
        out += ["By mean over training seeds, among the trained rows (not evidence by itself; "
                "the verdicts below account for noise):", "", *summary, ""]  # fmt: skip
    if "bd" in methods:
        lines, not_better = bd_verdicts(methods)
        out += ["BD against every other row (difference > 2 standard errors over training "
                "seeds, else within noise):", ""]  # fmt: skip
        out += [f"- {line}" for line in lines] + [""]
    curves = _curves(results)
    if curves:
        titles = {k: v for k, v in CURVE_TITLES.items() if k.startswith("eval/")}
        path = plot_learning_curves(curves, list(titles), plots / f"{stem}_curves.png",
                                    titles=titles)  # fmt: skip
        out += [f"![{stem} learning curves (mean over training seeds)]({_rel(path, md_dir)})", ""]
    path = plot_bars(rows, TABLE, plots / f"{stem}_bars.png")
    out += [f"![{stem} bars (+- std over training seeds)]({_rel(path, md_dir)})", ""]
    return out, not_better


def decoding_section(decoding: dict | None, main: dict | None) -> tuple[list[str], list[str]]:
    """The main table's rows re-decoded at the student top-p of ``decoding.json`` next to their
    top-p 1.0 rows; (lines, BD's not-better comparisons at that top-p)."""
    out = ["## Decoding at the paper script's top-p", ""]
    if decoding is None:
        return out + ["Not measured yet: `python experiments/decoding.py`.", ""], []
    top_p = decoding["top_p"]
    rows = {}
    for name, row in decoding["methods"].items():
        if main is not None and name in main.get("methods", {}):
            rows[f"{name} (top-p 1.0)"] = main["methods"][name]
        rows[f"{name} (top-p {top_p})"] = row
    out += [
        f"The main table's finished runs, sampled at student top-p {top_p} (the paper's released "
        "script) instead of 1.0 (the benchmark's MiniLLM protocol); nothing retrained, same "
        "test prompts and sampling seeds; +- over training seeds.",
        "",
        format_table(rows, TABLE, markdown=True),
        "",
    ]
    not_better: list[str] = []
    if "bd" in decoding["methods"]:
        lines, not_better = bd_verdicts(decoding["methods"])
        out += [f"BD against the other rows at top-p {top_p}:", ""]
        out += [f"- {line}" for line in lines] + [""]
    return out, not_better


def sparsity_section(results: dict | None, plots: Path, md_dir: Path) -> list[str]:
    out = ["## The teacher's sparsity", ""]
    if results is None:
        return out + ["Not measured yet: `python experiments/sparsity.py`.", ""]
    out += [
        f"{results['states']} response states of {results['teacher']} (vocabulary "
        f"{results['vocab_size']}), nuclei stored up to p_store = {results['p_store']}.",
        "",
        "| top-k | mean teacher mass | states with mass >= 0.9 | exact (k <= stored nucleus) |",
        "|---|---|---|---|",
    ]
    for row in results["topk"]:
        out.append(
            f"| {row['k']} | {row['mean_mass']:.3f} | {row['share_at_least_0.9']:.1%} | "
            f"{row['exact_share']:.1%} |"
        )
    out += ["", "Where the stored nucleus is shorter than k the mass is a lower bound. For "
            "comparison, the paper reports ~96% of the mass on the top-50 tokens and >= 90% on "
            "the top-7 for its teachers.", "",
            "| p | mean nucleus | median | p95 | max |", "|---|---|---|---|---|"]  # fmt: skip
    for row in results["support"]:
        out.append(
            f"| {row['p']} | {row['mean']:.1f} | {row['median']:.0f} | {row['p95']:.0f} | "
            f"{row['max']} |"
        )
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tdkd.demo import _save_figure

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.3))
    ks = [r["k"] for r in results["topk"]]
    left.plot(ks, [r["mean_mass"] for r in results["topk"]], marker="o", label="mean mass")
    left.plot(ks, [r["share_at_least_0.9"] for r in results["topk"]], marker="s",
              label="share of states >= 0.9")  # fmt: skip
    left.set_xscale("log")
    left.set_xlabel("k (top-k teacher tokens)")
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    ps = [r["p"] for r in results["support"]]
    for stat in ("mean", "median", "p95"):
        right.plot(ps, [max(r[stat], 1) for r in results["support"]], marker="o", label=stat)
    right.set_yscale("log")
    right.set_xlabel("p")
    right.set_ylabel("nucleus size")
    right.grid(alpha=0.3)
    right.legend(fontsize=8)
    fig.tight_layout()
    path = plots / "sparsity.png"
    _save_figure(fig, path)
    plt.close(fig)
    return out + ["", f"![sparsity]({_rel(path, md_dir)})", ""]


def theory_section(results: dict | None) -> list[str]:
    out = ["## Theory check (`tdkd theory`)", ""]
    if results is None:
        return out + ["Not measured yet: `python experiments/theory_table.py`.", ""]
    return out + [
        f"{results['config']['mdps']} random tabular soft MDPs, {results['seconds']} s:",
        "",
        "```",
        results["table"],
        "```",
        "",
    ]


def build_report(results_dir: Path, md_path: Path) -> str:
    """The text of RESULTS.md (plots are written on the way)."""
    plots = results_dir / "plots"
    md_dir = md_path.parent
    load: dict[str, Any] = {
        name: read_json(results_dir / f"{name}.json")
        for name in ("demo", "main", "ablations", "decoding", "sparsity", "theory")
    }
    text = [
        "# Results",
        "",
        "Generated by `python experiments/report.py` from the JSON files in "
        "`experiments/results/`; do not edit by hand. Every number comes from a run of the "
        "command named in its section; nothing is picked among seeds.",
        "",
    ]
    text += demo_section(load["demo"], plots, md_dir)
    main, main_not_better = table_section(
        "Main table: BD vs the baselines", load["main"],
        "python experiments/run_benchmark.py --config experiments/configs/main.yaml",
        plots, md_dir, "main",
    )  # fmt: skip
    ablations, ablation_not_better = table_section(
        "Ablations of BD", load["ablations"],
        "python experiments/run_benchmark.py --config experiments/configs/ablations.yaml",
        plots, md_dir, "ablations",
    )  # fmt: skip
    decoding, decoding_not_better = decoding_section(load["decoding"], load["main"])
    text += main + ablations + decoding
    text += sparsity_section(load["sparsity"], plots, md_dir)
    text += theory_section(load["theory"])
    if load["main"] is not None:
        text += ["## Where BD did not beat a baseline (main table)", ""]
        text += [f"- {line}" for line in main_not_better] or ["- nowhere"]
        text.append("")
    if load["decoding"] is not None:
        text += [f"## Where BD did not beat a baseline at student top-p {load['decoding']['top_p']}",
                 ""]  # fmt: skip
        text += [f"- {line}" for line in decoding_not_better] or ["- nowhere"]
        text.append("")
    if load["ablations"] is not None:
        text += ["## Where the reference BD did not beat an ablated variant", ""]
        text += [f"- {line}" for line in ablation_not_better] or ["- nowhere"]
        text.append("")
    return "\n".join(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results-dir", default=str(RESULTS))
    parser.add_argument("--out", default=str(REPO / "experiments" / "RESULTS.md"))
    args = parser.parse_args(argv)
    md_path = Path(args.out)
    text = build_report(Path(args.results_dir), md_path)
    write_atomic(md_path, text)
    print(f"wrote {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
