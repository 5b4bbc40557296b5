"""Finished env episodes -> the offline batch format of the shared contract (DESIGN.md).

A rollout (``env.rollout(..., break_when_any_done=False)`` or a ``Collector`` batch) has batch
[B, T]; with auto-resets one row holds several episodes back to back. Each episode that ends
inside the rollout (``("next", "done")``) becomes one batch row:

    tokens[n, i]               = the episode's prompt + response (right-padded with pad id)
    response_mask[n, i]        = True for i in [prompt_length, length)   (the actions)
    support_*[n, i, :]         = the nucleus observed at the state before token i
    teacher_log_prob[n, i]     = log pi_T(tokens[n, i] | state before i)
    covered_mass[n, i]         = teacher mass of the (possibly capped) support kept
    reward[n, i]               = the env's reward for that action
    terminated[n]              = the episode ended with EOS (else truncated by the budget)

An action at step t of an episode sits at token position i = observed ``length`` at step t.
K is cut to the batch's own largest support. Episodes still running at the end of the
rollout are dropped unless ``keep_incomplete=True`` (then they count as truncated).
"""

from __future__ import annotations

import torch
from tensordict import TensorDict, TensorDictBase

__all__ = ["episodes_to_batch"]

_ROOT_KEYS = ("length", "support_ids", "support_log_probs", "support_mask", "covered_mass")
_NEXT_KEYS = (
    "done",
    "terminated",
    "tokens",
    "length",
    "attention_mask",
    "teacher_log_prob",
    "reward",
)


def episodes_to_batch(
    rollout: TensorDictBase, *, pad_token_id: int = 0, keep_incomplete: bool = False
) -> TensorDict:
    """Convert a [B, T] (or [T]) ``TopPTokenEnv`` rollout into an offline batch [N].

    Args:
        rollout: tensordict with the env's root observation keys and ("next", ...) entries.
        pad_token_id: filler for ``tokens`` beyond each episode's length.
        keep_incomplete: also keep episodes not finished by the end of the rollout.

    Returns:
        TensorDict [N] with tokens int64 [N, L], attention_mask / response_mask bool [N, L],
        support_ids int64 / support_log_probs float32 / support_mask bool [N, L, K],
        teacher_log_prob / covered_mass / reward float32 [N, L], terminated bool [N];
        L = the longest episode, K = the largest support among its steps.
    """
    if rollout.batch_dims == 1:
        rollout = rollout.unsqueeze(0)
    if rollout.batch_dims != 2:
        raise ValueError(f"rollout must have batch [B, T] or [T], got {tuple(rollout.batch_size)}")
    missing = [k for k in _ROOT_KEYS if k not in rollout.keys()]
    missing += [("next", k) for k in _NEXT_KEYS if ("next", k) not in rollout.keys(True)]
    if missing:
        raise ValueError(
            f"rollout lacks {missing}; pass a TopPTokenEnv rollout (env.rollout or a Collector batch)"
        )
    batch, steps = rollout.batch_size
    done = rollout.get(("next", "done")).reshape(batch, steps)
    # Episode ids in row-major order: a new episode starts at t = 0 and after every done.
    starts = torch.ones_like(done)
    starts[:, 1:] = done[:, :-1]
    episode = torch.cumsum(starts.reshape(-1), 0) - 1  # [B*T]
    n_episodes = int(episode[-1]) + 1 if episode.numel() else 0
    flat_done = done.reshape(-1)
    finished = torch.zeros(n_episodes, dtype=torch.bool).index_put_(
        (episode,), flat_done, accumulate=True
    )
    kept = finished | keep_incomplete
    new_index = torch.cumsum(kept.long(), 0) - 1
    step_kept = kept[episode]
    if not bool(step_kept.any()):
        raise ValueError(
            "the rollout holds no finished episode; roll out longer (>= max_new_tokens steps) with "
            "break_when_any_done=False, or pass keep_incomplete=True"
        )
    flat = rollout.reshape(-1)
    row = new_index[episode][step_kept]  # [S] output row of each kept step
    pos = flat.get("length")[step_kept]  # [S] token position of each kept action
    # The last step of each kept episode carries its full token sequence.
    last = torch.zeros(n_episodes, dtype=torch.long).scatter_reduce(
        0, episode, torch.arange(episode.numel()), reduce="amax"
    )[kept]
    nxt = flat.get("next")
    width = int(nxt.get("length")[last].max())
    n = int(kept.sum())
    tokens = nxt.get("tokens")[last][:, :width].clone()
    attention = nxt.get("attention_mask")[last][:, :width].clone()
    tokens[~attention] = pad_token_id
    support_mask = flat.get("support_mask")[step_kept]
    k = max(int(support_mask.sum(-1).max()), 1)

    def scatter(values: torch.Tensor, fill) -> torch.Tensor:
        out = torch.full((n, width, *values.shape[1:]), fill, dtype=values.dtype)
        out[row, pos] = values
        return out

    response_mask = scatter(torch.ones(row.numel(), dtype=torch.bool), False)
    terminated = nxt.get("terminated")[last].reshape(n)
    return TensorDict(
        {
            "tokens": tokens,
            "attention_mask": attention,
            "response_mask": response_mask,
            "support_ids": scatter(flat.get("support_ids")[step_kept][:, :k], 0),
            "support_log_probs": scatter(
                flat.get("support_log_probs")[step_kept][:, :k].float(), float("-inf")
            ),
            "support_mask": scatter(support_mask[:, :k], False),
            "teacher_log_prob": scatter(nxt.get("teacher_log_prob")[step_kept].float(), 0.0),
            "covered_mass": scatter(flat.get("covered_mass")[step_kept].float(), 0.0),
            "reward": scatter(nxt.get("reward")[step_kept].reshape(-1).float(), 0.0),
            "terminated": terminated & finished[kept],
        },
        batch_size=[n],
    )
