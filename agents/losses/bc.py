"""Behaviour-cloning baselines, token level: SFT / SeqKD and divergence-based KD.

Named ``SFTLoss`` and ``TokenDivergenceLoss`` so they never clash with TorchRL's
``torchrl.objectives.llm.DistillationLoss`` (a sampled-token k3 KL estimator).
"""

from __future__ import annotations

import torch
from tensordict import TensorDict, TensorDictBase
from tensordict.nn import dispatch
from torch import nn

from agents.losses._base import SequenceLoss, check_choice
from tdkd.divergences import full_vocab_cross_entropy, full_vocab_divergence, get_divergence
from tdkd.sequence import align_steps
from tdkd.topp import proj_p_log_probs

__all__ = ["SFTLoss", "TokenDivergenceLoss"]


class SFTLoss(SequenceLoss):
    """Supervised fine-tuning: maximum likelihood of the batch's response tokens.

        L = -E_t[ log pi_theta(a_t | s_t) ]     (softmax over the full vocabulary)

    On teacher-generated responses this is SeqKD; on dataset responses it is SFT. Equivalently
    KL(one-hot(a_t) || pi_theta) per step (forward direction). Stop-gradient: nothing (no
    teacher term). The full-vocabulary log-softmax is computed in checkpointed fp32 row chunks
    (``chunk_size``), so no more than one [chunk, V] fp32 block is alive at a time.

    Keyword Args:
        chunk_size: rows per chunk. reduction: "mean" | "sum" | "none".

    Outputs: loss_sft; diagnostic nll (= loss_sft detached).
    """

    _used_keys = ("tokens", "attention_mask", "response_mask")
    _loss_keys = ("loss_sft",)
    _diagnostic_keys = ("nll",)

    def __init__(
        self, student: nn.Module, *, chunk_size: int = 256, reduction: str = "mean"
    ) -> None:
        super().__init__(student, reduction=reduction)
        self.chunk_size = int(chunk_size)

    @dispatch
    def forward(self, tensordict: TensorDictBase) -> TensorDict:
        logits = self._logits(tensordict)
        steps = align_steps(
            logits, self._get(tensordict, "tokens"), self._get(tensordict, "response_mask")
        )
        nll = full_vocab_cross_entropy(
            steps.q, steps.actions, mask=steps.mask, chunk_size=self.chunk_size
        )
        loss = self._reduce(nll, steps.mask)
        return self._output(tensordict, {"loss_sft": loss, "nll": loss.detach()})


class TokenDivergenceLoss(SequenceLoss):
    """Word-level KD: a divergence D(pi_T(.|s_t) || pi_theta(.|s_t)) averaged over response steps.

        L = E_t[ D(P_t, Q_t) ],  P = teacher, Q = student, D one of ``tdkd.divergences``:
        forward_kl = KL(P || Q) (KD), reverse_kl = KL(Q || P), jsd (beta), skew_kl (lam)
        = KL(P || lam P + (1-lam) Q), skew_rkl, tvd.

    ``vocab="support"`` (the fast path, from the cache): P = proj_p(pi_T), the teacher
    renormalised on its nucleus A_p(s_t); Q = pi_theta over the whole vocabulary restricted to
    the nucleus (``student_normalization="vocab"``, the default for forward_kl / cross_entropy:
    the usual sparse-KD loss sum_{a in A_p} P(a) (log P(a) - log pi_theta(a)), which also pushes
    down the student's mass outside the nucleus) or Q = proj_p(pi_theta) (``"support"``, the
    default and only choice for the other divergences: both are distributions on the nucleus
    and tokens outside it get no gradient).
    ``vocab="full"``: P and Q are the full softmaxes; the teacher's logits come from the batch
    key "teacher_logits" [B, L, V] or, when ``teacher`` is given, from running the teacher on the
    tokens each step (live teacher, as TRL and DistiLLM train). Computed in checkpointed fp32
    row chunks, so memory stays flat as V grows.

    Stop-gradient: the teacher (always). Direction: as named, teacher first.

    Keyword Args:
        divergence: a name of ``tdkd.divergences.DIVERGENCES``.
        vocab: "support" or "full". p: nucleus mass for "support" (<= p_store; None = stored).
        student_normalization: "vocab", "support" or None (see above; None = "vocab" for
            forward_kl / cross_entropy, "support" otherwise).
        teacher: optional nn.Module (HF causal LM) for live full-vocabulary teacher logits.
        beta: JSD weight. lam: skew weight. chunk_size: rows per fp32 chunk.
        reduction: "mean" | "sum" | "none".

    Outputs: loss_<divergence>; diagnostics (support mode) support_size, covered_mass,
    kl_forward, kl_reverse.
    """

    def __init__(
        self,
        student: nn.Module,
        *,
        divergence: str = "forward_kl",
        vocab: str = "support",
        p: float | None = None,
        student_normalization: str | None = None,
        teacher: nn.Module | None = None,
        beta: float = 0.5,
        lam: float = 0.1,
        chunk_size: int = 256,
        reduction: str = "mean",
    ) -> None:
        super().__init__(student, p=p, reduction=reduction)
        self.divergence_fn = get_divergence(divergence)
        check_choice("vocab", vocab, ("support", "full"))
        if student_normalization is None:
            full = divergence in ("forward_kl", "cross_entropy")
            student_normalization = "vocab" if full else "support"
        check_choice("student_normalization", student_normalization, ("support", "vocab"))
        if student_normalization == "vocab" and divergence not in ("forward_kl", "cross_entropy"):
            raise ValueError(
                f"student_normalization='vocab' is only a divergence for forward_kl and "
                f"cross_entropy, got divergence={divergence!r}; use 'support'"
            )
        if teacher is not None and vocab != "full":
            raise ValueError("a live teacher is only used with vocab='full'")
        self.divergence = divergence
        self.vocab = vocab
        self.student_normalization = student_normalization
        # the teacher is frozen and not part of the loss's parameters or state_dict
        self.__dict__["teacher"] = teacher
        self.hyperparameters = {
            "jsd": {"beta": beta},
            "skew_kl": {"lam": lam},
            "skew_rkl": {"lam": lam},
        }.get(divergence, {})
        self.chunk_size = int(chunk_size)
        self._loss_keys = (f"loss_{divergence}",)
        if vocab == "full":
            self._used_keys = ("tokens", "attention_mask", "response_mask")
            if teacher is None:
                self._used_keys = (*self._used_keys, "teacher_logits")
            self._diagnostic_keys = ()

    def _full(self, tensordict: TensorDictBase, logits: torch.Tensor) -> torch.Tensor:
        steps = align_steps(
            logits, self._get(tensordict, "tokens"), self._get(tensordict, "response_mask")
        )
        if self.teacher is not None:
            with torch.no_grad():
                teacher_logits = self.teacher(
                    input_ids=self._get(tensordict, "tokens"),
                    attention_mask=self._get(tensordict, "attention_mask").long(),
                ).logits
        else:
            teacher_logits = self._get(tensordict, "teacher_logits")
        per_step = full_vocab_divergence(
            teacher_logits[:, :-1],
            steps.q,
            self.divergence,
            mask=steps.mask,
            chunk_size=self.chunk_size,
            **self.hyperparameters,
        )
        return self._reduce(per_step, steps.mask)

    @dispatch
    def forward(self, tensordict: TensorDictBase) -> TensorDict:
        logits = self._logits(tensordict)
        if self.vocab == "full":
            return self._output(tensordict, {self._loss_keys[0]: self._full(tensordict, logits)})
        batch = self._step_batch(tensordict, logits)
        support = batch.support_mask
        teacher = proj_p_log_probs(
            batch.support_log_probs.masked_fill(~support, 0.0), batch.safe_support
        )
        if self.student_normalization == "support":
            student = batch.student_log_probs()
        else:
            # log sum_V exp(logits) = CE(a_t) + logit(a_t), from the chunked fp32 pass
            nll = full_vocab_cross_entropy(
                batch.steps.q, batch.steps.actions, mask=batch.mask, chunk_size=self.chunk_size
            )
            student = batch.logits_on_support - (nll + batch.logit_of_action).unsqueeze(-1)
        per_step = self.divergence_fn(teacher, student, support, **self.hyperparameters)
        per_step = torch.where(batch.mask, per_step, torch.zeros_like(per_step))
        out = {self._loss_keys[0]: self._reduce(per_step, batch.mask)}
        out.update(self._diagnostics(batch))
        return self._output(tensordict, out)
