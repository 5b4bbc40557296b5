from __future__ import annotations

import json

import pytest

from tdkd import cli
from tdkd.eval_cli import config_path, format_table
from tdkd.models import tiny_causal_lm, tiny_teacher_student
from tdkd.prepare import PrepareConfig, prepare

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(prepared folder, teacher folder, student folder) built with `tdkd prepare` on tiny models."""
    teacher, student, tok = tiny_teacher_student()
    root = tmp_path_factory.mktemp("eval_cli")
    for name, model in (("teacher", teacher), ("student", student)):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    prepare(
        PrepareConfig(
            out=str(root / "prepared"),
            teacher=str(root / "teacher"),
            prompts=8,
            samples=2,
            max_new_tokens=4,
            max_prompt_tokens=64,
            test_fraction=0.5,
            val_fraction=0.0,
            p_store=0.9,
        ),
        progress=False,
    )
    return root / "prepared", root / "teacher", root / "student"


def _argv(prepared, student, out, *extra):
    return [
        "eval",
        "--student",
        str(student),
        "--data",
        str(prepared),
        "--seeds",
        "2",
        "--max-new-tokens",
        "4",
        "--out",
        str(out),
        *extra,
    ]


def test_eval_cli_two_students(folders, tmp_path, capsys):
    prepared, teacher, student = folders
    out = tmp_path / "res" / "eval.json"
    assert cli.main(_argv(prepared, student, out, "--student-b", str(teacher), "--p", "0.5")) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    config = json.loads(config_path(out).read_text())
    assert config == result["config"]
    assert config["teacher"] == str(teacher)  # resolved from the prepared folder
    assert config["p"] == 0.5 and config["seeds"] == 2 and config["top_p"] == 1.0
    assert result["teacher_matches_data"] is True
    assert result["prompts"] >= 1 and len(result["per_seed"]) == 2
    for name in ("rougeL", "rougeL_teacher", "teacher_nll", "coverage", "gen_length", "win_rate"):
        assert f"{name}_mean" in result and f"{name}_std" in result
        assert name in printed
    assert len(result["student_b"]["per_seed"]) == 2
    assert "win_rate_mean" not in result["student_b"]
    assert format_table(result) in printed
    # Same command, same numbers (seeded generation).
    again = tmp_path / "again.json"
    assert cli.main(_argv(prepared, student, again, "--student-b", str(teacher), "--p", "0.5")) == 0
    assert json.loads(again.read_text())["per_seed"] == result["per_seed"]


def test_eval_cli_teacher_as_student_reuses_the_judge(folders, tmp_path, capsys):
    prepared, teacher, _ = folders
    out = tmp_path / "teacher.json"
    argv = _argv(prepared, teacher, out, "--teacher", str(teacher), "--top-p", "0.8", "--p", "0.8")
    assert cli.main(argv) == 0
    result = json.loads(out.read_text())
    # Sampled inside its own nucleus at 0.8 and judged at 0.8: (almost) full coverage.
    assert result["coverage_mean"] >= 0.95
    assert "student_b" not in result and "win_rate_mean" not in result


def test_eval_cli_bad_input(folders, tmp_path, capsys):
    prepared, teacher, student = folders
    out = tmp_path / "x.json"
    assert cli.main(_argv(tmp_path / "missing", student, out)) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli.main(_argv(prepared, tmp_path / "nope", out)) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli.main(_argv(prepared, student, out, "--split", "validation")) == 2
    assert "is empty" in capsys.readouterr().err
    assert cli.main(_argv(prepared, student, out, "--p", "1.5")) == 2
    assert "--p" in capsys.readouterr().err
    assert cli.main(_argv(prepared, student, out, "--seeds", "0")) == 2
    other = tmp_path / "other"
    tiny_causal_lm(vocab_size=17).save_pretrained(other)
    assert cli.main(_argv(prepared, other, out)) == 2
    assert "share a tokenizer" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.slow
def test_eval_on_embedded_teacher(tmp_path):
    """Two prompts, the embedded teacher as both student and judge, one seed."""
    from tdkd.data import encode_prompts, generate_responses, synthetic_prompts
    from tdkd.eval_cli import EvalConfig, evaluate
    from tdkd.models import load_teacher

    model, tok = load_teacher()
    rows = [{**r, "split": "test"} for r in synthetic_prompts(2, seed=0)]
    prepared = tmp_path / "prepared"
    generate_responses(
        model, tok, encode_prompts(tok, rows), prepared / "responses", max_new_tokens=6
    )
    (prepared / "config.json").write_text(json.dumps({"teacher": "smollm2-135m-instruct"}))
    result = evaluate(
        EvalConfig(
            student="smollm2-135m-instruct",
            data=str(prepared),
            seeds=1,
            max_new_tokens=6,
            top_p=0.8,
            p=0.8,
            out=str(tmp_path / "eval.json"),
        ),
        progress=False,
    )
    assert result["prompts"] == 2 and result["exact_match_prompts"] == 2
    assert result["coverage_mean"] >= 0.9
    assert 0 < result["teacher_nll_mean"] < 10 and 1 <= result["gen_length_mean"] <= 6
