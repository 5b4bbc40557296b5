"""Data parallel: 2 CPU processes (gloo) end with the same parameters as 1 process."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from test_trainer import make_batches, make_trainer

from agents.distributed import DistInfo, all_reduce_mean, init_from_env, shard_batch

STEPS = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, out_dir: str, grad_accum: int) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
    )
    info = init_from_env("gloo")
    try:
        assert info == DistInfo(rank=rank, world_size=world_size, local_rank=rank)
        # rank 1 starts from other weights: the trainer broadcasts rank 0's at the start
        trainer, student = make_trainer(
            out_dir,
            make_batches(2, batch_size=4, ragged=False),
            student_seed=rank,
            max_steps=STEPS,
            grad_accum=grad_accum,
        )
        trainer.dist = info
        trainer.train()
        torch.save(student.state_dict(), os.path.join(out_dir, f"params_rank{rank}.pt"))
        assert all_reduce_mean({"x": float(rank)}) == {"x": 0.5}
    finally:
        dist.destroy_process_group()


def test_two_processes_match_one_process_on_the_same_global_batch(tmp_path):
    """Global batch 4 = 2 processes x 2 rows, with 2 accumulated micro-batches per step."""
    grad_accum = 2
    single, student = make_trainer(
        tmp_path / "single",
        make_batches(2, batch_size=4, ragged=False),
        max_steps=STEPS,
        grad_accum=grad_accum,
    )
    single.train()
    out = tmp_path / "ddp"
    out.mkdir()
    mp.start_processes(
        _worker, args=(2, _free_port(), str(out), grad_accum), nprocs=2, start_method="spawn"
    )
    ranks = [torch.load(out / f"params_rank{r}.pt") for r in range(2)]
    for name, value in student.state_dict().items():
        torch.testing.assert_close(ranks[0][name], value, rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(ranks[1][name], ranks[0][name], rtol=0, atol=0, msg=name)
    assert (out / "student" / "config.json").is_file()  # rank 0 exported
    assert (out / "ckpt" / "latest.json").is_file()


def test_single_process_env_is_a_no_op(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    info = init_from_env()
    assert info == DistInfo() and info.is_main and not info.enabled
    assert all_reduce_mean({"a": 2.0}) == {"a": 2.0}


def test_shard_batch_splits_contiguously_and_rejects_uneven_batches():
    (batch,) = make_batches(1, batch_size=4)
    shards = [shard_batch(batch, DistInfo(rank=r, world_size=2)) for r in range(2)]
    torch.testing.assert_close(
        torch.cat([s["tokens"] for s in shards]), batch["tokens"], rtol=0, atol=0
    )
    with pytest.raises(ValueError, match="not divisible by world_size=3"):
        shard_batch(batch, DistInfo(rank=0, world_size=3))
