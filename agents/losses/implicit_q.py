"""Top-p Implicit Q-Learning (IQL of Kostrikov et al. 2021, TorchRL's ``DiscreteIQLLoss``).

Not the paper's "IQL" (Inverse soft-Q Learning): that one is ``BellmanDistillLoss``.
"""

from __future__ import annotations

import torch
from tensordict import TensorDict, TensorDictBase
from tensordict.nn import TensorDictParams, dispatch
from torch import nn

from agents.losses._base import SequenceLoss, at_least_fp32
from agents.losses._critics import CriticsMixin, StateValueLM, make_critics
from agents.losses.soft_q import RewardMixin
from tdkd.td import advantage_weights, distance_loss, expectile_loss

__all__ = ["TopPImplicitQLoss"]


class TopPImplicitQLoss(RewardMixin, CriticsMixin, SequenceLoss):
    """Implicit Q-Learning on the top-p MDP: expectile V, Q on r + gamma V(s'), AWR actor.

    With critics Q_i (EMA targets Q^-_i), a state-value network V and the actor
    pi = proj_p(softmax(student logits)):

        loss_value  = E_t[ |tau - 1(u < 0)| u^2 ],  u = min_i Q^-_i(s_t, a_t) - V(s_t)
        loss_qvalue = E_t[ sum_i d(Q_i(s_t, a_t), r_t + gamma V(s_{t+1})) ]
        loss_actor  = E_t[ -min(exp(beta (min_i Q^-_i(s_t,a_t) - V(s_t))), 100) log proj_p(pi)(a_t|s_t) ]

    tau = ``expectile``, beta = ``temperature``; V(s_{t+1}) = 0 after a terminated response, the
    last step of a truncated one is left out, as are steps whose token is outside A_p(s_t).
    Only dataset actions enter (no max over actions): the nucleus restricts the actor's
    normalisation, so the extracted policy puts all its mass on A_p.

    Stop-gradient: target critics everywhere, V in loss_actor and in the Q target. Gradients:
    loss_value -> V, loss_qvalue -> critics, loss_actor -> student (nucleus logits only).

    Networks: critics as in ``agents.losses._critics`` (separate causal LMs, default copies of the
    student), V = ``StateValueLM`` (a copy of the student's trunk with a scalar head) unless
    ``value_network`` (a module mapping (input_ids, attention_mask) -> [B, L]) is given.

    Keyword Args:
        p, gamma, reward, num_critics, critic, value_network, expectile, temperature,
        loss_function, reduction.

    Outputs: loss_actor, loss_qvalue, loss_value; diagnostics q_mean, v_mean,
    advantage_weight, support_size, covered_mass, kl_forward, kl_reverse.
    """

    _loss_keys = ("loss_actor", "loss_qvalue", "loss_value")
    _diagnostic_keys = ("q_mean", "v_mean", "advantage_weight", *SequenceLoss._diagnostic_keys)
    value: nn.Module
    value_params: TensorDictParams
    target_value_params: TensorDictParams

    def __init__(
        self,
        student: nn.Module,
        *,
        p: float | None = None,
        gamma: float = 0.99,
        reward: str = "teacher_logp",
        num_critics: int = 2,
        critic: nn.Module | None = None,
        value_network: nn.Module | None = None,
        expectile: float = 0.7,
        temperature: float = 3.0,
        loss_function: str = "l2",
        reduction: str = "mean",
    ) -> None:
        super().__init__(student, p=p, reduction=reduction)
        self._init_td(gamma=gamma, reward=reward, loss_function=loss_function)
        if not 0.0 < expectile < 1.0:
            raise ValueError(f"expectile must be in (0, 1), got expectile={expectile}")
        self.expectile, self.temperature = float(expectile), float(temperature)
        self._register_critics(make_critics(critic if critic is not None else student, num_critics))
        value_network = (
            value_network if value_network is not None else StateValueLM.from_student(student)
        )
        self.convert_to_functional(value_network, "value", create_target_params=False)

    def _values(self, td: TensorDictBase) -> torch.Tensor:
        with self.value_params.to_module(self.value):
            return self.value(
                input_ids=self._get(td, "tokens"),
                attention_mask=self._get(td, "attention_mask").long(),
            )

    @dispatch
    def forward(self, tensordict: TensorDictBase) -> TensorDict:
        logits = self._logits(tensordict)
        batch = self._step_batch(tensordict, logits)
        support = batch.support_mask
        actions = batch.steps.actions.unsqueeze(-1)
        weight = self.trained_steps(tensordict, batch)

        v_t = at_least_fp32(self._values(tensordict)[:, :-1])  # V(s_t) on the step grid
        with torch.no_grad():
            target_q_a = at_least_fp32(
                torch.stack(
                    [
                        self._critic_logits(tensordict, i, target=True)[:, :-1]
                        .gather(-1, actions)
                        .squeeze(-1)
                        for i in range(self.num_critics)
                    ]
                )
                .min(0)
                .values
            )
            y_t = self._bootstrap_target(tensordict, batch, v_t.detach())
            awr = advantage_weights(target_q_a, v_t.detach(), self.temperature)

        loss_value_t = expectile_loss(target_q_a - v_t, self.expectile)
        q_a = [
            at_least_fp32(
                self._critic_logits(tensordict, i)[:, :-1].gather(-1, actions).squeeze(-1)
            )
            for i in range(self.num_critics)
        ]
        loss_q_t = sum(distance_loss(q, y_t, self.loss_function) for q in q_a)
        log_pi = batch.student_log_probs()
        log_pi_a = (log_pi.masked_fill(~support, 0.0) * (batch.support_ids == actions)).sum(-1)
        loss_actor_t = -awr * log_pi_a
        out = {
            "loss_actor": self._reduce(loss_actor_t, weight),
            "loss_qvalue": self._reduce(loss_q_t, weight),
            "loss_value": self._reduce(loss_value_t, weight),
            "q_mean": self._reduce_diagnostic(q_a[0].detach(), weight),
            "v_mean": self._reduce_diagnostic(v_t.detach(), weight),
            "advantage_weight": self._reduce_diagnostic(awr, weight),
        }
        out.update(self._diagnostics(batch))
        return self._output(tensordict, out)
