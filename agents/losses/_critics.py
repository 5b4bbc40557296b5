"""Critic networks for the actor-critic losses (SAC, Implicit Q): separate causal LMs.

Design choice: each critic Q_i is a *separate* causal LM whose logits are Q_i(s, .) (by
default a copy of the student, its output head re-initialised for i >= 1 so the critics
differ), with an EMA target copy. A state-value network V(s) (Implicit Q) is a copy of the
student's trunk (``base_model``) with a scalar head. Memory: every critic costs one student's
parameters, its target another (AdamW state on top), so SAC with 2 critics holds 5 models'
weights; critics on the student trunk would be cheaper but couple the critic and actor
updates through the shared trunk, which the equivalence tests with TorchRL's losses rule out.
"""

from __future__ import annotations

import copy
import warnings

import torch
from tensordict import TensorDictBase
from torch import nn

__all__ = ["StateValueLM", "make_critics"]


def make_critics(template: nn.Module, num_critics: int, *, seed: int = 0) -> list[nn.Module]:
    """``num_critics`` deep copies of ``template``; copy i >= 1 gets a fresh output head."""
    if int(num_critics) < 1:
        raise ValueError(f"num_critics must be >= 1, got num_critics={num_critics}")
    critics = []
    for i in range(int(num_critics)):
        critic = copy.deepcopy(template)
        critic.requires_grad_(True)
        if i > 0:
            head = critic.get_output_embeddings()
            state = torch.random.get_rng_state()
            torch.manual_seed(seed + i)
            try:
                head.reset_parameters()
            finally:
                torch.random.set_rng_state(state)
        critics.append(critic)
    return critics


class StateValueLM(nn.Module):
    """V(s) for every prefix: a causal LM trunk and a linear head, [B, L] -> [B, L].

    ``StateValueLM.from_student(student)`` copies the student's trunk (``base_model``).
    """

    def __init__(self, trunk: nn.Module, hidden_size: int) -> None:
        super().__init__()
        self.trunk = trunk
        self.head = nn.Linear(hidden_size, 1)

    @classmethod
    def from_student(cls, student: nn.Module) -> StateValueLM:
        trunk = copy.deepcopy(student.base_model)
        trunk.requires_grad_(True)
        return cls(trunk, student.config.hidden_size)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        hidden = self.trunk(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.head(hidden).squeeze(-1)


class CriticsMixin:
    """Registers critics (+ EMA targets) as functional params ``critic{i}_params``."""

    num_critics: int

    def _register_critics(self, critics: list[nn.Module]) -> None:
        self.num_critics = len(critics)
        for i, critic in enumerate(critics):
            with warnings.catch_warnings():  # TorchRL wants class annotations for these names
                warnings.filterwarnings(
                    "ignore", message="The name .* wasn't part of the annotations"
                )
                self.convert_to_functional(critic, f"critic{i}", create_target_params=True)

    def _critic_logits(self, td: TensorDictBase, i: int, *, target: bool = False) -> torch.Tensor:
        """[B, L, V] logits of critic i (or its target copy)."""
        critic = getattr(self, f"critic{i}")
        params = getattr(self, f"{'target_' if target else ''}critic{i}_params")
        with params.to_module(critic):
            return critic(
                input_ids=self._get(td, "tokens"),
                attention_mask=self._get(td, "attention_mask").long(),
            ).logits
