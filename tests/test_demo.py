"""`tdkd demo`: the whole pipeline on tiny models, its resumption, and the table/plot helpers."""

from __future__ import annotations

import argparse
import json
import math
import statistics

import pytest
import torch
import yaml

from tdkd import cli
from tdkd.data import load_responses
from tdkd.demo import (
    DemoConfig,
    InitSpec,
    add_arguments,
    compare,
    config_from_args,
    format_table,
    pin_initial_student,
    plot_bars,
    plot_learning_curves,
    read_metrics_csv,
    run_demo,
    within_noise,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# ----------------------------------------------------------------------------- helpers


def _welch_within_noise_reference(a: list[float], b: list[float], z: float) -> bool:
    """From the raw samples: |t| <= z with Welch's t = (mean_a - mean_b) / sqrt(va/na + vb/nb)."""
    va = statistics.variance(a) if len(a) > 1 else 0.0
    vb = statistics.variance(b) if len(b) > 1 else 0.0
    diff = statistics.fmean(a) - statistics.fmean(b)
    se = math.sqrt(va / len(a) + vb / len(b))
    return abs(diff) <= z * se


def test_within_noise_matches_welch_on_raw_samples():
    g = torch.Generator().manual_seed(0)
    decided = set()
    for _ in range(300):
        na, nb = (int(x) for x in torch.randint(1, 6, (2,), generator=g))
        shift = float(torch.rand((), generator=g)) * 3
        a = (torch.randn(na, generator=g, dtype=torch.float64)).tolist()
        b = (torch.randn(nb, generator=g, dtype=torch.float64) + shift).tolist()
        z = float(torch.rand((), generator=g)) * 3
        sa = statistics.stdev(a) if na > 1 else 0.0
        sb = statistics.stdev(b) if nb > 1 else 0.0
        got = within_noise(statistics.fmean(a), sa, na, statistics.fmean(b), sb, nb, z=z)
        assert got == _welch_within_noise_reference(a, b, z)
        decided.add(got)
    assert decided == {True, False}  # both outcomes were exercised


def test_within_noise_edge_cases():
    assert within_noise(1.0, 0.0, 1, 1.0, 0.0, 1)  # an exact tie
    assert not within_noise(1.0, 0.0, 1, 1.0 + 1e-9, 0.0, 1)  # one seed: no noise estimate
    with pytest.raises(ValueError, match="n_a and n_b"):
        within_noise(1.0, 0.1, 0, 1.0, 0.1, 3)


def test_compare_verdicts_respect_the_metric_direction():
    results = {
        "bd": {"seeds": 3, "rougeL_mean": 30.0, "rougeL_std": 0.1, "teacher_nll_mean": 2.0,
               "teacher_nll_std": 0.01, "coverage_mean": 0.90, "coverage_std": 0.05,
               "exact_match_mean": None, "exact_match_std": None},
        "kd": {"seeds": 3, "rougeL_mean": 20.0, "rougeL_std": 0.1, "teacher_nll_mean": 1.0,
               "teacher_nll_std": 0.01, "coverage_mean": 0.91, "coverage_std": 0.05,
               "exact_match_mean": 10.0, "exact_match_std": 1.0},
    }  # fmt: skip
    lines = compare(results, "bd", "kd")
    assert len(lines) == 3  # exact match is missing on one side: skipped
    assert lines[0].startswith("Rouge-L (gold)") and lines[0].endswith("bd better")
    assert lines[1].startswith("teacher NLL") and lines[1].endswith("bd worse")  # lower is better
    assert lines[2].endswith("within noise")
    one = {k: {**v, "seeds": 1} for k, v in results.items()}
    lines = compare(one, "bd", "kd")
    assert all("one seed: no noise estimate" in line for line in lines)
    assert lines[0].endswith("(at face value: bd better)")


def test_format_table_plain_and_markdown():
    results = {
        "teacher": {"seeds": 2, "rougeL_mean": 41.0, "rougeL_std": 2.5},
        "bd": {"seeds": 2, "rougeL_mean": None, "rougeL_std": None},
    }
    plain = format_table(results, ["rougeL"]).splitlines()
    assert plain[1].split()[:2] == ["teacher", "2"] and plain[1].endswith("41.00 +- 2.50")
    assert plain[2].endswith("-")
    md = format_table(results, ["rougeL"], markdown=True).splitlines()
    assert md[0] == "| method | seeds | Rouge-L (gold) |"
    assert md[2] == "| teacher | 2 | 41.00 +- 2.50 |" and md[3] == "| bd | 2 | - |"


def test_read_metrics_csv_sorts_and_skips_torn_rows(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text("step,name,value\n3,a,1.5\n1,a,2.5\n2,b,nan\n4,a\n5,a,x\n")
    series = read_metrics_csv(path)
    assert series["a"] == [(1, 2.5), (3, 1.5)] and math.isnan(series["b"][0][1])
    with pytest.raises(FileNotFoundError, match="train the run first"):
        read_metrics_csv(tmp_path / "missing.csv")


def test_plots_are_written_atomically(tmp_path):
    curves = {"bd": {"m": [(1, 1.0), (2, 0.5)]}, "kd": {"m": [(1, 1.2)], "other": [(1, 0.0)]}}
    path = plot_learning_curves(curves, ["m", "absent"], tmp_path / "p" / "curves.png")
    assert path.read_bytes()[:8] == PNG_MAGIC
    results = {"bd": {"rougeL_mean": 3.0, "rougeL_std": 1.0}, "kd": {"rougeL_mean": None}}
    path = plot_bars(results, ["rougeL", "coverage"], tmp_path / "p" / "bars.png")
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["bars.png", "curves.png"]


def test_bad_config_is_refused_with_the_flag_named():
    with pytest.raises(ValueError, match="--steps"):
        DemoConfig(steps=0)
    with pytest.raises(ValueError, match="p_store"):
        DemoConfig(p=0.99, p_store=0.95)
    with pytest.raises(ValueError, match="--algos"):
        DemoConfig(algos=("bd", "bd"))
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    config = config_from_args(parser.parse_args(["--algos", "bd, sft", "--steps", "7"]))
    assert config.algos == ("bd", "sft") and config.steps == 7
    assert config.init == InitSpec()  # the demo distils its initial student by default
    config = config_from_args(parser.parse_args(["--init-prompts", "50", "--init-steps", "9"]))
    assert (config.init.prompts, config.init.steps) == (50, 9)
    assert config_from_args(parser.parse_args(["--no-init"])).init is None
    assert DemoConfig(init={"steps": 3}).init == InitSpec(steps=3)
    with pytest.raises(ValueError, match="init.steps must be an integer >= 1"):
        DemoConfig(init={"steps": 0})
    assert InitSpec(lr="1e-3").lr == 1e-3  # YAML reads 1e-3 as a string
    for bad, match in [
        (True, "init must be a mapping"),
        ({"step": 3}, "init has unknown keys"),
        ({"batch_size": 0}, "init.batch_size"),
        ({"lr": "fast"}, "init.lr must be a number"),
        ({"algo": ""}, "init.algo"),
    ]:
        with pytest.raises(ValueError, match=match):
            DemoConfig(init=bad)
    config = DemoConfig(init={"steps": 3})
    assert DemoConfig(**config.to_dict()) == config  # to_dict round-trips, init included

    argv = ["--loss-kwarg", "bd:lm_coef=0.5", "--loss-kwarg", "bd:alpha_chi=null"]
    config = config_from_args(parser.parse_args(argv))
    assert config.loss_kwargs == {"bd": {"q_min": None, "lm_coef": 0.5, "alpha_chi": None}}
    config = config_from_args(parser.parse_args(["--loss-kwarg", "bd:q_min=-10"]))
    assert config.loss_kwargs == {"bd": {"q_min": -10}}
    with pytest.raises(ValueError, match="ALGO:KEY=VALUE"):
        config_from_args(parser.parse_args(["--loss-kwarg", "lm_coef=0.5"]))
    with pytest.raises(ValueError, match="not in --algos"):
        config_from_args(parser.parse_args(["--loss-kwarg", "sac:tau=0.1"]))


def test_cli_reports_bad_input_in_one_line(capsys):
    assert cli.main(["demo", "--algos", ",", "--no-progress"]) == 2
    assert "--algos is empty" in capsys.readouterr().err


# ----------------------------------------------------------------------------- end to end


def _mtimes(folder):
    return {
        p.relative_to(folder).as_posix(): p.stat().st_mtime_ns
        for p in folder.rglob("*")
        if p.is_file()
    }


def test_demo_pipeline_on_tiny_models_and_resume(tiny_teacher_dir, tmp_path):
    config = DemoConfig(
        out=str(tmp_path / "demo"),
        teacher=str(tiny_teacher_dir),
        student="layers:1",
        prompts=16,
        samples=2,
        max_new_tokens=4,
        max_prompt_tokens=64,
        val_fraction=0.3,
        test_fraction=0.3,
        steps=2,
        batch_size=2,
        eval_every=1,
        eval_batches=1,
        seeds=2,
        eval_prompts=3,
        loss_kwargs={"bd": {"gamma": 0.9}},
        init={"prompts": 12, "steps": 2},
    )
    out = tmp_path / "demo"
    results = run_demo(config, progress=False)

    # the resolved config and every stage's outputs sit in the output folder
    assert json.loads((out / "config.json").read_text()) == config.to_dict()
    assert json.loads((out / "init" / "run" / "summary.json").read_text())["steps"] == 2
    # the initial student never trains on a test prompt: splits are a hash of the prompt
    split_of = {}
    for folder in (out / "data", out / "init" / "data"):
        for row in load_responses(folder / "responses").select_columns(["prompt", "split"]):
            assert split_of.setdefault(row["prompt"], row["split"]) == row["split"]
    for algo in ("bd", "kd"):
        summary = json.loads((out / "runs" / algo / "summary.json").read_text())
        assert summary["algo"] == algo and summary["steps"] == 2
        saved = yaml.safe_load((out / "runs" / algo / "config.yaml").read_text())
        assert saved["loss_kwargs"] == ({"gamma": 0.9} if algo == "bd" else {})
        assert saved["student"] == str(out / "init" / "run" / "student")  # the shared init
        assert (out / "runs" / algo / "student" / "config.json").is_file()
        curves = read_metrics_csv(out / "runs" / algo / "metrics.csv")
        assert [s for s, _ in curves["eval/token_nll"]] == [1, 2]
    for name in ("learning_curves.png", "bars.png"):
        assert (out / "plots" / name).read_bytes()[:8] == PNG_MAGIC
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(results))

    # the table reports exactly what `tdkd eval` measured, mean and std over the seeds
    teacher_eval = json.loads((out / "eval" / "teacher.json").read_text())
    pair_eval = json.loads((out / "eval" / "bd_vs_kd.json").read_text())
    assert teacher_eval["prompts"] == pair_eval["prompts"] <= 3
    methods = results["methods"]
    assert list(methods) == ["teacher", "bd", "kd"]
    for name, source in (
        ("teacher", teacher_eval),
        ("bd", pair_eval),
        ("kd", pair_eval["student_b"]),
    ):
        assert methods[name]["seeds"] == 2
        for metric in ("rougeL", "teacher_nll", "coverage", "gen_length"):
            values = [row[metric] for row in source["per_seed"]]
            mean, std = methods[name][f"{metric}_mean"], methods[name][f"{metric}_std"]
            assert mean == pytest.approx(statistics.fmean(values))
            assert std == pytest.approx(statistics.stdev(values))
            assert source[f"{metric}_mean"] == mean
    assert results["win_rate"]["a"] == "bd" and 0.0 <= results["win_rate"]["mean"] <= 1.0
    assert results["comparison"] == compare(methods, "bd", "kd")
    table = (out / "table.md").read_text()
    assert "| teacher | 2 |" in table and "| kd | 2 |" in table

    # a second run reuses the data, the finished runs and the evaluations
    before = _mtimes(out)
    again = run_demo(config, progress=False)
    assert again["methods"] == results["methods"]
    after = _mtimes(out)
    changed = {p for p in before if after.get(p) != before[p]}
    # prepare rewrites its config and summary; the table and plots are redrawn
    redrawn = {
        "config.json",
        "results.json",
        "table.md",
        "plots/bars.png",
        "plots/learning_curves.png",
    }
    prepared = {f"{d}/{f}" for d in ("data", "init/data") for f in ("config.json", "summary.json")}
    assert changed <= prepared | redrawn, changed

    # more steps: both runs resume from their checkpoints and are evaluated again
    longer = DemoConfig(**{**config.to_dict(), "algos": ("bd", "kd"), "steps": 3})
    resumed = run_demo(longer, progress=False)
    for algo in ("bd", "kd"):
        assert json.loads((out / "runs" / algo / "summary.json").read_text())["steps"] == 3
        steps = [
            s for s, _ in read_metrics_csv(out / "runs" / algo / "metrics.csv")["losses/total"]
        ]
        assert steps == [1, 2, 3]
    # another loss config in the same folder is refused, not mixed into the old run
    changed = DemoConfig(**{**longer.to_dict(), "algos": ("bd", "kd"), "lr": 0.5})
    with pytest.raises(ValueError, match=r"different config \(train changed\)"):
        run_demo(changed, progress=False)
    pair_again = json.loads((out / "eval" / "bd_vs_kd.json").read_text())
    assert pair_again is not None and resumed["methods"]["teacher"] == results["methods"]["teacher"]
    assert (out / "eval" / "bd_vs_kd.json").stat().st_mtime_ns != before["eval/bd_vs_kd.json"]


def test_runs_pin_their_initial_student(tmp_path):
    initial = tmp_path / "initial"
    initial.mkdir()
    (initial / "model.safetensors").write_bytes(b"weights v1")
    run = tmp_path / "runs" / "bd"
    pin_initial_student(run, initial)
    pin_initial_student(run, initial)  # the same student: accepted
    assert json.loads((run / "initial_student.json").read_text())["path"] == str(initial)
    (initial / "model.safetensors").write_bytes(b"weights v2")  # retrained since
    with pytest.raises(ValueError, match="another initial student"):
        pin_initial_student(run, initial)
    with pytest.raises(FileNotFoundError, match="safetensors"):
        pin_initial_student(run, tmp_path / "runs")
