"""BellmanDistillLoss: contract, the no-chi^2 identity, nucleus-only gradients, hand checks."""

from __future__ import annotations

import pytest
import torch
from losses_contract import (
    LossContract,
    logits_gradient_on_nucleus,
    make_offline_batch,
    tiny_student,
)

from agents.losses import BellmanDistillLoss
from tdkd.sequence import align_steps


class TestBellmanDistillContract(LossContract):
    def make_loss(self, student, **kwargs):
        return BellmanDistillLoss(student, p=0.8, lm_coef=0.5, **kwargs)


class TestBellmanDistillNucleusContract(LossContract):
    def make_loss(self, student, **kwargs):
        return BellmanDistillLoss(student, expert_action="nucleus", **kwargs)


def _reference_bd(logits, td, *, gamma, alpha_chi, q_min, p=None):
    """Loops over rows and steps, straight from PAPER.md section 4 (sampled form)."""
    from tdkd.sequence import restrict_support_mask

    steps = align_steps(logits, td["tokens"], td["response_mask"])
    ids = td["support_ids"][:, 1:]
    sup = td["support_mask"][:, 1:]
    if p is not None:
        sup = restrict_support_mask(td["support_log_probs"][:, 1:], sup, p)
    total, count = 0.0, 0
    for b in range(logits.shape[0]):
        ts = [t for t in range(steps.mask.shape[1]) if steps.mask[b, t]]

        def q(t, a, b=b):
            x = steps.q[b, t]
            if q_min is not None:  # q_min=None: raw logits (no shift, no clip)
                x = (x - x.max()).clamp(min=q_min)
            return x[a]

        def v(t, b=b, ts=ts):
            if t not in ts:
                return torch.tensor(0.0)
            allowed = [int(i) for i, m in zip(ids[b, t], sup[b, t], strict=True) if m]
            return torch.logsumexp(torch.stack([q(t, a) for a in allowed]), 0)

        for t in ts:
            a = int(steps.actions[b, t])
            allowed = [int(i) for i, m in zip(ids[b, t], sup[b, t], strict=True) if m]
            if a not in allowed:
                continue
            x = q(t, a) - gamma * v(t + 1)
            phi = x if alpha_chi is None else x - x**2 / (4 * alpha_chi)
            total = total - (phi - (v(t) - gamma * v(t + 1)))
            count += 1
    return total / count


@pytest.mark.parametrize(
    "alpha_chi, q_min, p",
    [(0.1, -10.0, None), (None, -1.0, 0.5), (0.1, None, 0.5), (0.5, -1.0, None)],
)
def test_matches_loop_reference(alpha_chi, q_min, p):
    td = make_offline_batch(seed=3, batch_size=4)
    student = tiny_student(seed=2)
    loss = BellmanDistillLoss(student, gamma=0.9, alpha_chi=alpha_chi, q_min=q_min, p=p)
    with torch.no_grad():
        logits = student(td["tokens"], attention_mask=td["attention_mask"].long()).logits
    expected = _reference_bd(logits, td, gamma=0.9, alpha_chi=alpha_chi, q_min=q_min, p=p)
    torch.testing.assert_close(loss(td)["loss_bd"], expected)


@pytest.mark.parametrize("p", [0.5, 0.8, 1.0])
def test_without_chi2_equals_top_p_log_likelihood(p):
    """Linear phi: the gamma terms telescope, leaving -mean_t log proj_p(pi)(a_t|s_t)."""
    td = make_offline_batch(seed=1, batch_size=4, p_store=1.0)
    student = tiny_student(seed=3)
    loss = BellmanDistillLoss(student, p=p, alpha_chi=None, gamma=0.99, reduction="sum")
    out = loss(td)["loss_bd"]
    from tdkd.sequence import restrict_support_mask
    from tdkd.topp import support_to_mask

    with torch.no_grad():
        logits = student(td["tokens"], attention_mask=td["attention_mask"].long()).logits
    steps = align_steps(logits, td["tokens"], td["response_mask"])
    sup = restrict_support_mask(td["support_log_probs"][:, 1:], td["support_mask"][:, 1:], p)
    dense = support_to_mask(td["support_ids"][:, 1:], sup, logits.shape[-1])
    q = (steps.q - steps.q.max(-1, keepdim=True).values).clamp(min=-10.0)
    log_proj = torch.log_softmax(q.masked_fill(~dense, float("-inf")), -1)
    ll = log_proj.gather(-1, steps.actions.unsqueeze(-1)).squeeze(-1)
    inside = dense.gather(-1, steps.actions.unsqueeze(-1)).squeeze(-1) & steps.mask
    # each sum over a row telescopes only if every step of the row is kept
    rows = (inside == steps.mask).all(-1)
    assert rows.any()
    per_row = BellmanDistillLoss(student, p=p, alpha_chi=None, reduction="none")(td)["loss_bd"]
    counts = steps.mask.sum(-1)
    torch.testing.assert_close(
        (per_row * counts)[rows], -torch.where(inside, ll, 0.0).sum(-1)[rows], rtol=1e-5, atol=1e-5
    )
    assert torch.isfinite(out)


@pytest.mark.parametrize("q_min", [None, -10.0, -0.5])
def test_no_gradient_outside_the_nucleus(q_min):
    """Also with the paper's max-shift + clip: the shift is a stop-gradient normalisation."""
    td = make_offline_batch(seed=4, p_store=0.6)
    student = tiny_student()
    loss = BellmanDistillLoss(student, q_min=q_min)
    logits_grad, dense = logits_gradient_on_nucleus(loss, student, td, "loss_bd")
    grad = logits_grad[:, :-1]
    assert (grad[~dense] == 0).all()
    assert (grad[dense].abs() > 0).any()
    assert (logits_grad[:, -1] == 0).all()


def test_nucleus_form_with_full_support_and_no_eps_matches_sampled_average():
    """p = 1 (support = vocabulary), eps = 0: V is the plain soft value in both forms."""
    from tdkd.td import bellman_distill_loss, bellman_distill_nucleus_loss

    torch.manual_seed(0)
    q = torch.randn(2, 4, 5)
    sup = torch.ones(2, 4, 5, dtype=torch.bool)
    mask = torch.tensor([[True, True, True, False], [True, True, True, True]])
    loss_n, v_n = bellman_distill_nucleus_loss(q, sup, mask, vocab_size=5, gamma=0.9, epsilon=0.0)
    # averaging the sampled form over every action a gives the nucleus form
    per_action = []
    for a in range(5):
        loss_s, v_s = bellman_distill_loss(q[..., a], q, sup, mask, gamma=0.9)
        per_action.append(loss_s)
    torch.testing.assert_close(v_n, v_s)
    torch.testing.assert_close(loss_n, torch.stack(per_action).mean(0))


def test_bad_arguments():
    with pytest.raises(ValueError, match="expert_action"):
        BellmanDistillLoss(tiny_student(), expert_action="all")
    with pytest.raises(ValueError, match="gamma"):
        BellmanDistillLoss(tiny_student(), gamma=1.0)
    td = make_offline_batch()
    del td["support_mask"]
    with pytest.raises(ValueError, match="support_mask"):
        BellmanDistillLoss(tiny_student())(td)
