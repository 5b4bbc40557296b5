from __future__ import annotations

import pytest
import torch
from rouge_score import tokenize

from tdkd.metrics import (
    exact_match,
    mean_std,
    normalize_answer,
    nucleus_coverage,
    rouge_l,
    teacher_nll_per_token,
    win_rate,
)


def _lcs(a: list[str], b: list[str]) -> int:
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1][j + 1] = (
                table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
            )
    return table[-1][-1]


def _reference_rouge_l(predictions, references) -> float:
    from nltk.stem import porter

    stemmer = porter.PorterStemmer()
    total = 0.0
    for prediction, refs in zip(predictions, references):
        refs = [refs] if isinstance(refs, str) else refs
        pred_tokens = tokenize.tokenize(prediction, stemmer)
        best = 0.0
        for ref in refs:
            ref_tokens = tokenize.tokenize(ref, stemmer)
            lcs = _lcs(pred_tokens, ref_tokens)
            if lcs == 0:
                continue
            precision, recall = lcs / len(pred_tokens), lcs / len(ref_tokens)
            best = max(best, 2 * precision * recall / (precision + recall))
        total += best
    return 100.0 * total / len(predictions)


def test_rouge_l_matches_lcs_reference_with_multiple_references():
    predictions = [
        "The quick brown fox jumps over the lazy dog",
        "Paris is the capital of France.",
        "",
        "running runners ran",
    ]
    references = [
        "a quick brown dog jumps over the lazy fox",
        ["Berlin is in Germany", "The capital of France is Paris"],
        "nothing",
        ["runs", "the runner is running"],
    ]
    expected = _reference_rouge_l(predictions, references)
    assert rouge_l(predictions, references) == pytest.approx(expected, abs=1e-9)
    assert 0.0 < expected < 100.0


def test_rouge_l_identity_and_disjoint():
    assert rouge_l(["a b c d"], ["a b c d"]) == pytest.approx(100.0)
    assert rouge_l(["alpha beta"], ["gamma delta"]) == 0.0


@pytest.mark.parametrize(
    ("predictions", "references"),
    [([], []), (["a"], []), (["a"], [[]])],
)
def test_rouge_and_exact_match_reject_bad_input(predictions, references):
    with pytest.raises(ValueError):
        rouge_l(predictions, references)
    with pytest.raises(ValueError):
        exact_match(predictions, references)


def test_exact_match_normalisation_and_max_over_references():
    assert normalize_answer("  An Apple, the PEAR.  ") == "apple pear"
    assert exact_match(["42", "The Cat"], [["41", "42"], "cat"]) == 100.0
    assert exact_match(["42", "dog"], ["42", "cat"]) == 50.0


def test_teacher_nll_per_token_matches_loop():
    log_probs = -torch.rand(4, 7, dtype=torch.float64) * 5
    mask = torch.rand(4, 7) > 0.3
    mask[:, 0] = True
    expected = torch.tensor(
        [
            -sum(float(log_probs[b, t]) for t in range(7) if mask[b, t]) / int(mask[b].sum())
            for b in range(4)
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(teacher_nll_per_token(log_probs, mask), expected)
    with pytest.raises(ValueError, match="same shape"):
        teacher_nll_per_token(log_probs, mask[:, :3])


def test_coverage_and_win_rate():
    inside = torch.rand(3, 5) > 0.5
    mask = torch.rand(3, 5) > 0.2
    mask[0, 0] = True
    expected = sum(bool(inside[b, t]) for b in range(3) for t in range(5) if mask[b, t]) / int(
        mask.sum()
    )
    assert nucleus_coverage(inside, mask) == pytest.approx(expected)
    with pytest.raises(ValueError, match="no generated token"):
        nucleus_coverage(inside, torch.zeros_like(mask))
    a = torch.tensor([1.0, 1.0, 3.0, 0.5])
    b = torch.tensor([2.0, 1.0, 1.0, 0.7])
    assert win_rate(a, b) == pytest.approx((1 + 0.5 + 0 + 1) / 4)
    assert win_rate(a, b) + win_rate(b, a) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        win_rate(a, b[:2])


def test_mean_std():
    values = [3.0, 5.0, 10.0]
    mean, std = mean_std(values)
    assert mean == pytest.approx(6.0)
    assert std == pytest.approx((((3 - 6) ** 2 + 1 + 16) / 2) ** 0.5)
    assert mean_std([4.0]) == (4.0, 0.0)
    with pytest.raises(ValueError):
        mean_std([])
