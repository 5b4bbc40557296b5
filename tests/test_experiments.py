"""experiments/: configs, the benchmark pipeline on tiny models, sparsity, theory and the report."""

from __future__ import annotations

import json
import statistics

import pytest
import torch
import yaml

from experiments import decoding, report, run_benchmark, sparsity, theory_table
from experiments.common import (
    CONFIGS,
    aggregate_runs,
    load_bench_config,
    mean_curve,
    run_dir,
)
from tdkd.cache import TeacherCache, build_cache
from tdkd.demo import drop_checkpoints
from tdkd.models import load_teacher, tiny_teacher_student

# ----------------------------------------------------------------------------- sparsity


def _topk_mass_loop(offsets, log_probs, ks):
    out = torch.zeros(len(offsets) - 1, len(ks), dtype=torch.float64)
    for s in range(len(offsets) - 1):
        probs = log_probs[offsets[s] : offsets[s + 1]].double().exp().tolist()
        for j, k in enumerate(ks):
            out[s, j] = sum(probs[:k])
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_topk_mass_matches_a_loop(seed):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 9, (20,), generator=g)
    lengths[0] = 1  # a single-token nucleus
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    parts = []
    for n in lengths.tolist():  # ranking order: descending probabilities per state
        probs = torch.rand(n, generator=g, dtype=torch.float64).sort(descending=True).values
        parts.append((probs / (probs.sum() * 1.05)).log().float())
    log_probs = torch.cat(parts)
    ks = [1, 2, 3, 8, 100]
    got = sparsity.topk_mass(offsets, log_probs, ks)
    torch.testing.assert_close(got, _topk_mass_loop(offsets, log_probs, ks))
    assert bool((got[:, 1:] >= got[:, :-1] - 1e-12).all())  # non-decreasing in k


def test_topk_mass_bad_input():
    with pytest.raises(ValueError, match="offsets"):
        sparsity.topk_mass(torch.tensor([0, 2]), torch.zeros(3), [1])
    with pytest.raises(ValueError, match="k must be >= 1"):
        sparsity.topk_mass(torch.tensor([0, 1]), torch.zeros(1), [0])


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("sparsity")
    teacher, _, tokenizer = tiny_teacher_student(seed=2)
    teacher.save_pretrained(root / "teacher")
    tokenizer.save_pretrained(root / "teacher")
    teacher, tokenizer = load_teacher(root / "teacher")
    g = torch.Generator().manual_seed(0)
    rows = [
        dict(
            row_id=i,
            split="train",
            prompt_ids=torch.randint(6, len(tokenizer), (3,), generator=g).tolist(),
            response_ids=torch.randint(6, len(tokenizer), (5,), generator=g).tolist(),
            terminated=False,
        )
        for i in range(6)
    ]
    build_cache(teacher, tokenizer, rows, root / "cache", p_store=0.9)
    return TeacherCache(root / "cache")


def test_sparsity_report_on_a_cache(tiny_cache):
    from tdkd.cache import support_stats

    result = sparsity.sparsity_report(tiny_cache, ks=[1, 5, 10_000], ps=[0.5, 0.9, 0.99])
    support = tiny_cache.supports()
    assert result["states"] == 30 == support.lengths.numel()
    assert [row["p"] for row in result["support"]] == [0.5, 0.9]  # 0.99 > p_store is left out
    assert result["support"][0] == {"p": 0.5, **support_stats(support.restrict(0.5))}
    big = result["topk"][-1]  # k beyond every nucleus: the stored (covered) mass, >= p_store
    covered = torch.stack(
        [
            support.log_probs[a:b].double().exp().sum()
            for a, b in zip(support.offsets[:-1], support.offsets[1:])
        ]
    )
    assert big["mean_mass"] == pytest.approx(float(covered.mean()))
    assert big["exact_share"] == 0.0 and result["topk"][0]["exact_share"] == 1.0
    assert big["mean_mass"] >= 0.9 - 1e-6


# ----------------------------------------------------------------------------- configs


def test_shipped_configs_load_and_share_one_setup():
    main = load_bench_config(CONFIGS / "main.yaml")
    ablations = load_bench_config(CONFIGS / "ablations.yaml")
    assert main.setup == ablations.setup.__class__(
        **{**ablations.setup.to_dict(), "algos": main.setup.algos}
    )
    names = [m.name for m in main.methods]
    assert names[:5] == ["bd", "sft", "kd", "seqkd", "rkl"]
    assert all(m.seeds >= 3 for m in main.methods[:5]) and {"sqn", "sac", "iql"} <= set(names)
    assert next(m for m in main.methods if m.name == "sft").data == "gold"
    ps = {m.p or main.setup.p for m in ablations.methods if m.algo == "bd"}
    assert ps == {1.0, 0.8, 0.5}
    assert next(m for m in ablations.methods if m.p == 1.0).data == "full"
    assert main.init is not None and ablations.init == main.init  # inherited by setup_from
    kwargs = [m.loss_kwargs for m in ablations.methods]
    assert {"alpha_chi": None} in kwargs and {"expert_action": "nucleus"} in kwargs
    assert {"lm_coef": 1.0} in kwargs
    assert load_bench_config(CONFIGS / "main.yaml", steps=3, lr=None).setup.steps == 3


def test_bad_configs_are_refused(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"setup": {"stepz": 3}, "methods": {"bd": {}}}))
    with pytest.raises(ValueError, match="stepz"):
        load_bench_config(path)
    path.write_text(yaml.safe_dump({"methods": {"bd": {"seed": 3}}}))
    with pytest.raises(ValueError, match="unknown keys"):
        load_bench_config(path)
    path.write_text(yaml.safe_dump({"methods": {"bd": {"data": "web"}}}))
    with pytest.raises(ValueError, match="data must be"):
        load_bench_config(path)
    path.write_text(yaml.safe_dump({"init": {"step": 3}, "methods": {"bd": {}}}))
    with pytest.raises(ValueError, match="init has unknown keys"):
        load_bench_config(path)
    path.write_text(yaml.safe_dump({"init": {"steps": 0}, "methods": {"bd": {}}}))
    with pytest.raises(ValueError, match="init.steps must be an integer >= 1"):
        load_bench_config(path)
    path.write_text(yaml.safe_dump({"methods": {}}))
    with pytest.raises(ValueError, match="methods"):
        load_bench_config(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_bench_config(tmp_path / "missing.yaml")


# ----------------------------------------------------------------------------- aggregation


def test_aggregate_runs_is_mean_and_std_over_training_seeds():
    g = torch.Generator().manual_seed(0)
    evals = [
        {
            "rougeL_mean": float(torch.rand((), generator=g)) * 30,
            "rougeL_std": float(torch.rand((), generator=g)),
            "exact_match_mean": None,
            "exact_match_std": None,
        }
        for _ in range(4)
    ]
    out = aggregate_runs(evals, ["rougeL", "exact_match"])
    values = [e["rougeL_mean"] for e in evals]
    assert out["seeds"] == 4 and not out["one_seed"]
    assert out["rougeL_mean"] == pytest.approx(statistics.fmean(values))
    assert out["rougeL_std"] == pytest.approx(statistics.stdev(values))
    assert out["rougeL_sampling_std"] == pytest.approx(
        statistics.fmean(e["rougeL_std"] for e in evals)
    )
    assert out["exact_match_mean"] is None
    one = aggregate_runs(evals[:1], ["rougeL"])
    assert one["one_seed"] and one["rougeL_std"] == 0.0
    with pytest.raises(ValueError, match="no runs"):
        aggregate_runs([])


def test_mean_curve_keeps_common_steps():
    assert mean_curve([[(1, 1.0), (5, 2.0)], [(5, 4.0), (1, 3.0), (9, 0.0)]]) == [
        (1, 2.0),
        (5, 3.0),
    ]
    assert mean_curve([]) == []


# ----------------------------------------------------------------------------- end to end


def test_benchmark_report_and_resume_on_tiny_models(tiny_teacher_dir, tmp_path):
    setup = {
        "out": str(tmp_path / "runs"),
        "teacher": str(tiny_teacher_dir),
        "student": "layers:1",
        "prompts": 16,
        "samples": 2,
        "max_new_tokens": 4,
        "max_prompt_tokens": 64,
        "val_fraction": 0.3,
        "test_fraction": 0.3,
        "steps": 2,
        "batch_size": 2,
        "eval_every": 1,
        "eval_batches": 1,
        "seeds": 2,
        "eval_prompts": 3,
    }
    methods = {
        "bd": {"algo": "bd", "seeds": 2},
        "sft": {"algo": "sft", "seeds": 1, "data": "gold"},
        "bd_p0.5": {"algo": "bd", "seeds": 1, "p": 0.5, "loss_kwargs": {"alpha_chi": None}},
        "bd_p1.0": {"algo": "bd", "seeds": 1, "p": 1.0, "data": "full"},
    }
    init = {"prompts": 12, "samples": 1, "steps": 2, "lr": 1e-3}
    (tmp_path / "main.yaml").write_text(
        yaml.safe_dump(
            {"name": "main", "setup": setup, "init": init, "methods": methods}, sort_keys=False
        )
    )
    results_dir = tmp_path / "results"
    argv = ["--config", str(tmp_path / "main.yaml"), "--results-dir", str(results_dir)]
    assert run_benchmark.main([*argv, "--no-report"]) == 0
    results = json.loads((results_dir / "main.json").read_text())
    assert list(results["methods"]) == ["bd", "sft", "bd_p0.5", "bd_p1.0"]
    bd = results["methods"]["bd"]
    assert bd["seeds"] == 2 and set(bd) >= {"rougeL_mean", "rougeL_std", "rougeL_teacher_mean"}
    evals = [
        json.loads((tmp_path / "runs" / "runs" / "bd" / f"seed{s}" / "eval.json").read_text())
        for s in range(2)
    ]
    assert bd["rougeL_mean"] == pytest.approx(statistics.fmean(e["rougeL_mean"] for e in evals))
    assert bd["rougeL_std"] == pytest.approx(statistics.stdev(e["rougeL_mean"] for e in evals))
    # every run wrote its resolved config; overrides reached it
    config = yaml.safe_load(
        (tmp_path / "runs" / "runs" / "bd_p0.5" / "seed0" / "config.yaml").read_text()
    )
    assert config["p"] == 0.5  # method kwargs merged over the setup default for bd
    assert config["loss_kwargs"] == {"q_min": None, "alpha_chi": None}
    sft = yaml.safe_load((tmp_path / "runs" / "runs" / "sft" / "seed0" / "config.yaml").read_text())
    assert sft["cache"].endswith("gold_cache") and TeacherCache(sft["cache"]).indices("train").size
    # p = 1.0 trains on a second cache of the same responses holding the whole distribution
    full = yaml.safe_load(
        (tmp_path / "runs" / "runs" / "bd_p1.0" / "seed0" / "config.yaml").read_text()
    )
    assert full["cache"].endswith("full_cache") and full["p"] == 1.0
    full_cache, main_cache = TeacherCache(full["cache"]), TeacherCache(tmp_path / "runs/data/cache")
    assert full_cache.p_store == 1.0 and len(full_cache) == len(main_cache)
    batch = full_cache.batch(full_cache.indices("train")[:2], p=1.0)
    sizes = batch["support_mask"].sum(-1)[batch["response_mask"]]
    assert (sizes == full_cache.vocab_size).all()
    assert results["methods"]["bd_p1.0"]["p"] == 1.0
    # every row starts from the one shared initial student, trained once on other prompts
    init_run = tmp_path / "runs" / "init" / "run"
    assert json.loads((init_run / "summary.json").read_text())["steps"] == 2
    assert config["student"] == sft["student"] == str(init_run / "student")
    assert results["config"]["setup"]["init"]["prompts"] == 12
    assert results["config"]["initial_student"] == str(init_run / "student")
    initial = json.loads((tmp_path / "runs" / "eval" / "initial.json").read_text())
    assert results["initial"]["teacher_nll_mean"] == initial["teacher_nll_mean"]
    seed1 = yaml.safe_load(
        (tmp_path / "runs" / "runs" / "bd" / "seed1" / "config.yaml").read_text()
    )
    assert seed1["train"]["seed"] == 1
    assert results["curves"]["bd"]["eval/token_nll"][0][0] == 1

    # finished runs keep their exported student, not their checkpoints
    folder = run_dir(load_bench_config(tmp_path / "main.yaml").setup, _method("bd"), 0)
    assert (folder / "student").is_dir() and not (folder / "ckpt").exists()
    assert not (init_run / "ckpt").exists()
    with pytest.raises(ValueError, match="has not finished"):
        drop_checkpoints(tmp_path)

    # a rerun skips every finished run and evaluation
    stamp = (folder / "eval.json").stat().st_mtime_ns, (folder / "summary.json").stat().st_mtime_ns
    assert run_benchmark.main([*argv, "--no-report"]) == 0
    assert (
        (folder / "eval.json").stat().st_mtime_ns,
        (folder / "summary.json").stat().st_mtime_ns,
    ) == stamp
    lines = run_benchmark.list_runs(run_benchmark.load_configs(run_benchmark.parse_args(argv)))
    assert len(lines) == 5 and all("evaluated" in line for line in lines)

    # the finished runs re-decoded at another student top-p, aggregated like the main table
    cfg = ["--config", str(tmp_path / "main.yaml"), "--results-dir", str(results_dir)]
    assert decoding.main([*cfg, "--top-p", "0.5", "--methods", "bd,sft"]) == 0
    decoded = json.loads((results_dir / "decoding.json").read_text())
    assert decoded["top_p"] == 0.5 and list(decoded["methods"]) == ["bd", "sft"]
    runs = [json.loads((tmp_path / "runs/runs/bd" / f"seed{s}/eval_top_p0.5.json").read_text())
            for s in range(2)]  # fmt: skip
    assert all(r["config"]["top_p"] == 0.5 for r in runs)
    assert decoded["methods"]["bd"]["teacher_nll_mean"] == pytest.approx(
        statistics.fmean(r["teacher_nll_mean"] for r in runs)
    )
    with pytest.raises(ValueError, match="unknown methods"):
        decoding.main([*cfg, "--methods", "nope"])

    # the report: tables, BD's verdicts and every place it did not come out better, plots
    md = tmp_path / "RESULTS.md"
    assert report.main(["--results-dir", str(results_dir), "--out", str(md)]) == 0
    text = md.read_text()
    assert "| bd (top-p 1.0) | 2 |" in text and "| bd (top-p 0.5) | 2 |" in text
    assert "| bd | 2 |" in text and "| sft | 1 |" in text and "| initial student | ref |" in text
    assert "## Where BD did not beat a baseline (main table)" in text
    assert "one seed: no noise estimate" in text  # sft has one seed
    assert "Not measured yet: `python experiments/sparsity.py`" in text
    for name in ("main_bars.png", "main_curves.png"):
        assert (results_dir / "plots" / name).read_bytes()[:4] == b"\x89PNG"
        assert f"results/plots/{name}" in text


def _method(name):
    from experiments.common import MethodSpec

    return MethodSpec(name=name, algo=name)


def test_run_benchmark_options(tmp_path):
    args = run_benchmark.parse_args(["--train-seeds", "1", "--methods", "bd,kd", "--steps", "5"])
    configs = run_benchmark.load_configs(args)
    assert [c.name for c in configs] == ["main", "ablations"]
    assert [m.name for m in configs[0].methods] == ["bd", "kd"]
    assert all(m.seeds == 1 for c in configs for m in c.methods)
    assert configs[0].setup.steps == 5
    assert configs[0].init is not None
    no_init = run_benchmark.load_configs(run_benchmark.parse_args(["--no-init"]))
    assert all(c.init is None for c in no_init)
    with pytest.raises(ValueError, match="no method left"):
        run_benchmark.load_configs(run_benchmark.parse_args(["--methods", "nope"]))


def test_theory_table_and_report_sections(tmp_path):
    assert theory_table.main(["--mdps", "4", "--results-dir", str(tmp_path)]) == 0
    saved = json.loads((tmp_path / "theory.json").read_text())
    assert saved["ok"] and saved["config"]["mdps"] == 4 and "Proposition" in saved["table"]
    text = report.build_report(tmp_path, tmp_path / "RESULTS.md")
    assert saved["table"] in text
    assert "Not measured yet: `python experiments/run_benchmark.py --config" in text
