"""What every sequence loss shares: tensordict keys, the one student forward, the step grid.

A loss module holds the student (an HF causal LM, made functional by TorchRL so target copies
and ``SoftUpdate`` work) and reads an offline batch (see the README / issue contract):

    tokens int64 [B, L], attention_mask bool [B, L], response_mask bool [B, L],
    support_ids int64 [B, L, K], support_log_probs float32 [B, L, K], support_mask bool [B, L, K],
    teacher_log_prob float32 [B, L], covered_mass float32 [B, L], terminated bool [B],
    reward float32 [B, L] (online rollouts only).

The batch is never modified. ``reduction``: "mean" = mean over all response steps of the batch
(token-weighted), "sum" = their sum, "none" = per-sequence mean, shape [B].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tensordict import TensorDict, TensorDictBase
from tensordict.nn import TensorDictParams
from tensordict.utils import NestedKey
from torch import nn
from torchrl.objectives import LossModule

from tdkd.divergences import forward_kl, reverse_kl
from tdkd.sequence import Steps, action_in_support, align_steps, restrict_support_mask
from tdkd.td import fill_empty_rows
from tdkd.topp import check_p, gather_support, proj_p_log_probs

__all__ = ["SequenceLoss", "StepBatch", "at_least_fp32", "check_choice", "check_gamma", "last_step"]

_REDUCTIONS = ("mean", "sum", "none")


@dataclass(frozen=True)
class StepBatch:
    """The batch on the step grid with the support already cut at p.

    Attributes:
        steps: logits/actions/mask on [B, T] (``tdkd.sequence.Steps``).
        support_ids, support_mask: [B, T, K] nucleus at p; support_log_probs [B, T, K] teacher.
        logits_on_support: [B, T, K] raw student logits on the nucleus (0 at padding).
        logit_of_action: [B, T] raw student logit of the taken action.
        in_support: bool [B, T] response step whose action lies in the nucleus at p.
    """

    steps: Steps
    support_ids: torch.Tensor
    support_mask: torch.Tensor
    support_log_probs: torch.Tensor
    logits_on_support: torch.Tensor
    logit_of_action: torch.Tensor
    in_support: torch.Tensor

    @property
    def mask(self) -> torch.Tensor:
        return self.steps.mask

    @property
    def safe_support(self) -> torch.Tensor:
        """bool [B, T, K]: the support, all True in rows without one (keeps proj_p finite)."""
        return self.support_mask | ~self.support_mask.any(-1, keepdim=True)

    def student_log_probs(self) -> torch.Tensor:
        """[B, T, K] log proj_p(softmax(student logits)) on the nucleus (the actor)."""
        return proj_p_log_probs(self.logits_on_support, self.safe_support)


class SequenceLoss(LossModule):
    """Base class: keys, student forward, alignment, reduction, shared diagnostics."""

    @dataclass
    class _AcceptedKeys:
        """Remappable tensordict keys (``loss.set_keys(tokens="input_ids")``)."""

        tokens: NestedKey = "tokens"
        attention_mask: NestedKey = "attention_mask"
        response_mask: NestedKey = "response_mask"
        support_ids: NestedKey = "support_ids"
        support_log_probs: NestedKey = "support_log_probs"
        support_mask: NestedKey = "support_mask"
        teacher_log_prob: NestedKey = "teacher_log_prob"
        covered_mass: NestedKey = "covered_mass"
        terminated: NestedKey = "terminated"
        reward: NestedKey = "reward"
        teacher_logits: NestedKey = "teacher_logits"

    default_keys = _AcceptedKeys
    tensor_keys: _AcceptedKeys
    student: nn.Module
    student_params: TensorDictParams
    target_student_params: TensorDictParams

    # keys read by forward(); subclasses extend
    _used_keys: tuple[str, ...] = (
        "tokens",
        "attention_mask",
        "response_mask",
        "support_ids",
        "support_log_probs",
        "support_mask",
    )
    _loss_keys: tuple[str, ...] = ()
    _diagnostic_keys: tuple[str, ...] = ("support_size", "covered_mass", "kl_forward", "kl_reverse")

    def __init__(
        self,
        student: nn.Module,
        *,
        p: float | None = None,
        reduction: str = "mean",
        target_network: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(student, nn.Module):
            raise ValueError(
                f"student must be a torch.nn.Module (an HF causal LM), got {type(student).__name__}"
            )
        if reduction not in _REDUCTIONS:
            raise ValueError(f"reduction must be one of {_REDUCTIONS}, got reduction={reduction!r}")
        self.p = None if p is None else check_p(p)
        self.reduction = reduction
        self.convert_to_functional(student, "student", create_target_params=target_network)

    # -- keys ------------------------------------------------------------------------------
    def _forward_value_estimator_keys(self, **kwargs) -> None:
        pass

    @property
    def in_keys(self) -> list[NestedKey]:
        return [getattr(self.tensor_keys, name) for name in self._used_keys]

    @property
    def out_keys(self) -> list[str]:
        return [*self._loss_keys, *self._diagnostic_keys]

    def _get(self, td: TensorDictBase, name: str) -> torch.Tensor:
        key = getattr(self.tensor_keys, name)
        value = td.get(key, None)
        if value is None:
            raise ValueError(
                f"{type(self).__name__} needs the batch key {key!r} ({name}); the batch has "
                f"{sorted(str(k) for k in td.keys(True, True))}"
            )
        return value

    # -- forward pieces ----------------------------------------------------------------------
    def _logits(self, td: TensorDictBase, params: TensorDictParams | None = None) -> torch.Tensor:
        """[B, L, V] logits of the student (or of ``params``, e.g. the target copy)."""
        params = self.student_params if params is None else params
        tokens = self._get(td, "tokens")
        attention_mask = self._get(td, "attention_mask")
        with params.to_module(self.student):
            return self.student(input_ids=tokens, attention_mask=attention_mask.long()).logits

    def _step_batch(self, td: TensorDictBase, logits: torch.Tensor) -> StepBatch:
        names = ("support_ids", "support_log_probs", "support_mask")
        steps = align_steps(
            logits,
            self._get(td, "tokens"),
            self._get(td, "response_mask"),
            {name: self._get(td, name) for name in names},
        )
        ids = steps.fields["support_ids"].long()
        log_probs = steps.fields["support_log_probs"]
        support = steps.fields["support_mask"].bool()
        if self.p is not None:
            support = restrict_support_mask(log_probs, support, self.p)
        support = support & steps.mask.unsqueeze(-1)
        if bool((steps.mask & ~support.any(-1)).any()):
            raise ValueError(
                "a response step has an empty support: support_mask must be True on at least "
                "one entry at every response token"
            )
        return StepBatch(
            steps=steps,
            support_ids=ids,
            support_mask=support,
            support_log_probs=log_probs,
            logits_on_support=at_least_fp32(gather_support(steps.q, ids, support, fill=0.0)),
            logit_of_action=at_least_fp32(
                steps.q.gather(-1, steps.actions.unsqueeze(-1)).squeeze(-1)
            ),
            in_support=steps.mask & action_in_support(steps.actions, ids, support),
        )

    def _reduce(self, loss_t: torch.Tensor, weight_t: torch.Tensor) -> torch.Tensor:
        """Reduce a per-step loss [B, T] over the steps where ``weight_t`` is True."""
        w = weight_t.to(loss_t.dtype)
        loss_t = loss_t * w
        if self.reduction == "mean":
            return loss_t.sum() / w.sum().clamp(min=1.0)
        if self.reduction == "sum":
            return loss_t.sum()
        return loss_t.sum(-1) / w.sum(-1).clamp(min=1.0)

    def _diagnostics(self, batch: StepBatch) -> dict[str, torch.Tensor]:
        """Detached statistics every loss reports (means over response steps)."""
        with torch.no_grad():
            mask = batch.mask
            support = batch.support_mask
            teacher = proj_p_log_probs(
                batch.support_log_probs.masked_fill(~support, 0.0), fill_empty_rows(support)
            )
            student = proj_p_log_probs(batch.logits_on_support.detach(), fill_empty_rows(support))
            covered = batch.support_log_probs.masked_fill(~support, float("-inf")).exp().sum(-1)
            values = {
                "support_size": support.sum(-1).float(),
                "covered_mass": covered,
                "kl_forward": forward_kl(teacher, student, support),
                "kl_reverse": reverse_kl(teacher, student, support),
            }
            return {name: self._reduce_diagnostic(v, mask) for name, v in values.items()}

    def _reduce_diagnostic(self, value_t: torch.Tensor, mask_t: torch.Tensor) -> torch.Tensor:
        w = mask_t.to(value_t.dtype)
        if self.reduction == "none":
            return ((value_t * w).sum(-1) / w.sum(-1).clamp(min=1.0)).detach()
        return ((value_t * w).sum() / w.sum().clamp(min=1.0)).detach()

    def _output(self, td: TensorDictBase, values: dict[str, torch.Tensor]) -> TensorDict:
        batch_size = td.batch_size[:1] if self.reduction == "none" else []
        return TensorDict(values, batch_size=batch_size)


def check_gamma(gamma: float) -> float:
    """gamma as a float (ValueError unless it lies in [0, 1))."""
    if not 0.0 <= gamma < 1.0:
        raise ValueError(f"gamma must be in [0, 1), got gamma={gamma}")
    return float(gamma)


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> str:
    """value (ValueError naming the argument unless it is one of ``choices``)."""
    if value not in choices:
        options = " or ".join(repr(c) for c in choices)
        raise ValueError(f"{name} must be {options}, got {name}={value!r}")
    return value


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """x in float32 when it is in a narrower float type (bf16/fp16 students): the TD maths
    (log-sum-exp, squared TD errors) runs in fp32 on the small [B, T, K] tensors only."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def last_step(mask_t: torch.Tensor) -> torch.Tensor:
    """bool [B, T]: True at the final response step of each row."""
    nxt = torch.zeros_like(mask_t)
    nxt[..., :-1] = mask_t[..., 1:]
    return mask_t & ~nxt
