from __future__ import annotations

import json

import pytest

from tdkd import cli
from tdkd.cache import TeacherCache
from tdkd.data import load_responses
from tdkd.models import tiny_teacher_student
from tdkd.prepare import PrepareConfig, prepare, select_prompts


def test_select_prompts_round_robin_and_splits():
    rows = select_prompts(PrepareConfig(prompts=10, seed=1))
    assert len(rows) == 10 and len({r["prompt_id"] for r in rows}) == 10
    assert [r["source"].split("/")[0] for r in rows] == ["chatterbot", "synthetic"] * 5
    assert {r["split"] for r in rows} <= {"train", "validation", "test"}
    assert select_prompts(PrepareConfig(prompts=10, seed=1)) == rows


def test_select_prompts_jsonl_only(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a", "output": "b"}\n{"prompt": "c", "output": "d"}\n')
    rows = select_prompts(PrepareConfig(prompts=5, sources=(), jsonl=(str(path),)))
    assert [r["prompt"] for r in rows] == ["a", "c"]
    path.write_text("")
    with pytest.raises(ValueError, match="empty"):
        select_prompts(PrepareConfig(prompts=5, sources=(), jsonl=(str(path),)))


@pytest.fixture(scope="module")
def tiny_teacher_dir(tmp_path_factory):
    teacher, _, tok = tiny_teacher_student()
    folder = tmp_path_factory.mktemp("teacher")
    teacher.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_prepare_end_to_end_on_tiny_teacher(tiny_teacher_dir, tmp_path):
    config = PrepareConfig(
        out=str(tmp_path / "run"),
        teacher=str(tiny_teacher_dir),
        prompts=6,
        samples=2,
        max_new_tokens=4,
        max_prompt_tokens=64,
        gen_batch_size=4,
        p_store=0.9,
    )
    summary = prepare(config, progress=False)
    responses = load_responses(tmp_path / "run" / "responses")
    cache = TeacherCache(tmp_path / "run" / "cache")
    assert summary["rows"] == len(cache) == len(responses) == 12
    assert summary["response_tokens"] == sum(len(r) for r in responses["response_ids"])
    assert sum(summary["splits"].values()) == 12
    assert set(summary["support"]) == {"0.5", "0.8"}  # 0.95 > p_store is not reported
    assert summary["support"]["0.5"]["mean"] <= summary["support"]["0.8"]["mean"]
    assert summary["cache_bytes"] == cache.bytes_on_disk
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["rows"] == 12
    assert json.loads((tmp_path / "run" / "config.json").read_text())["prompts"] == 6
    # A rerun reuses both the responses and the up-to-date cache.
    mtime = (tmp_path / "run" / "cache" / "manifest.json").stat().st_mtime_ns
    assert prepare(config, progress=False)["rows"] == 12
    assert (tmp_path / "run" / "cache" / "manifest.json").stat().st_mtime_ns == mtime


def test_cli_prepare_and_bad_input(tiny_teacher_dir, tmp_path, capsys):
    out = tmp_path / "cli"
    argv = [
        "prepare",
        "--out",
        str(out),
        "--teacher",
        str(tiny_teacher_dir),
        "--prompts",
        "3",
        "--samples",
        "1",
        "--max-new-tokens",
        "3",
        "--sources",
        "synthetic",
    ]
    assert cli.main(argv) == 0
    assert "support at p=0.5" in capsys.readouterr().out
    assert cli.main(["prepare", "--out", str(tmp_path / "x"), "--teacher", "no-such-teacher"]) == 2
    assert "smollm2-135m-instruct" in capsys.readouterr().err
    assert cli.main(["prepare", "--out", str(tmp_path / "y"), "--sources", "wiki"]) == 2
    assert (
        cli.main(
            [
                "prepare",
                "--out",
                str(tmp_path / "z"),
                "--teacher",
                str(tiny_teacher_dir),
                "--p-store",
                "1.5",
            ]
        )
        == 2
    )


@pytest.mark.slow
def test_prepare_end_to_end_on_embedded_teacher(tmp_path):
    config = PrepareConfig(
        out=str(tmp_path / "run"), prompts=4, samples=1, max_new_tokens=6, score_batch_size=4
    )
    summary = prepare(config, progress=False)
    assert summary["rows"] == 4 and summary["response_tokens"] >= 4
    assert set(summary["support"]) == {"0.5", "0.8", "0.95"}
    cache = TeacherCache(tmp_path / "run" / "cache")
    batch = cache.batch(range(4), p=0.8)
    assert batch["covered_mass"][batch["response_mask"]].min() >= 0.8 - 1e-4
    assert cache.fingerprint["teacher_id"] == "smollm2-135m-instruct"
