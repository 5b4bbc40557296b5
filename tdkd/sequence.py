"""The one shift between a causal LM's logits and the actions of an offline batch.

A batch row holds ``tokens`` [L] (prompt + response, right-padded). A causal LM's forward over
them gives ``logits[i] = Q(s_{i+1}, .)``, the values of the state *after* token i, i.e. the
state *before* token i+1. So the action ``tokens[i]`` is valued by ``logits[i-1]``:

    q_t      = logits[:, t]          state s_t = tokens[:t+1]       t = 0 .. L-2   ([B, T, V])
    a_t      = tokens[:, t+1]        the action taken at s_t        ([B, T])
    mask_t   = response_mask[:, t+1] True when a_t is a response token (an action we learn from)
    x_t      = x[:, t+1]             every per-token field stored at the token's own position
                                     (support_ids, support_log_probs, teacher_log_prob, ...)

with T = L - 1. Everything a loss needs is then aligned on the same [B, T] grid; the next-state
value of step t is the value at step t+1 of the same grid (``tdkd.bellman.next_state_value``),
0 after the last response token. This is the only place in tdkd that knows about the shift.

The nucleus of a cached batch is stored at p_store; ``restrict_support_mask`` cuts it at any
p <= p_store (a nucleus is a prefix of the ranking, so this is exact).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from tdkd.topp import check_p, nucleus_size

__all__ = [
    "Steps",
    "action_in_support",
    "align_steps",
    "restrict_support_mask",
    "shift_per_token",
]


def shift_per_token(x: torch.Tensor) -> torch.Tensor:
    """A per-token field [B, L, ...] on the step grid [B, T, ...]: x[:, 1:] (a view)."""
    if x.dim() < 2 or x.shape[1] < 2:
        raise ValueError(
            f"per-token fields need shape [B, L, ...] with L >= 2, got {tuple(x.shape)}"
        )
    return x[:, 1:]


@dataclass(frozen=True)
class Steps:
    """An offline batch on the step grid (T = L - 1).

    Attributes:
        q: [B, T, V] student logits at each state s_t (a view of the forward's output).
        actions: int64 [B, T] the token taken at s_t.
        mask: bool [B, T] True where the action is a response token.
        fields: per-token fields shifted onto the grid, e.g. "support_ids" [B, T, K].
    """

    q: torch.Tensor
    actions: torch.Tensor
    mask: torch.Tensor
    fields: dict[str, torch.Tensor] = field(default_factory=dict)


def align_steps(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    response_mask: torch.Tensor,
    per_token: Mapping[str, torch.Tensor] | None = None,
) -> Steps:
    """Put the student's logits, the actions and per-token fields on one [B, T] grid.

    Args:
        logits: [B, L, V] the student's logits over ``tokens``.
        tokens: int64 [B, L] prompt + response ids.
        response_mask: bool [B, L] True at response tokens; position 0 must be False (a
            response token needs a state before it).
        per_token: optional fields stored at each token's own position, [B, L, ...].

    Returns:
        ``Steps`` with q [B, L-1, V], actions/mask [B, L-1], fields [B, L-1, ...].

    >>> s = align_steps(torch.zeros(1, 3, 5), torch.tensor([[4, 2, 3]]),
    ...                 torch.tensor([[False, True, True]]))
    >>> s.actions.tolist(), s.mask.tolist(), tuple(s.q.shape)
    ([[2, 3]], [[True, True]], (1, 2, 5))
    """
    if logits.dim() != 3 or tokens.shape != logits.shape[:2]:
        raise ValueError(
            f"logits must be [B, L, V] over tokens [B, L], got logits {tuple(logits.shape)} "
            f"and tokens {tuple(tokens.shape)}"
        )
    if response_mask.shape != tokens.shape:
        raise ValueError(
            f"response_mask must match tokens, got {tuple(response_mask.shape)} and "
            f"{tuple(tokens.shape)}"
        )
    if tokens.shape[1] < 2:
        raise ValueError(
            f"sequences need at least 2 tokens (prompt + action), got L={tokens.shape[1]}"
        )
    if bool(response_mask[:, 0].any()):
        raise ValueError(
            "response_mask is True at position 0: every response token needs a prompt before "
            "it (the state it was chosen in); prepend at least one prompt token"
        )
    fields = {}
    for name, value in (per_token or {}).items():
        if value.shape[:2] != tokens.shape:
            raise ValueError(
                f"per-token field {name!r} must be [B, L, ...] = {tuple(tokens.shape)}, got "
                f"{tuple(value.shape)}"
            )
        fields[name] = shift_per_token(value)
    return Steps(
        q=logits[:, :-1],
        actions=shift_per_token(tokens).long(),
        mask=shift_per_token(response_mask).bool(),
        fields=fields,
    )


def restrict_support_mask(
    support_log_probs: torch.Tensor, support_mask: torch.Tensor, p: float
) -> torch.Tensor:
    """The support mask cut at nucleus mass p (supports stored in ranking order).

    Args:
        support_log_probs: [..., K] teacher log-probs in ranking order (-inf at padding).
        support_mask: bool [..., K] the stored support (all False at non-response steps).
        p: nucleus mass in (0, 1]; must not exceed the mass the support was stored at (the
            caller checks against the cache's p_store).

    Returns:
        bool [..., K]: the first |A_p| entries of each stored support; rows that were empty
        stay empty.

    >>> restrict_support_mask(torch.tensor([0.6, 0.3, 0.1]).log(), torch.tensor([True] * 3), 0.7)
    tensor([ True,  True, False])
    """
    p = check_p(p)
    if support_log_probs.shape != support_mask.shape:
        raise ValueError(
            f"support_log_probs and support_mask must match, got {tuple(support_log_probs.shape)} "
            f"and {tuple(support_mask.shape)}"
        )
    if p == 1.0:
        return support_mask.bool()
    masked = support_log_probs.masked_fill(~support_mask.bool(), float("-inf"))
    size = nucleus_size(masked, p)
    ranks = torch.arange(support_mask.shape[-1], device=support_mask.device)
    return (ranks < size.unsqueeze(-1)) & support_mask.bool()


def action_in_support(
    actions: torch.Tensor, support_ids: torch.Tensor, support_mask: torch.Tensor
) -> torch.Tensor:
    """bool [...]: whether each action [...] is one of the valid ids of its support [..., K].

    >>> action_in_support(torch.tensor([3, 5]), torch.tensor([[3, 4], [4, 0]]),
    ...                   torch.tensor([[True, True], [True, False]]))
    tensor([ True, False])
    """
    if support_ids.shape != support_mask.shape or support_ids.shape[:-1] != actions.shape:
        raise ValueError(
            f"actions [...], support_ids and support_mask [..., K] must agree, got "
            f"{tuple(actions.shape)}, {tuple(support_ids.shape)}, {tuple(support_mask.shape)}"
        )
    return ((support_ids == actions.unsqueeze(-1)) & support_mask.bool()).any(-1)
