from __future__ import annotations

import json

import pytest
import torch

from tdkd.data import encode_prompts, generate_responses, synthetic_prompts
from tdkd.evaluate import (
    evaluate_students,
    exact_match_rows,
    generate_for_prompts,
    load_eval_model,
    load_eval_prompts,
    references,
    score_with_teacher,
    seed_metrics,
    summarize,
)
from tdkd.metrics import mean_std, rouge_l, win_rate
from tdkd.models import tiny_causal_lm, tiny_teacher_student, tiny_tokenizer
from tdkd.topp import top_p_mask

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    teacher, student, tok = tiny_teacher_student()
    student.eval().requires_grad_(False)
    return teacher, student, tok


def _prompt_rows():
    rows = synthetic_prompts(4, seed=3, families=["arithmetic", "copy"])
    rows += [
        {"prompt_id": "c1", "source": "chatterbot/ai", "prompt": "hi how are you", "answer": "yes"},
        {"prompt_id": "j1", "source": "jsonl/x", "prompt": "what is the key", "answer": ""},
    ]
    splits = ["test", "train", "test", "test", "test", "test"]
    return [{**r, "split": s} for r, s in zip(rows, splits)]


@pytest.fixture(scope="module")
def prepared(tiny, tmp_path_factory):
    """A prepared-like folder: responses/ written by generate_responses, 2 samples per prompt."""
    teacher, _, tok = tiny
    folder = tmp_path_factory.mktemp("prepared")
    prompts = encode_prompts(tok, _prompt_rows(), max_prompt_tokens=64)
    generate_responses(
        teacher, tok, prompts, folder / "responses", samples_per_prompt=2, max_new_tokens=5
    )
    return folder


# ----------------------------------------------------------------------------- inputs


def test_load_eval_prompts_groups_the_split(prepared, tiny):
    _, _, tok = tiny
    from tdkd.data import load_responses

    prompts = load_eval_prompts(prepared, "test", tokenizer=tok)
    rows = [r for r in load_responses(prepared / "responses") if r["split"] == "test"]
    assert [p["prompt_id"] for p in prompts] == list(dict.fromkeys(r["prompt_id"] for r in rows))
    assert len(prompts) == 5
    for p in prompts:
        mine = [r for r in rows if r["prompt_id"] == p["prompt_id"]]
        assert p["prompt_ids"] == mine[0]["prompt_ids"]
        assert p["teacher_responses"] == [
            tok.decode(r["response_ids"], skip_special_tokens=True).strip() for r in mine
        ]
    # The responses folder itself works too; train holds the one other prompt.
    assert len(load_eval_prompts(prepared / "responses", "train", tokenizer=tok)) == 1


def test_load_eval_prompts_bad_input(prepared, tiny, tmp_path):
    _, _, tok = tiny
    with pytest.raises(ValueError, match="split 'validation' .* is empty"):
        load_eval_prompts(prepared, "validation", tokenizer=tok)
    with pytest.raises(ValueError, match="split must be one of"):
        load_eval_prompts(prepared, "dev", tokenizer=tok)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_eval_prompts(tmp_path / "missing", "test", tokenizer=tok)
    with pytest.raises(FileNotFoundError, match="not a prepared folder"):
        load_eval_prompts(tmp_path, "test", tokenizer=tok)


def test_references_and_exact_match_rows():
    prompts = [
        {"source": "synthetic/copy", "answer": "a b", "teacher_responses": ["x"]},
        {"source": "chatterbot/ai", "answer": "yes", "teacher_responses": ["y"]},
        {"source": "jsonl/d", "answer": " ", "teacher_responses": ["t1", "t2"]},
        {"source": "synthetic/sort", "answer": "", "teacher_responses": ["z"]},
    ]
    assert [references(p) for p in prompts] == [["a b"], ["yes"], ["t1", "t2"], ["z"]]
    assert exact_match_rows(prompts) == [0]


def test_load_eval_model_checks(tiny, tmp_path):
    teacher, student, tok = tiny
    vocab = len(tok)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_eval_model(tmp_path / "nope", teacher_tokenizer=tok, vocab_size=vocab)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_eval_model(tmp_path, teacher_tokenizer=tok, vocab_size=vocab)
    # A distill run folder keeps its model in student/ (save_pretrained + tokenizer).
    run = tmp_path / "run"
    student.save_pretrained(run / "student")
    tok.save_pretrained(run / "student")
    model, source = load_eval_model(run, teacher_tokenizer=tok, vocab_size=vocab)
    assert source.endswith("student") and not model.training
    ids = torch.tensor([[4, 10, 11]])
    torch.testing.assert_close(model(ids).logits, student(ids).logits)
    # Another vocabulary size: refused.
    other = tiny_causal_lm(vocab_size=vocab + 3)
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="share a tokenizer"):
        load_eval_model(tmp_path / "other", teacher_tokenizer=tok, vocab_size=vocab)
    # Same size, other words: the saved tokenizer is checked against the teacher's.
    words = [f"w{i}" for i in range(vocab - 6)]
    student.save_pretrained(tmp_path / "renamed")
    tiny_tokenizer(words).save_pretrained(tmp_path / "renamed")
    with pytest.raises(ValueError, match="share a tokenizer"):
        load_eval_model(tmp_path / "renamed", teacher_tokenizer=tok, vocab_size=vocab)


# ----------------------------------------------------------------------------- generation


def test_generation_is_seeded(tiny):
    _, student, tok = tiny
    prompts = [[3, 10, 11], [3, 12], [3, 13, 14, 15, 16], [3, 20]]
    kw = dict(max_new_tokens=6, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    a = generate_for_prompts(student, prompts, seed=0, batch_size=3, **kw)
    assert a == generate_for_prompts(student, prompts, seed=0, batch_size=3, **kw)
    assert a != generate_for_prompts(student, prompts, seed=1, batch_size=3, **kw)
    for response in a:
        assert 1 <= len(response) <= 6
        assert tok.eos_token_id not in response[:-1]
    with pytest.raises(ValueError, match="batch_size"):
        generate_for_prompts(student, prompts, seed=0, batch_size=0, **kw)


def test_generation_matches_a_full_recompute(tiny):
    """With a tiny nucleus sampling is greedy; the KV-cache, left-padded batch must equal a
    per-prompt argmax loop that recomputes the whole sequence at each step."""
    _, student, tok = tiny
    prompts = [[3, 10, 11], [3, 12], [3, 13, 14, 15, 16, 17, 18], [3, 20, 21]]
    got = generate_for_prompts(
        student,
        prompts,
        seed=0,
        max_new_tokens=7,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        top_p=1e-6,
        batch_size=4,
    )
    for prompt, response in zip(prompts, got):
        ids = list(prompt)
        expected = []
        for _ in range(7):
            with torch.no_grad():
                token = int(student(torch.tensor([ids])).logits[0, -1].argmax())
            expected.append(token)
            ids.append(token)
            if token == tok.eos_token_id:
                break
        assert response == expected


# ----------------------------------------------------------------------------- teacher judge


def _reference_scores(teacher, prompt_ids, response_ids, p):
    """Per token: full recompute of the teacher on prompt + response[:t] (no padding)."""
    rows = []
    for prompt, response in zip(prompt_ids, response_ids):
        lps, inside = [], []
        for t, token in enumerate(response):
            with torch.no_grad():
                logits = teacher(torch.tensor([list(prompt) + list(response[:t])])).logits[0, -1]
            lps.append(float(torch.log_softmax(logits.float(), -1)[token]))
            inside.append(bool(top_p_mask(logits, p)[token]))
        rows.append((lps, inside))
    return rows


@pytest.mark.parametrize("p", [0.3, 0.8, 1.0])
def test_score_with_teacher_matches_a_per_token_loop(tiny, p):
    teacher, _, tok = tiny
    gen = torch.Generator().manual_seed(int(p * 10))
    vocab = len(tok)
    prompt_ids = [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in (3, 1, 5, 2)]
    response_ids = [torch.randint(1, vocab, (n,), generator=gen).tolist() for n in (4, 1, 2, 6)]
    reference = _reference_scores(teacher, prompt_ids, response_ids, p)
    for batch_size in (1, 3, 8):
        scores = score_with_teacher(
            teacher, prompt_ids, response_ids, p=p, pad_token_id=0, batch_size=batch_size
        )
        assert scores.mask.shape == (4, 6)
        assert scores.mask.sum(-1).tolist() == [4, 1, 2, 6]
        for b, (lps, inside) in enumerate(reference):
            n = len(lps)
            torch.testing.assert_close(
                scores.token_log_probs[b, :n], torch.tensor(lps), atol=1e-5, rtol=1e-5
            )
            assert scores.in_nucleus[b, :n].tolist() == inside
            assert not scores.in_nucleus[b, n:].any() and (scores.token_log_probs[b, n:] == 0).all()
        if p == 1.0:
            assert scores.in_nucleus[scores.mask].all()


def test_score_with_teacher_bad_input(tiny):
    teacher, _, _ = tiny
    with pytest.raises(ValueError, match="non-empty prompt"):
        score_with_teacher(teacher, [[]], [[3]], p=0.8, pad_token_id=0)
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        score_with_teacher(teacher, [[3], [4]], [[3]], p=0.8, pad_token_id=0)
    with pytest.raises(ValueError, match="p must be in"):
        score_with_teacher(teacher, [[3]], [[3]], p=0.0, pad_token_id=0)


def test_teacher_as_student_stays_in_its_own_nucleus(tiny):
    """Sampling the teacher inside its nucleus at p, then judging at the same p: coverage 1."""
    teacher, _, tok = tiny
    prompts = [[3, 10, 11], [3, 12], [3, 13, 14, 15, 16], [3, 20]] * 2
    responses = generate_for_prompts(
        teacher,
        prompts,
        seed=5,
        max_new_tokens=8,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        top_p=0.5,
        batch_size=8,
    )
    scores = score_with_teacher(teacher, prompts, responses, p=0.5, pad_token_id=0)
    assert scores.in_nucleus[scores.mask].float().mean() >= 0.97
    wide = score_with_teacher(teacher, prompts, responses, p=0.2, pad_token_id=0)
    assert (wide.in_nucleus & ~scores.in_nucleus).sum() == 0  # A_0.2 is inside A_0.5


# ----------------------------------------------------------------------------- metrics


def test_seed_metrics_against_direct_computation():
    from tdkd.evaluate import TeacherScores

    prompts = [
        {"source": "synthetic/arithmetic", "answer": "42", "teacher_responses": ["42", "41"]},
        {"source": "chatterbot/ai", "answer": "i am fine", "teacher_responses": ["fine thanks"]},
        {"source": "jsonl/d", "answer": "", "teacher_responses": ["a red cat", "blue dog"]},
    ]
    texts = ["42", "i am a cat", "red cat"]
    eos = 1
    response_ids = [[5, eos], [6, 7, 8, 9], [10, 11, eos]]
    log_probs = torch.tensor([[-1.0, -2.0, 0, 0], [-0.5, -0.5, -1.0, -2.0], [-3.0, -1.0, -2.0, 0]])
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 0]], dtype=torch.bool)
    inside = torch.tensor([[1, 0, 0, 0], [1, 1, 1, 0], [0, 1, 1, 0]], dtype=torch.bool)
    metrics, nll = seed_metrics(
        prompts, texts, response_ids, TeacherScores(log_probs, inside, mask), eos_token_id=eos
    )
    torch.testing.assert_close(nll, torch.tensor([1.5, 1.0, 2.0]))
    assert metrics["teacher_nll"] == pytest.approx(1.5)
    assert metrics["coverage"] == pytest.approx(6 / 9)
    assert metrics["gen_length"] == pytest.approx((1 + 4 + 2) / 3)
    assert metrics["exact_match"] == 100.0  # only the synthetic prompt counts
    per_prompt_gold = [
        rouge_l([t], [r]) for t, r in zip(texts, [["42"], ["i am fine"], ["a red cat", "blue dog"]])
    ]
    per_prompt_teacher = [rouge_l([t], [p["teacher_responses"]]) for t, p in zip(texts, prompts)]
    assert metrics["rougeL"] == pytest.approx(sum(per_prompt_gold) / 3)
    assert metrics["rougeL_teacher"] == pytest.approx(sum(per_prompt_teacher) / 3)
    assert metrics["rougeL"] != metrics["rougeL_teacher"]
    no_exact, _ = seed_metrics(
        prompts[1:], texts[1:], response_ids[1:],
        TeacherScores(log_probs[1:], inside[1:], mask[1:]), eos_token_id=eos,
    )  # fmt: skip
    assert no_exact["exact_match"] is None


def test_summarize():
    rows = [{"a": 1.0, "b": None}, {"a": 3.0, "b": None}]
    assert summarize(rows, ["a", "b"]) == {
        "seeds": 2,
        "a_mean": 2.0,
        "a_std": mean_std([1.0, 3.0])[1],
        "b_mean": None,
        "b_std": None,
    }


def test_evaluate_students_end_to_end(prepared, tiny):
    teacher, student, tok = tiny
    prompts = load_eval_prompts(prepared, "test", tokenizer=tok)
    kw = dict(seeds=2, max_new_tokens=5, p=0.8, batch_size=2, score_batch_size=3)
    a, b = evaluate_students([student, teacher], teacher, tok, prompts, **kw)
    assert [r["seed"] for r in a["per_seed"]] == [0, 1] and a["seeds"] == 2
    for name in ("rougeL", "rougeL_teacher", "exact_match", "teacher_nll", "coverage", "win_rate"):
        values = [r[name] for r in a["per_seed"]]
        assert (a[f"{name}_mean"], a[f"{name}_std"]) == mean_std(values)
    assert "win_rate" not in b and "win_rate_mean" not in b
    # Each seed's values are those of a single-student run with that seed (same generations).
    (alone,) = evaluate_students([student], teacher, tok, prompts, **kw)
    assert [{k: v for k, v in r.items() if k != "win_rate"} for r in a["per_seed"]] == alone[
        "per_seed"
    ]
    assert b["per_seed"][0]["coverage"] <= 1.0 and b["seeds"] == 2
    # A student against itself: identical generations, every prompt a tie.
    same, _ = evaluate_students([student, student], teacher, tok, prompts, **kw)
    assert [r["win_rate"] for r in same["per_seed"]] == [0.5, 0.5]
    json.dumps(a)  # plain data


def test_evaluate_students_win_rate_matches_per_prompt_nll(prepared, tiny):
    teacher, student, tok = tiny
    prompts = load_eval_prompts(prepared, "test", tokenizer=tok)
    ids = [p["prompt_ids"] for p in prompts]
    kw = dict(max_new_tokens=5, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    nlls = []
    for model in (student, teacher):
        responses = generate_for_prompts(model, ids, seed=0, batch_size=16, **kw)
        scores = score_with_teacher(teacher, ids, responses, p=0.8, pad_token_id=0)
        nlls.append(-(scores.token_log_probs.sum(-1) / scores.mask.sum(-1)))
    (a, _) = evaluate_students(
        [student, teacher], teacher, tok, prompts, seeds=1, max_new_tokens=5, p=0.8
    )
    assert a["per_seed"][0]["win_rate"] == win_rate(nlls[0], nlls[1])
    assert a["per_seed"][0]["teacher_nll"] == pytest.approx(float(nlls[0].mean()))


def test_evaluate_students_bad_input(tiny):
    teacher, student, tok = tiny
    prompts = [{"prompt_ids": [3], "source": "x", "answer": "", "teacher_responses": ["a"]}]
    with pytest.raises(ValueError, match="one or two students"):
        evaluate_students([student] * 3, teacher, tok, prompts)
    with pytest.raises(ValueError, match="seeds must be >= 1"):
        evaluate_students([student], teacher, tok, prompts, seeds=0)
    with pytest.raises(ValueError, match="no prompts"):
        evaluate_students([student], teacher, tok, [])
