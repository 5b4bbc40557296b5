"""Bellman Distill (BD): top-p Inverse soft-Q Learning (IQ-Learn), PAPER.md section 4.

Not to be confused with Implicit Q-Learning (``TopPImplicitQLoss``).
"""

from __future__ import annotations

import torch
from tensordict import TensorDict, TensorDictBase
from tensordict.nn import dispatch
from torch import nn

from agents.losses._base import SequenceLoss, StepBatch, at_least_fp32, check_choice, check_gamma
from tdkd.divergences import forward_kl, full_vocab_cross_entropy
from tdkd.td import bellman_distill_loss, bellman_distill_nucleus_loss, q_max_shift_clip

__all__ = ["BellmanDistillLoss"]


class BellmanDistillLoss(SequenceLoss):
    """Top-p IQ-Learn on teacher data: the student's logits are Q, no critic, no target network.

    Objective, maximised over the student on teacher occupancy rho_T (one response = one
    trajectory; loss = -J):

        J(Q) = E_{rho_T}[ phi(Q(s,a) - gamma V_p(s')) ] - E_{rho_T}[ V_p(s) - gamma V_p(s') ]

        Q(s,.)  = clip(logits(s,.) - max_b logits(s,b), Q_min)     (max over the vocabulary)
        V_p(s)  = log sum_{a in A_p(s)} exp Q(s,a),  V_p = 0 after the final response token
        phi(x)  = x - x^2 / (4 alpha_chi)         (alpha_chi=None: phi(x) = x, "no TD")

    ``expert_action="sampled"`` (default, the paper's formula): a = the teacher's sampled token;
    steps whose token is outside the nucleus at p (inadmissible in M_p, F_p Q = -inf) are
    left out of the average (their state values still feed the previous step).
    ``expert_action="nucleus"`` (the released script's form): every nucleus token is an expert
    action, 0-masked Q averaged over the vocabulary, epsilon-smoothed projected policy; see
    ``tdkd.td.bellman_distill_nucleus_loss``.

    Optional regulariser: loss = L_BD + lm_coef * L_PT with
    L_PT = lm_ce_weight * CE(tokens) + (1 - lm_ce_weight) * KL(proj_p pi_T || pi_theta), on the
    same batch (teacher samples), the student's probabilities over the full vocabulary.

    Stop-gradient: only the Q max-shift, a per-state normalisation; Q(s,.) and V_p(s') come from
    the same forward and both carry gradients, as in IQ-Learn without a target network. Divergence direction of L_PT: forward
    KL(teacher || student). Gradients reach only logits of nucleus tokens for L_BD (the
    max-shift is a stop-gradient normalisation, ``tdkd.td.q_max_shift_clip``).

    Args:
        student: HF causal LM (its logits are Q).

    Keyword Args:
        p: nucleus mass to cut the cached supports at (<= the cache's p_store); None = as stored.
        gamma: discount in [0, 1). alpha_chi: chi^2 strength, None for linear phi.
        q_min: clip of the shifted Q (< 0) or None (no shift, no clip).
        expert_action: "sampled" or "nucleus". epsilon: smoothing of the "nucleus" form.
        lm_coef: weight of L_PT (0 = off). lm_ce_weight: CE share of L_PT.
        chunk_size: rows per fp32 chunk of the full-vocabulary cross-entropy (L_PT).
        reduction: "mean" | "sum" | "none".

    Outputs: loss_bd (and loss_lm when lm_coef > 0); diagnostics q_mean, v_mean,
    action_outside_support, support_size, covered_mass, kl_forward, kl_reverse (the latter two
    between proj_p of teacher and student on the nucleus).
    """

    _diagnostic_keys = (
        "q_mean",
        "v_mean",
        "action_outside_support",
        *SequenceLoss._diagnostic_keys,
    )

    def __init__(
        self,
        student: nn.Module,
        *,
        p: float | None = None,
        gamma: float = 0.99,
        alpha_chi: float | None = 0.1,
        q_min: float | None = -10.0,
        expert_action: str = "sampled",
        epsilon: float = 1e-6,
        lm_coef: float = 0.0,
        lm_ce_weight: float = 0.5,
        chunk_size: int = 256,
        reduction: str = "mean",
    ) -> None:
        super().__init__(student, p=p, reduction=reduction)
        check_choice("expert_action", expert_action, ("sampled", "nucleus"))
        self.gamma = check_gamma(gamma)
        if alpha_chi is not None and not alpha_chi > 0.0:
            raise ValueError(f"alpha_chi must be > 0 or None, got alpha_chi={alpha_chi}")
        if lm_coef < 0.0 or not 0.0 <= lm_ce_weight <= 1.0:
            raise ValueError(
                f"lm_coef must be >= 0 and lm_ce_weight in [0, 1], got lm_coef={lm_coef}, "
                f"lm_ce_weight={lm_ce_weight}"
            )
        self.alpha_chi = alpha_chi
        self.q_min = q_min
        self.expert_action = expert_action
        self.epsilon = float(epsilon)
        self.lm_coef = float(lm_coef)
        self.lm_ce_weight = float(lm_ce_weight)
        self.chunk_size = int(chunk_size)
        self._loss_keys = ("loss_bd", "loss_lm") if self.lm_coef > 0 else ("loss_bd",)
        if self.lm_coef > 0:
            self._used_keys = (*SequenceLoss._used_keys, "teacher_log_prob")

    def _q(self, batch: StepBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(Q on the support [B, T, K], Q of the action [B, T]) after the max-shift and clip."""
        if self.q_min is None:
            return batch.logits_on_support, batch.logit_of_action
        q_max = at_least_fp32(batch.steps.q.max(dim=-1).values)
        q_sup = q_max_shift_clip(batch.logits_on_support, self.q_min, q_max=q_max)
        q_a = q_max_shift_clip(batch.logit_of_action.unsqueeze(-1), self.q_min, q_max=q_max)
        return q_sup, q_a.squeeze(-1)

    def _lm_loss(self, batch: StepBatch) -> torch.Tensor:
        """Per-step L_PT = w CE(a_t) + (1 - w) KL(proj_p pi_T || pi_theta) (full-vocab student)."""
        mask = batch.mask
        ce = full_vocab_cross_entropy(
            batch.steps.q, batch.steps.actions, mask=mask, chunk_size=self.chunk_size
        )
        log_norm = ce + batch.logit_of_action  # logsumexp of the student's logits
        student = batch.logits_on_support - log_norm.unsqueeze(-1)
        teacher = batch.support_log_probs.masked_fill(~batch.support_mask, float("-inf"))
        teacher = teacher - torch.logsumexp(teacher, -1, keepdim=True).nan_to_num(neginf=0.0)
        kl = forward_kl(teacher, student, batch.support_mask)
        per_step = self.lm_ce_weight * ce + (1.0 - self.lm_ce_weight) * kl
        return torch.where(mask, per_step, torch.zeros_like(per_step))

    @dispatch
    def forward(self, tensordict: TensorDictBase) -> TensorDict:
        logits = self._logits(tensordict)
        batch = self._step_batch(tensordict, logits)
        q_sup, q_a = self._q(batch)
        if self.expert_action == "sampled":
            loss_t, v_t = bellman_distill_loss(
                q_a,
                q_sup,
                batch.support_mask,
                batch.mask,
                gamma=self.gamma,
                alpha_chi=self.alpha_chi,
            )
            weight = batch.in_support
        else:
            loss_t, v_t = bellman_distill_nucleus_loss(
                q_sup,
                batch.support_mask,
                batch.mask,
                vocab_size=logits.shape[-1],
                gamma=self.gamma,
                alpha_chi=self.alpha_chi,
                epsilon=self.epsilon,
            )
            weight = batch.mask
        out = {"loss_bd": self._reduce(loss_t, weight)}
        if self.lm_coef > 0:
            out["loss_lm"] = self.lm_coef * self._reduce(self._lm_loss(batch), batch.mask)
        mask = batch.mask
        out["q_mean"] = self._reduce_diagnostic(q_a.detach(), mask)
        out["v_mean"] = self._reduce_diagnostic(v_t.detach(), mask)
        out["action_outside_support"] = self._reduce_diagnostic(
            (mask & ~batch.in_support).float(), mask
        )
        out.update(self._diagnostics(batch))
        return self._output(tensordict, out)
