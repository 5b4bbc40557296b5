"""Top-p soft Q-learning (soft DQN) with a teacher-derived reward."""

from __future__ import annotations

import torch
from tensordict import TensorDict, TensorDictBase
from tensordict.nn import dispatch
from torch import nn

from agents.losses._base import (
    SequenceLoss,
    StepBatch,
    at_least_fp32,
    check_choice,
    check_gamma,
    last_step,
)
from tdkd.bellman import next_state_value
from tdkd.sequence import shift_per_token
from tdkd.td import distance_loss, soft_q_target
from tdkd.topp import gather_support

__all__ = ["REWARD_MODES", "RewardMixin", "TopPSoftQLoss", "step_rewards"]

REWARD_MODES = ("teacher_logp", "teacher_logp_projected", "zero", "batch")


def step_rewards(
    mode: str,
    *,
    teacher_log_prob_t: torch.Tensor | None = None,
    support_log_probs_t: torch.Tensor | None = None,
    support_t: torch.Tensor | None = None,
    reward_t: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rewards r_t [B, T] on the step grid.

    - "teacher_logp":           r = log pi_T(a_t|s_t)
    - "teacher_logp_projected": r = log proj_p(pi_T)(a_t|s_t) = log pi_T(a_t|s_t) - log m_p(s_t),
      m_p the teacher mass of the nucleus at p
    - "zero":                   r = 0 (pure entropy-regularised control on M_p)
    - "batch":                  the batch's own "reward" (online env rollouts)
    """
    if mode == "teacher_logp":
        return teacher_log_prob_t
    if mode == "teacher_logp_projected":
        log_mass = torch.logsumexp(
            support_log_probs_t.masked_fill(~support_t, float("-inf")), dim=-1
        ).nan_to_num(neginf=0.0)
        return teacher_log_prob_t - log_mass
    if mode == "zero":
        return torch.zeros_like(teacher_log_prob_t)
    if mode == "batch":
        return reward_t
    raise ValueError(f"reward must be one of {REWARD_MODES}, got reward={mode!r}")


class RewardMixin:
    """Rewards and trained steps shared by the TD losses that learn from a reward."""

    reward: str
    gamma: float

    def _init_td(self, *, gamma: float, reward: str, loss_function: str) -> None:
        """Check and store gamma, the reward mode and the TD distance; declare the batch keys."""
        self.gamma = check_gamma(gamma)
        distance_loss(torch.zeros(1), torch.zeros(1), loss_function)  # validates the name
        self.reward, self.loss_function = reward, loss_function
        self._used_keys = (*SequenceLoss._used_keys, *self.reward_keys(reward))

    def _bootstrap_target(
        self, td: TensorDictBase, batch: StepBatch, v_t: torch.Tensor
    ) -> torch.Tensor:
        """y_t = r_t + gamma v(s_{t+1}) [B, T] from state values v_t [B, T] on the step grid."""
        v_tp1 = next_state_value(torch.where(batch.mask, v_t, torch.zeros_like(v_t)), batch.mask)
        return self._rewards(td, batch) + self.gamma * v_tp1

    @staticmethod
    def reward_keys(reward: str) -> tuple[str, ...]:
        """Batch keys a reward mode reads (besides the support)."""
        if reward not in REWARD_MODES:
            raise ValueError(f"reward must be one of {REWARD_MODES}, got reward={reward!r}")
        return {"batch": ("reward", "terminated"), "zero": ("terminated",)}.get(
            reward, ("teacher_log_prob", "terminated")
        )

    def _rewards(self, td: TensorDictBase, batch: StepBatch) -> torch.Tensor:
        needs = {"batch": "reward"}.get(self.reward, "teacher_log_prob")
        if self.reward == "zero":
            return torch.zeros_like(batch.logit_of_action).detach()
        field = shift_per_token(self._get(td, needs)).to(batch.logit_of_action.dtype)
        return step_rewards(
            self.reward,
            teacher_log_prob_t=field,
            support_log_probs_t=batch.support_log_probs,
            support_t=batch.support_mask,
            reward_t=field,
        )

    def trained_steps(self, td: TensorDictBase, batch: StepBatch) -> torch.Tensor:
        """bool [B, T]: in-nucleus response steps that have a target (see the class doc)."""
        terminated = self._get(td, "terminated").bool().reshape(-1, 1)
        return batch.in_support & ~(last_step(batch.mask) & ~terminated)


class TopPSoftQLoss(RewardMixin, SequenceLoss):
    """Soft Q-learning on the teacher's top-p MDP M_p, Q = student logits.

    Objective (minimised over the student), over response steps whose token is in A_p(s_t):

        L = E_t[ d(Q(s_t, a_t), y_t) ],   y_t = r_t + gamma V_p^-(s_{t+1})
        V_p^-(s) = alpha log sum_{a in A_p(s)} exp(Q^-(s,a)/alpha)   (backup="soft")
                 = max_{a in A_p(s)} Q^-(s,a)                          (backup="hard", DQN)

    d = squared error ("l2", default), "l1" or "smooth_l1"; Q^- = the target network (an EMA /
    periodic copy of the student, updated by ``torchrl.objectives.SoftUpdate`` /
    ``HardUpdate``), V^- = 0 after a terminated response. The last step of a *truncated*
    response is left out (its next state's nucleus is not in the batch, so it has no target).
    With alpha = 1 and r = log pi_T the optimum is the projected teacher's soft-optimal policy
    (sequence-level reverse-KL distillation on M_p, PAPER.md section 4).

    Stop-gradient: the whole target y_t (target network, no gradient). Only Q(s_t, a_t) of
    taken tokens in the nucleus receives gradient.

    Args:
        student: HF causal LM (its logits are Q).

    Keyword Args:
        p: nucleus mass (<= the cache's p_store); None = supports as stored.
        gamma: discount in [0, 1). alpha: entropy temperature > 0 of the soft backup.
        reward: one of ``REWARD_MODES`` (see ``step_rewards``).
        backup: "soft" or "hard". loss_function: "l2" | "l1" | "smooth_l1".
        reduction: "mean" | "sum" | "none".

    Outputs: loss_qvalue; diagnostics q_mean, target_mean, td_error, support_size,
    covered_mass, kl_forward, kl_reverse.
    """

    _loss_keys = ("loss_qvalue",)
    _diagnostic_keys = ("q_mean", "target_mean", "td_error", *SequenceLoss._diagnostic_keys)

    def __init__(
        self,
        student: nn.Module,
        *,
        p: float | None = None,
        gamma: float = 0.99,
        alpha: float = 1.0,
        reward: str = "teacher_logp",
        backup: str = "soft",
        loss_function: str = "l2",
        reduction: str = "mean",
    ) -> None:
        self.reward_keys(reward)
        super().__init__(student, p=p, reduction=reduction, target_network=True)
        self.backup = check_choice("backup", backup, ("soft", "hard"))
        self._init_td(gamma=gamma, reward=reward, loss_function=loss_function)
        if not alpha > 0.0:
            raise ValueError(f"alpha must be > 0, got alpha={alpha}")
        self.alpha = float(alpha)

    @dispatch
    def forward(self, tensordict: TensorDictBase) -> TensorDict:
        logits = self._logits(tensordict)
        batch = self._step_batch(tensordict, logits)
        with torch.no_grad():
            target_logits = self._logits(tensordict, self.target_student_params)[:, :-1]
            target_q = at_least_fp32(
                gather_support(target_logits, batch.support_ids, batch.support_mask, 0.0)
            )
            y_t = soft_q_target(
                self._rewards(tensordict, batch),
                target_q,
                batch.support_mask,
                batch.mask,
                gamma=self.gamma,
                alpha=self.alpha,
                backup=self.backup,
            )
        q_a = batch.logit_of_action
        weight = self.trained_steps(tensordict, batch)
        loss_t = distance_loss(q_a, y_t, self.loss_function)
        out = {
            "loss_qvalue": self._reduce(loss_t, weight),
            "q_mean": self._reduce_diagnostic(q_a.detach(), weight),
            "target_mean": self._reduce_diagnostic(y_t, weight),
            "td_error": self._reduce_diagnostic((q_a.detach() - y_t).abs(), weight),
        }
        out.update(self._diagnostics(batch))
        return self._output(tensordict, out)
