from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pytest
import torch

from tdkd import data
from tdkd.data import (
    SYNTHETIC_FAMILIES,
    assign_splits,
    chatterbot_prompts,
    encode_prompts,
    format_prompt,
    generate_responses,
    load_responses,
    pad_sequences,
    read_jsonl_prompts,
    sample_responses,
    synthetic_prompts,
)
from tdkd.models import tiny_teacher_student, tiny_tokenizer
from tdkd.topp import top_p_mask


def _check_answer(row):
    prompt, answer = row["prompt"], row["answer"]
    family = row["source"].split("/")[1]
    if family == "arithmetic":
        a, op, b = re.match(r"Compute (\d+) ([-+*]) (\d+)\.", prompt).groups()
        expected = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
        assert answer == str(expected)
    elif family in ("copy", "reverse"):
        words = prompt.split(": ", 1)[1].split()
        assert answer.split() == (words if family == "copy" else words[::-1])
    elif family == "sort":
        numbers = [int(x) for x in prompt.split(": ", 1)[1].split(", ")]
        assert [int(x) for x in answer.split(", ")] == sorted(numbers)
    elif family == "count":
        letter, word = re.match(
            r"How many times does the letter '(.)' appear in '(\w+)'", prompt
        ).groups()
        assert answer == str(sum(1 for c in word if c == letter))
    elif family == "lookup":
        table = dict(
            item.split(" = ") for item in prompt.split("Table: ")[1].split(". ")[0].split("; ")
        )
        key = re.search(r"value of (\w+)\?", prompt).group(1)
        assert answer == table[key]
    else:
        raise AssertionError(family)


def test_synthetic_prompts_exact_answers_and_determinism():
    rows = synthetic_prompts(60, seed=3)
    assert len(rows) == 60 and len({r["prompt_id"] for r in rows}) == 60
    assert {r["source"].split("/")[1] for r in rows} == set(SYNTHETIC_FAMILIES)
    for row in rows:
        _check_answer(row)
    assert synthetic_prompts(60, seed=3) == rows
    assert synthetic_prompts(60, seed=4) != rows
    with pytest.raises(ValueError, match="unknown synthetic families"):
        synthetic_prompts(3, families=["poetry"])


def test_chatterbot_prompts():
    rows = chatterbot_prompts()
    assert len(rows) > 500
    assert len({r["prompt_id"] for r in rows}) == len(rows)
    assert all(r["prompt"] and r["answer"] for r in rows)
    ai = chatterbot_prompts(["ai"])
    assert 0 < len(ai) < len(rows) and all(r["source"] == "chatterbot/ai" for r in ai)
    with pytest.raises(ValueError, match="unknown chatterbot categories"):
        chatterbot_prompts(["nope"])


def test_read_jsonl_prompts(tmp_path):
    path = tmp_path / "p.jsonl"
    lines = [
        {"instruction": "Summarise", "context": "A long text.", "response": "Short."},
        {"instruction": "Say hi", "context": "", "response": "hi"},
        {"prompt": "What is 2+2?", "output": "4"},
    ]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    rows = read_jsonl_prompts(path)
    assert [r["prompt"] for r in rows] == ["Summarise\n\nA long text.", "Say hi", "What is 2+2?"]
    assert [r["answer"] for r in rows] == ["Short.", "hi", "4"]
    path.write_text('{"question": "x"}\n')
    with pytest.raises(ValueError, match="Dolly"):
        read_jsonl_prompts(path)
    path.write_text("{not json\n")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_jsonl_prompts(path)
    with pytest.raises(FileNotFoundError):
        read_jsonl_prompts(tmp_path / "missing.jsonl")


def test_splits_never_share_a_prompt():
    rows = synthetic_prompts(300, seed=1)
    # The same prompts again with other case/whitespace, from "another source".
    twins = [{**r, "prompt": "  " + r["prompt"].upper(), "source": "other"} for r in rows[:100]]
    split_rows = assign_splits(rows + twins, val_fraction=0.2, test_fraction=0.2, seed=5)
    by_prompt: dict[str, set[str]] = {}
    for r in split_rows:
        by_prompt.setdefault(" ".join(r["prompt"].lower().split()), set()).add(r["split"])
    assert all(len(s) == 1 for s in by_prompt.values())
    counts = {s: sum(r["split"] == s for r in split_rows[:300]) for s in data.SPLITS}
    assert all(30 <= counts[s] for s in ("validation", "test")) and counts["train"] > 120
    assert assign_splits(rows, seed=5) == assign_splits(rows, seed=5)
    with pytest.raises(ValueError, match="fraction"):
        assign_splits(rows, val_fraction=0.6, test_fraction=0.5)


def test_format_prompt_uses_chat_template_or_plain_text():
    tok = tiny_tokenizer()
    vocab = tok.get_vocab()
    assert format_prompt(tok, "hello") == [vocab["<user>"], vocab["hello"], vocab["<assistant>"]]
    assert format_prompt(tok, "hello", system="hi")[:2] == [vocab["<system>"], vocab["hi"]]
    tok.chat_template = None
    assert format_prompt(tok, "hello") == [vocab["hello"]]


def test_encode_prompts_length_policy():
    tok = tiny_tokenizer()
    rows = [data._row("t", "hello"), data._row("t", "a b c d e f g h i j")]
    kept = encode_prompts(tok, rows, max_prompt_tokens=5)
    assert [r["prompt"] for r in kept] == ["hello"]
    with pytest.raises(ValueError, match="max_prompt_tokens"):
        encode_prompts(tok, rows, max_prompt_tokens=5, on_long="error")
    with pytest.raises(ValueError, match="empty"):
        encode_prompts(tok, rows, max_prompt_tokens=2)
    with pytest.raises(ValueError, match="empty"):
        encode_prompts(tok, [], max_prompt_tokens=5)


def test_pad_sequences_matches_loop():
    prompts = [[5, 6], [7], [8, 9, 10]]
    responses = [[1], [2, 3, 4], []]
    tokens, attention, response = pad_sequences(prompts, responses, pad_token_id=0)
    assert tokens.shape == (3, 4)
    for b, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        for i in range(4):
            seq = p + r
            assert tokens[b, i] == (seq[i] if i < len(seq) else 0)
            assert attention[b, i] == (i < len(seq))
            assert response[b, i] == (len(p) <= i < len(seq))


class _EosAfter(torch.nn.Module):
    """A fake LM: fixed logits favouring token 3, EOS certain once the row has `after` tokens
    (counted by the attention mask)."""

    def __init__(self, vocab=8, eos=1, after=5):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.vocab, self.eos, self.after = vocab, eos, after

    def forward(self, input_ids, attention_mask, **kwargs):
        b, t = input_ids.shape
        logits = torch.zeros(b, t, self.vocab)
        logits[..., 3] = 2.0
        logits[..., 0] = -1e9  # never sample pad
        logits[..., self.eos] = -1e9  # nor EOS, until forced
        seen = attention_mask.sum(-1)
        logits[seen >= self.after, -1, self.eos] = 1e9
        return SimpleNamespace(logits=logits)


def test_sample_responses_terminates_and_is_seeded():
    model = _EosAfter(after=5)
    prompts = [[2, 3], [2, 3, 4, 5]]
    kw = dict(max_new_tokens=10, eos_token_id=1, pad_token_id=0)
    responses, terminated = sample_responses(
        model, prompts, generator=torch.Generator().manual_seed(0), **kw
    )
    assert terminated == [True, True]
    # Row 1 has 4 prompt tokens (+ 2 left pads counted out by the mask): EOS after 1 token.
    assert [len(r) for r in responses] == [4, 2] and all(r[-1] == 1 for r in responses)
    again, _ = sample_responses(model, prompts, generator=torch.Generator().manual_seed(0), **kw)
    assert again == responses
    short, terminated = sample_responses(
        model, prompts, max_new_tokens=1, eos_token_id=1, pad_token_id=0
    )
    assert [len(r) for r in short] == [1, 1] and terminated[0] is False


def test_sample_responses_stays_in_nucleus():
    model = _EosAfter(after=100)
    responses, _ = sample_responses(
        model,
        [[2]] * 16,
        max_new_tokens=6,
        eos_token_id=1,
        pad_token_id=0,
        top_p=0.3,
        generator=torch.Generator().manual_seed(1),
    )
    logits = torch.zeros(8)
    logits[3], logits[0] = 2.0, -1e9
    allowed = top_p_mask(logits, 0.3)
    assert all(allowed[t] for r in responses for t in r)


def _prompts(tok, n=6):
    return encode_prompts(tok, assign_splits(synthetic_prompts(n)), max_prompt_tokens=64)


class _CrashAfter(torch.nn.Module):
    """Wraps a model; raises inside the first decoding step of batch number `batches`."""

    def __init__(self, model, batches):
        super().__init__()
        self.model, self.prefills = model, 0
        self.batches = batches

    def forward(self, **kwargs):
        if kwargs["input_ids"].shape[1] > 1:  # a prompt prefill starts a new batch
            self.prefills += 1
        elif self.prefills > self.batches:
            raise KeyboardInterrupt("simulated crash")
        return self.model(**kwargs)


def test_generate_resume_after_crash_equals_uninterrupted(tmp_path):
    teacher, _, tok = tiny_teacher_student()
    prompts = _prompts(tok)
    kw = dict(samples_per_prompt=2, max_new_tokens=4, batch_size=4, seed=7)
    full = generate_responses(teacher, tok, prompts, tmp_path / "a", **kw)
    # Crash during the third batch: two shards are on disk, nothing else.
    # (seeded: every batch of this run decodes past its first token, so the crash hits batch 3)
    with pytest.raises(KeyboardInterrupt):
        generate_responses(_CrashAfter(teacher, batches=2), tok, prompts, tmp_path / "b", **kw)
    assert len(list((tmp_path / "b").glob("shard-*.arrow"))) == 2
    with pytest.raises(ValueError, match="incomplete"):
        load_responses(tmp_path / "b")
    resumed = generate_responses(teacher, tok, prompts, tmp_path / "b", **kw)
    assert resumed["row_id"] == list(range(12))
    assert resumed.to_list() == full.to_list()
    assert load_responses(tmp_path / "b").to_list() == full.to_list()
    by_prompt: dict[str, set[str]] = {}
    for r in resumed:
        by_prompt.setdefault(r["prompt_id"], set()).add(r["split"])
    assert all(len(s) == 1 for s in by_prompt.values())


def test_generate_regenerates_corrupted_shard_and_refuses_other_settings(tmp_path):
    teacher, _, tok = tiny_teacher_student()
    prompts = _prompts(tok, n=4)
    kw = dict(samples_per_prompt=1, max_new_tokens=3, batch_size=2, seed=0)
    full = generate_responses(teacher, tok, prompts, tmp_path / "a", **kw)
    with pytest.raises(KeyboardInterrupt):
        generate_responses(_CrashAfter(teacher, batches=1), tok, prompts, tmp_path / "b", **kw)
    shard = tmp_path / "b" / "shard-00000.arrow"
    shard.write_bytes(shard.read_bytes()[:20])
    resumed = generate_responses(teacher, tok, prompts, tmp_path / "b", **kw)
    assert resumed.to_list() == full.to_list()
    with pytest.raises(ValueError, match="other settings"):
        generate_responses(teacher, tok, prompts, tmp_path / "b", **{**kw, "max_new_tokens": 5})
