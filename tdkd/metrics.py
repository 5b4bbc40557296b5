"""Evaluation metrics: Rouge-L, exact match, teacher NLL, nucleus coverage, win rate.

Rouge-L follows the MiniLLM / DistiLLM protocol (itself from Super-NaturalInstructions):
rouge-score's ``rougeL`` F-measure with the Porter stemmer, the maximum over the references of
each example, averaged over examples and reported in points (0-100). Exact match compares
answers after SQuAD-style normalisation (lower case, no punctuation, no articles, single
spaces), also the maximum over references.

Teacher-as-judge metrics take per-token teacher log-probs of the student's generations:

    NLL_T(y | x)   = -(1/|y|) sum_t log pi_T(y_t | x, y_<t)
    coverage       = (1/N) sum_t 1[y_t in A_p(x, y_<t)]          (share inside the nucleus)
    win(a, b)      = mean over prompts of 1[NLL_T(a) < NLL_T(b)] + 0.5 * 1[equal]

rouge-score is the scorer (a well-kept library); only the averaging and the normalisation of
the protocol are written here.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from functools import lru_cache

import torch

__all__ = [
    "exact_match",
    "mean_std",
    "normalize_answer",
    "nucleus_coverage",
    "rouge_l",
    "teacher_nll_per_token",
    "win_rate",
]


@lru_cache(maxsize=1)
def _scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def _as_reference_lists(
    predictions: Sequence[str], references: Sequence[str | Sequence[str]]
) -> list[list[str]]:
    if len(predictions) != len(references):
        raise ValueError(
            f"predictions and references must have the same length, got {len(predictions)} "
            f"and {len(references)}"
        )
    if not predictions:
        raise ValueError("no predictions to score: pass at least one example")
    lists = [[ref] if isinstance(ref, str) else list(ref) for ref in references]
    for i, refs in enumerate(lists):
        if not refs:
            raise ValueError(f"example {i} has no reference; give at least one per example")
    return lists


def rouge_l(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> float:
    """Mean over examples of max over references of Rouge-L F1, in points (0-100).

    >>> round(rouge_l(["the cats are running"], ["a cat is running"]), 1)
    50.0
    """
    lists = _as_reference_lists(predictions, references)
    scorer = _scorer()
    total = 0.0
    for prediction, refs in zip(predictions, lists):
        total += max(scorer.score(ref, prediction)["rougeL"].fmeasure for ref in refs)
    return 100.0 * total / len(lists)


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower case, drop punctuation and articles, collapse white space.

    >>> normalize_answer("The  Answer: 42!")
    'answer 42'
    """
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> float:
    """Share of examples whose normalised prediction equals a normalised reference, in points.

    >>> exact_match(["The answer is 4.", "5"], ["answer is 4", ["6", "five"]])
    50.0
    """
    lists = _as_reference_lists(predictions, references)
    hits = sum(
        any(normalize_answer(prediction) == normalize_answer(ref) for ref in refs)
        for prediction, refs in zip(predictions, lists)
    )
    return 100.0 * hits / len(lists)


def teacher_nll_per_token(token_log_probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """NLL_T per sequence: -(1/|y|) sum_t log pi_T(y_t | .) over the real tokens of each row.

    Args:
        token_log_probs: [B, T] teacher log-probs of the generated tokens.
        mask: bool [B, T], True at generated tokens. Rows with no token give NaN (undefined).

    >>> teacher_nll_per_token(torch.tensor([[-1.0, -3.0, 0.0]]), torch.tensor([[True, True, False]]))
    tensor([2.])
    """
    if token_log_probs.shape != mask.shape:
        raise ValueError(
            f"token_log_probs {tuple(token_log_probs.shape)} and mask {tuple(mask.shape)} "
            "must have the same shape"
        )
    mask = mask.bool()
    counts = mask.sum(-1).to(token_log_probs.dtype)
    total = torch.where(mask, token_log_probs, torch.zeros_like(token_log_probs)).sum(-1)
    return -total / counts


def nucleus_coverage(in_nucleus: torch.Tensor, mask: torch.Tensor) -> float:
    """Share of generated tokens that lie inside the teacher's nucleus at their state.

    Args:
        in_nucleus: bool [B, T], whether token t was in A_p(state before t).
        mask: bool [B, T], True at generated tokens.

    >>> nucleus_coverage(torch.tensor([[True, False, True]]), torch.tensor([[True, True, False]]))
    0.5
    """
    if in_nucleus.shape != mask.shape:
        raise ValueError(
            f"in_nucleus {tuple(in_nucleus.shape)} and mask {tuple(mask.shape)} must match"
        )
    mask = mask.bool()
    count = int(mask.sum())
    if count == 0:
        raise ValueError("no generated token to measure coverage on")
    return float((in_nucleus.bool() & mask).sum()) / count


def win_rate(nll_a: torch.Tensor, nll_b: torch.Tensor) -> float:
    """Teacher-judged pairwise win rate of a over b: lower teacher NLL wins, ties count half.

    >>> win_rate(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([2.0, 2.0, 1.0]))
    0.5
    """
    if nll_a.shape != nll_b.shape or nll_a.dim() != 1 or nll_a.numel() == 0:
        raise ValueError(
            f"nll_a and nll_b must be equal-length non-empty vectors, got {tuple(nll_a.shape)} "
            f"and {tuple(nll_b.shape)}"
        )
    wins = (nll_a < nll_b).double() + 0.5 * (nll_a == nll_b).double()
    return float(wins.mean())


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0.0 for a single value).

    >>> mean_std([1.0, 2.0, 3.0])
    (2.0, 1.0)
    """
    if not values:
        raise ValueError("mean_std needs at least one value")
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    std = float(t.std(unbiased=True)) if t.numel() > 1 else 0.0
    return float(t.mean()), std
