"""`tdkd distill`: any registered algorithm on a prepared cache; bad input is refused clearly."""

from __future__ import annotations

import argparse
import csv
import json

import pytest
import torch

from agents.distill_cli import add_arguments, parse_loss_kwargs, run
from tdkd.cache import build_cache
from tdkd.models import load_teacher, tiny_teacher_student


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny teacher and student folder and a cache of 12 train + 4 validation rows."""
    root = tmp_path_factory.mktemp("distill")
    teacher, student, tokenizer = tiny_teacher_student(seed=0)
    for name, model in (("teacher", teacher), ("student", student)):
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(16):
        prompt = torch.randint(6, len(tokenizer), (3,), generator=g).tolist()
        response = torch.randint(6, len(tokenizer), (4,), generator=g).tolist()
        split = "validation" if i % 4 == 3 else "train"
        rows.append(
            dict(row_id=i, split=split, prompt_ids=prompt, response_ids=response, terminated=False)
        )
    loaded, tokenizer = load_teacher(root / "teacher")  # the cache records how it was loaded
    build_cache(loaded, tokenizer, rows, root / "cache", p_store=0.9)
    other, _, _ = tiny_teacher_student(seed=5)
    other.save_pretrained(root / "other_teacher")
    tokenizer.save_pretrained(root / "other_teacher")
    return root


@pytest.fixture
def registry():
    """The algorithm the CLI tests run (cheap: cross-entropy on the cached tokens)."""
    return "sft"


def distill(setup, out, *extra: str) -> int:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    argv = ["--cache", str(setup / "cache"), "--out", str(out), "--no-progress"]
    argv += ["--teacher", str(setup / "teacher"), "--student", str(setup / "student")]
    argv += ["--batch-size", "4", "--lr", "1e-2", "--eval-batches", "1", *extra]
    return run(parser.parse_args(argv))


def test_distill_runs_logs_exports_and_resumes(setup, registry, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "run"
    args = ("--algo", registry, "--eval-every", "2", "--checkpoint-every", "2")
    assert distill(setup, out, *args, "--steps", "4") == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["algo"] == registry and summary["steps"] == 4
    assert summary["best_step"] in (2, 4)
    assert (out / "config.yaml").is_file() and (out / "summary.json").is_file()
    AutoModelForCausalLM.from_pretrained(out / "student")
    AutoTokenizer.from_pretrained(out / "student")
    assert distill(setup, out, *args, "--steps", "6") == 0  # resumes at step 4
    with open(out / "metrics.csv", newline="") as handle:
        steps = [int(row[0]) for row in list(csv.reader(handle))[1:]]
    assert sorted(set(steps)) == [1, 2, 3, 4, 5, 6]
    names = set()
    with open(out / "metrics.csv", newline="") as handle:
        names = {row[1] for row in list(csv.reader(handle))[1:]}
    assert {"eval/token_nll", "eval/kl_fwd_p", "eval/kl_rev_p", "eval/support_size"} <= names


def test_a_resolved_config_reruns_and_flags_override_it(setup, registry, tmp_path):
    first = tmp_path / "first"
    assert distill(setup, first, "--algo", registry, "--steps", "1", "--eval-every", "0") == 0
    second = tmp_path / "second"
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(
        ["--config", str(first / "config.yaml"), "--out", str(second), "--steps", "2"]
    )
    assert run(args) == 0
    assert json.loads((second / "summary.json").read_text())["steps"] == 2


def test_p_above_p_store_is_refused(setup, registry, tmp_path):
    with pytest.raises(ValueError, match="p_store=0.9"):
        distill(setup, tmp_path / "x", "--algo", registry, "--p", "0.95", "--steps", "1")


def test_cache_of_another_teacher_is_refused(setup, registry, tmp_path):
    with pytest.raises(ValueError, match="was made with teacher"):
        distill(
            setup, tmp_path / "x", "--algo", registry, "--teacher", str(setup / "other_teacher")
        )


def test_another_run_in_the_same_out_folder_is_refused(setup, registry, tmp_path):
    out = tmp_path / "run"
    assert distill(setup, out, "--algo", registry, "--steps", "1", "--eval-every", "0") == 0
    with pytest.raises(ValueError, match="different run.*batch_size"):
        distill(setup, out, "--algo", registry, "--steps", "2", "--batch-size", "2")
    # Anything that changes the optimisation trajectory is a different run too.
    with pytest.raises(ValueError, match=r"different run \(train.lr: "):
        distill(setup, out, "--algo", registry, "--steps", "1", "--lr", "0.5")
    with pytest.raises(ValueError, match=r"different run \(train.seed: 0 -> 3\)"):
        distill(setup, out, "--algo", registry, "--steps", "1", "--seed", "3")


def test_unknown_algorithm_lists_the_valid_names(setup, registry, tmp_path):
    with pytest.raises(ValueError, match="nope.*" + registry):
        distill(setup, tmp_path / "x", "--algo", "nope", "--steps", "1")


def test_missing_cache_and_bad_loss_kwargs(setup, registry, tmp_path):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    with pytest.raises(ValueError, match="--cache is required"):
        run(parser.parse_args(["--out", str(tmp_path)]))
    with pytest.raises(FileNotFoundError, match="not a tdkd teacher cache"):
        distill(setup, tmp_path / "x", "--algo", registry, "--cache", str(tmp_path))
    assert parse_loss_kwargs(["alpha_chi=0.1", "expert_action=nucleus", "q_min=null"]) == {
        "alpha_chi": 0.1,
        "expert_action": "nucleus",
        "q_min": None,
    }
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_loss_kwargs(["alpha_chi"])


@pytest.mark.parametrize("algo", sorted(__import__("agents").ALGORITHMS))
def test_every_registered_algorithm_runs_with_one_flag(setup, algo, tmp_path, capsys):
    out = tmp_path / algo
    assert distill(setup, out, "--algo", algo, "--steps", "1", "--eval-every", "1") == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["algo"] == algo and summary["steps"] == 1 and summary["best_step"] == 1
    assert summary["final_loss"] is not None and summary["final_loss"] == summary["final_loss"]
    assert (out / "student" / "config.json").is_file()


@pytest.mark.slow
def test_bench_step_prints_one_json_line_with_the_ratios(setup, capsys):
    from agents.bench_step import add_arguments as bench_arguments
    from agents.bench_step import run as bench_run

    parser = argparse.ArgumentParser()
    bench_arguments(parser)
    argv = ["--cache", str(setup / "cache"), "--teacher", str(setup / "teacher")]
    args = parser.parse_args([*argv, "--student", "layers:1", "--steps", "1", "--json"])
    assert bench_run(args) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    sec = line["sec_per_step"]
    assert set(sec) == {"kd_cached", "bd_cached", "kd_live"} and min(sec.values()) > 0
    assert line["bd_over_kd"] == pytest.approx(sec["bd_cached"] / sec["kd_cached"], rel=1e-2)
    assert line["cached_over_live"] == pytest.approx(sec["kd_cached"] / sec["kd_live"], rel=1e-2)
    assert all(v > 0 for v in line["peak_rss_mb"].values())


def test_cache_batch_source_is_deterministic_per_epoch_and_drops_partial_batches(setup):
    from agents.trainer import CacheBatchSource
    from tdkd.cache import TeacherCache

    cache = TeacherCache(setup / "cache")
    source = CacheBatchSource(cache, 5, split="train", p=0.5, seed=3)
    assert len(source) == 12 // 5
    seen = [source.batch(0, i)["tokens"] for i in range(len(source))]
    again = CacheBatchSource(cache, 5, split="train", p=0.5, seed=3)
    for i, tokens in enumerate(seen):
        torch.testing.assert_close(again.batch(0, i)["tokens"], tokens, rtol=0, atol=0)
    rows_0 = set(source.order(0)[:10].tolist())
    assert rows_0 <= set(cache.indices("train").tolist())
    assert list(source.order(0)) != list(source.order(1))  # reshuffled each epoch
    torch.testing.assert_close(
        source.batch(1, 0)["tokens"], cache.batch(source.order(1)[:5], p=0.5)["tokens"]
    )
    with pytest.raises(ValueError, match="p_store=0.9"):
        CacheBatchSource(cache, 4, p=0.95)
    with pytest.raises(ValueError, match="fewer than batch_size=13"):
        CacheBatchSource(cache, 13)
