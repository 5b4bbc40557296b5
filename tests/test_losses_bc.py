"""Behaviour-cloning baselines: contracts, p = 1 support == full vocabulary, SFT == F.cross_entropy."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from losses_contract import (
    LossContract,
    logits_gradient_on_nucleus,
    make_offline_batch,
    tiny_student,
)

from agents.losses import SFTLoss, TokenDivergenceLoss
from tdkd.divergences import DIVERGENCES
from tdkd.sequence import align_steps


class TestSFTContract(LossContract):
    def make_loss(self, student, **kwargs):
        return SFTLoss(student, chunk_size=4, **kwargs)


class TestKDSupportContract(LossContract):
    def make_loss(self, student, **kwargs):
        return TokenDivergenceLoss(student, divergence="jsd", p=0.8, **kwargs)


class TestKDFullContract(LossContract):
    def make_loss(self, student, **kwargs):
        return TokenDivergenceLoss(
            student, divergence="skew_kl", vocab="full", chunk_size=5, **kwargs
        )


def _logits(student, td):
    with torch.no_grad():
        return student(td["tokens"], attention_mask=td["attention_mask"].long()).logits


def test_sft_equals_cross_entropy_on_response_tokens():
    td = make_offline_batch()
    student = tiny_student()
    out = SFTLoss(student, chunk_size=3)(td)["loss_sft"]
    steps = align_steps(_logits(student, td), td["tokens"], td["response_mask"])
    ce = torch.nn.functional.cross_entropy(steps.q[steps.mask], steps.actions[steps.mask])
    torch.testing.assert_close(out, ce)


@pytest.mark.parametrize("divergence", sorted(DIVERGENCES))
def test_support_at_p1_equals_full_vocabulary(divergence):
    """With p = 1 the nucleus is every token: the restricted loss is the unrestricted one."""
    td = make_offline_batch(p_store=1.0)
    assert bool((td["support_mask"].sum(-1)[td["response_mask"]] == 32).all())
    student = tiny_student()
    key = f"loss_{divergence}"
    sparse = TokenDivergenceLoss(student, divergence=divergence)(td)[key]
    dense = TokenDivergenceLoss(student, divergence=divergence, vocab="full", chunk_size=4)(td)[key]
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-6)


def test_live_teacher_equals_cached_teacher_logits():
    td = make_offline_batch()
    teacher = SimpleNamespace(logits=td["teacher_logits"])

    class Lookup(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None):
            assert torch.equal(input_ids, td["tokens"])
            return teacher

    student = tiny_student()
    live = TokenDivergenceLoss(student, vocab="full", teacher=Lookup())
    cached = TokenDivergenceLoss(student, vocab="full")
    assert "teacher_logits" not in live.in_keys and "teacher_logits" in cached.in_keys
    torch.testing.assert_close(live(td)["loss_forward_kl"], cached(td)["loss_forward_kl"])
    assert not any(n.startswith("teacher") for n in live.state_dict())


@pytest.mark.parametrize("normalization, outside", [("support", False), ("vocab", True)])
def test_gradient_outside_the_nucleus(normalization, outside):
    """proj_p student: no gradient off the nucleus; full-vocab student: its mass there is pushed down."""
    td = make_offline_batch(p_store=0.6)
    student = tiny_student()
    loss = TokenDivergenceLoss(student, student_normalization=normalization)
    grad, dense = logits_gradient_on_nucleus(loss, student, td, "loss_forward_kl")
    rows = dense.any(-1, keepdim=True).expand_as(dense)
    off = grad[:, :-1][rows & ~dense]
    assert bool((off != 0).any()) == outside
    if outside:  # d/dlogit of KL(P || softmax) off the support is softmax > 0
        assert bool((off > 0).all())


@pytest.mark.parametrize(
    "divergence, expected",
    [
        ("forward_kl", "vocab"),
        ("cross_entropy", "vocab"),
        ("reverse_kl", "support"),
        ("jsd", "support"),
    ],
)
def test_default_student_normalization(divergence, expected):
    """KD defaults to the usual sparse KD (full-vocabulary student); the rest to proj_p."""
    assert (
        TokenDivergenceLoss(tiny_student(), divergence=divergence).student_normalization == expected
    )


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown divergence"):
        TokenDivergenceLoss(tiny_student(), divergence="kl")
    with pytest.raises(ValueError, match="only a divergence for forward_kl"):
        TokenDivergenceLoss(tiny_student(), divergence="tvd", student_normalization="vocab")
    with pytest.raises(ValueError, match="vocab must be"):
        TokenDivergenceLoss(tiny_student(), vocab="dense")
    with pytest.raises(ValueError, match="live teacher"):
        TokenDivergenceLoss(tiny_student(), teacher=tiny_student())
    td = make_offline_batch()
    del td["teacher_logits"]
    with pytest.raises(ValueError, match="teacher_logits"):
        TokenDivergenceLoss(tiny_student(), vocab="full")(td)
