"""Top-p discrete SAC: actor = proj_p(softmax(student logits)), critics restricted to A_p."""

from __future__ import annotations

import math

import torch
from tensordict import TensorDict, TensorDictBase
from tensordict.nn import dispatch
from torch import nn

from agents.losses._base import SequenceLoss, StepBatch, at_least_fp32
from agents.losses._critics import CriticsMixin, make_critics
from agents.losses.soft_q import RewardMixin
from tdkd.td import distance_loss, sac_actor_loss, sac_alpha_loss, sac_state_value
from tdkd.topp import gather_support

__all__ = ["TopPDiscreteSACLoss"]


class TopPDiscreteSACLoss(RewardMixin, CriticsMixin, SequenceLoss):
    """Discrete SAC (TorchRL's ``DiscreteSACLoss``) on the top-p MDP, expectations over A_p.

    With pi = proj_p(softmax(student logits)) and critics Q_1..Q_N (targets Q^-_i):

        y_t          = r_t + gamma sum_{a in A_p(s_{t+1})} pi(a|s_{t+1}) (min_i Q^-_i(s_{t+1},a) - alpha log pi(a|s_{t+1}))
        loss_qvalue  = E_t[ sum_i d(Q_i(s_t, a_t), y_t) ]
        loss_actor   = E_t[ sum_{a in A_p(s_t)} pi(a|s_t) (alpha log pi(a|s_t) - min_i Q_i(s_t, a)) ]
        loss_alpha   = E_t[ -log alpha (sum_a pi log pi + H_target(s_t)) ]

    H_target = target_entropy_weight * log|A_p(s_t)| ("auto"; TorchRL's 0.98 log|A| at p = 1)
    or a fixed number. The next value is 0 after a terminated response; the last step of a
    truncated one is left out (no next nucleus in the batch). Steps whose token is outside
    A_p(s_t) are left out of loss_qvalue.

    Stop-gradient: y_t (target critics, actor at s_{t+1}); the critics in loss_actor; the
    policy's entropy in loss_alpha. Gradients: loss_qvalue -> critics, loss_actor -> student
    (nucleus logits only), loss_alpha -> log_alpha.

    Critics: separate causal LMs (``agents.losses._critics``: memory = (1 + 2 N) student-sized
    models); ``critic`` is the template (default: a copy of the student). Update their targets
    with ``SoftUpdate(loss, tau=...)``.

    Keyword Args:
        p, gamma, reward (``soft_q.REWARD_MODES``), num_critics, critic, alpha_init, fixed_alpha,
        target_entropy ("auto" or float), target_entropy_weight, loss_function, reduction.

    Outputs: loss_actor, loss_qvalue, loss_alpha; diagnostics alpha, entropy, q_mean,
    target_mean, support_size, covered_mass, kl_forward, kl_reverse.
    """

    _loss_keys = ("loss_actor", "loss_qvalue", "loss_alpha")
    _diagnostic_keys = ("alpha", "entropy", "q_mean", "target_mean", *SequenceLoss._diagnostic_keys)

    def __init__(
        self,
        student: nn.Module,
        *,
        p: float | None = None,
        gamma: float = 0.99,
        reward: str = "teacher_logp",
        num_critics: int = 2,
        critic: nn.Module | None = None,
        alpha_init: float = 1.0,
        fixed_alpha: bool = False,
        target_entropy: str | float = "auto",
        target_entropy_weight: float = 0.98,
        loss_function: str = "l2",
        reduction: str = "mean",
    ) -> None:
        super().__init__(student, p=p, reduction=reduction)
        self._init_td(gamma=gamma, reward=reward, loss_function=loss_function)
        if not alpha_init > 0.0:
            raise ValueError(f"alpha_init must be > 0, got alpha_init={alpha_init}")
        if target_entropy != "auto" and not isinstance(target_entropy, (int, float)):
            raise ValueError(f"target_entropy must be 'auto' or a number, got {target_entropy!r}")
        self.target_entropy = target_entropy
        self.target_entropy_weight = float(target_entropy_weight)
        self._register_critics(make_critics(critic if critic is not None else student, num_critics))
        log_alpha = torch.tensor(math.log(alpha_init))
        if fixed_alpha:
            self.register_buffer("log_alpha", log_alpha)
        else:
            self.log_alpha = nn.Parameter(log_alpha)

    def _target_entropy(self, batch: StepBatch) -> torch.Tensor | float:
        if self.target_entropy == "auto":
            sizes = batch.support_mask.sum(-1).clamp(min=1).float()
            return self.target_entropy_weight * sizes.log()
        return float(self.target_entropy)

    @dispatch
    def forward(self, tensordict: TensorDictBase) -> TensorDict:
        logits = self._logits(tensordict)
        batch = self._step_batch(tensordict, logits)
        support = batch.support_mask
        log_pi = batch.student_log_probs()
        alpha = self.log_alpha.detach().exp()
        ids, actions = batch.support_ids, batch.steps.actions.unsqueeze(-1)

        critic_logits = [
            self._critic_logits(tensordict, i)[:, :-1] for i in range(self.num_critics)
        ]
        with torch.no_grad():
            target_q = (
                torch.stack(
                    [
                        gather_support(
                            self._critic_logits(tensordict, i, target=True)[:, :-1],
                            ids,
                            support,
                            0.0,
                        )
                        for i in range(self.num_critics)
                    ]
                )
                .min(0)
                .values
            )
            v_t = sac_state_value(log_pi.detach(), target_q, support, alpha)
            y_t = self._bootstrap_target(tensordict, batch, v_t)

        weight_q = self.trained_steps(tensordict, batch)
        q_a = [at_least_fp32(c.gather(-1, actions).squeeze(-1)) for c in critic_logits]
        loss_q_t = sum(distance_loss(q, y_t, self.loss_function) for q in q_a)
        min_q = (
            torch.stack(
                [
                    at_least_fp32(gather_support(c.detach(), ids, support, 0.0))
                    for c in critic_logits
                ]
            )
            .min(0)
            .values
        )
        loss_actor_t = sac_actor_loss(log_pi, min_q, support, alpha)
        pi_log_pi = -sac_state_value(log_pi.detach(), torch.zeros_like(min_q), support, 1.0)
        loss_alpha_t = sac_alpha_loss(self.log_alpha, pi_log_pi, self._target_entropy(batch))
        out = {
            "loss_actor": self._reduce(loss_actor_t, batch.mask),
            "loss_qvalue": self._reduce(loss_q_t, weight_q),
            "loss_alpha": self._reduce(loss_alpha_t, batch.mask),
            "alpha": self._reduce_diagnostic(alpha.expand_as(y_t), batch.mask),
            "entropy": self._reduce_diagnostic(-pi_log_pi, batch.mask),
            "q_mean": self._reduce_diagnostic(q_a[0].detach(), weight_q),
            "target_mean": self._reduce_diagnostic(y_t, weight_q),
        }
        out.update(self._diagnostics(batch))
        return self._output(tensordict, out)
