"""The online trainer: env rollouts -> TorchRL ``Collector`` -> uniform replay -> the same losses.

Loop: the collector steps a batched top-p token env (e.g. ``envs.TopPTokenEnv``) with the
student's policy (e.g. ``envs.StudentPolicy``) for ``frames_per_batch`` frames; finished
episodes are converted to offline batch rows by ``to_batch`` (e.g. ``envs.episodes_to_batch``,
which adds "reward" [N, L]) and appended to a uniform replay buffer (TorchRL ``ReplayBuffer``
with ``ListStorage`` + ``RandomSampler``; prioritized replay needs torchrl's compiled extension,
which does not load with these torch builds). Every optimizer micro-batch samples
``batch_size`` episodes, padded to their own longest L and widest K (``collate_rows``); after
``updates_per_collect`` samples the collector runs again. Everything else (optimizer, schedule,
accumulation, clipping, target updates, logging, evaluation, checkpoints, export) is the
offline trainer's.

Under torchrun every process collects its own episodes (give each env its own seed) and the
gradients are averaged as offline; batches are not sharded.

``agents`` does not import ``envs`` (DESIGN.md): the env, the policy and ``to_batch`` are passed
in by the caller.

Resuming restores model, optimizer, scheduler, RNG states, step and the frame/episode counters;
the replay buffer and the env's in-flight episodes are not checkpointed (a resumed run refills
the buffer from fresh rollouts), so an online resume is not bit-exact, unlike the offline one.
An episode cut by the end of a collector batch is dropped by ``episodes_to_batch``; its tail,
collected next, is a row whose earlier response tokens count as prompt.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from tensordict import TensorDict, TensorDictBase

from agents.config import OnlineConfig, TrainConfig
from agents.trainer import Evaluator, OfflineTrainer, TrainResult

__all__ = ["OnlineTrainer", "collate_rows"]

log = logging.getLogger(__name__)

# key -> fill value for the padding of [L] / [L, K] fields (tokens uses the pad id)
_FILL: dict[str, float | bool | int] = {
    "attention_mask": False,
    "response_mask": False,
    "support_ids": 0,
    "support_log_probs": float("-inf"),
    "support_mask": False,
    "teacher_log_prob": 0.0,
    "covered_mass": 0.0,
    "reward": 0.0,
}


def collate_rows(rows: Sequence[TensorDictBase], *, pad_token_id: int = 0) -> TensorDict:
    """Stack offline-batch rows (batch []) of different L and K into one batch [B].

    Per-token fields [L] / [L, K] are right-padded to the largest L and K among ``rows``
    (tokens with ``pad_token_id``, masks with False, log-probs with -inf, others with 0);
    per-row fields (``terminated``) are stacked.
    """
    if not rows:
        raise ValueError("rows is empty; sample at least one episode")
    length = max(int(r["tokens"].shape[0]) for r in rows)
    width = max(int(r["support_ids"].shape[-1]) for r in rows)
    out: dict[str, torch.Tensor] = {}
    for key in rows[0].keys():
        values = [r[key] for r in rows]
        if values[0].dim() == 0:
            out[key] = torch.stack(values)
            continue
        fill = pad_token_id if key == "tokens" else _FILL.get(key, 0)
        shape = (len(rows), length) + ((width,) if values[0].dim() == 2 else ())
        stacked = torch.full(shape, fill, dtype=values[0].dtype)
        for i, value in enumerate(values):
            if value.dim() == 2:
                stacked[i, : value.shape[0], : value.shape[1]] = value
            else:
                stacked[i, : value.shape[0]] = value
        out[key] = stacked
    return TensorDict(out, batch_size=[len(rows)])


class OnlineTrainer(OfflineTrainer):
    """Trains ``student`` through ``loss_module`` on episodes its own policy collects.

    Args:
        loss_module, student, config, out_dir, evaluator, tokenizer, device: as
            ``OfflineTrainer``.
        env: a batched TorchRL env whose rollouts ``to_batch`` understands.
        policy: the collector's policy (a TensorDictModule around the student). When it has
            ``reset_cache()`` it is called before every collection, so KV caches never hold
            keys computed with stale weights.
        to_batch: rollout [B_env, T] -> offline batch [N] (``envs.episodes_to_batch``).
        online: ``OnlineConfig``.
        pad_token_id: padding id of the collated batches.
    """

    def __init__(
        self,
        loss_module: torch.nn.Module,
        student: torch.nn.Module,
        env: Any,
        policy: Any,
        *,
        to_batch: Callable[[TensorDictBase], TensorDictBase],
        config: TrainConfig,
        online: OnlineConfig,
        out_dir: str | os.PathLike,
        pad_token_id: int = 0,
        evaluator: Evaluator | None = None,
        tokenizer: Any = None,
        device: torch.device | str | None = None,
        dist_info: Any = None,
    ) -> None:
        super().__init__(
            loss_module,
            student,
            None,
            config=config,
            out_dir=out_dir,
            evaluator=evaluator,
            dist_info=dist_info,
            tokenizer=tokenizer,
            target_tau=online.target_update_tau,
            device=device,
        )
        from torchrl.data import ListStorage, RandomSampler, ReplayBuffer

        self.env, self.policy, self.to_batch, self.online = env, policy, to_batch, online
        self.buffer = ReplayBuffer(
            storage=ListStorage(online.replay_size),
            sampler=RandomSampler(),
            collate_fn=functools.partial(collate_rows, pad_token_id=pad_token_id),
            batch_size=online.batch_size,
        )
        self.frames = 0
        self.episodes = 0
        self._samples_since_collect = 0
        self._collector = None
        self._iterator = None

    # -- state -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["online"] = {"frames": self.frames, "episodes": self.episodes}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.frames = int(state["online"]["frames"])
        self.episodes = int(state["online"]["episodes"])

    # -- data --------------------------------------------------------------------------
    def collect(self) -> int:
        """Run the collector once; add the finished episodes to the buffer; return how many."""
        if self._collector is None:
            from torchrl.collectors import Collector

            self._collector = Collector(
                self.env,
                self.policy,
                frames_per_batch=self.online.frames_per_batch,
                total_frames=-1,
            )
            self._iterator = iter(self._collector)
        if hasattr(self.policy, "reset_cache"):
            self.policy.reset_cache()
        with torch.no_grad():
            rollout = next(self._iterator)
        self.frames += rollout.numel()
        done = rollout.get(("next", "done"))
        if not bool(done.any()):
            return 0
        rows = self.to_batch(rollout)
        self.buffer.extend(list(rows.unbind(0)))
        self.episodes += rows.batch_size[0]
        return rows.batch_size[0]

    def _next_batch(self) -> TensorDictBase:
        needed = max(self.online.batch_size, self.online.min_replay)
        attempts = 0
        while (
            len(self.buffer) < needed
            or self._samples_since_collect >= self.online.updates_per_collect
        ):
            self.collect()
            self._samples_since_collect = 0
            attempts += 1
            if attempts > 1000:
                raise RuntimeError(
                    "1000 collections finished no episode; raise frames_per_batch above "
                    "batch_size * max_new_tokens of the env"
                )
        self._samples_since_collect += 1
        batch = self.buffer.sample()
        return batch.to(self.device) if self.device is not None else batch

    def _data_metrics(self) -> dict[str, float]:
        return {
            "charts/frames": float(self.frames),
            "charts/episodes": float(self.episodes),
            "charts/replay_size": float(len(self.buffer)),
        }

    def train(self, **kwargs: Any) -> TrainResult:
        """As ``OfflineTrainer.train``; the collector is shut down at the end."""
        try:
            return super().train(**kwargs)
        finally:
            if self._collector is not None:
                self._collector.shutdown()
                self._collector = None
