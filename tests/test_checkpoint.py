"""Checkpoints: atomic writes, validation on read, pruning, RNG restore, exact resume."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from test_trainer import make_batches, make_trainer, read_metrics

from agents.checkpoint import CheckpointManager, capture_rng_state, restore_rng_state


def test_rng_state_round_trip():
    state = capture_rng_state()
    want = (torch.rand(3), random.random(), np.random.rand(2))  # noqa: NPY002
    torch.rand(5), random.random(), np.random.rand(7)  # noqa: NPY002
    restore_rng_state(state)
    got = (torch.rand(3), random.random(), np.random.rand(2))  # noqa: NPY002
    torch.testing.assert_close(got[0], want[0])
    assert got[1] == want[1]
    np.testing.assert_array_equal(got[2], want[2])


def test_save_load_round_trip_and_pointers(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2)
    assert manager.latest() is None and manager.best() is None
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        manager.load()
    for step in (1, 2, 3):
        manager.save(step, {"step": step, "w": torch.full((2,), float(step))}, best=step == 1)
    assert manager.steps() == [1, 2, 3]  # 2 and 3 are the last two, 1 is the best
    manager.save(4, {"step": 4, "w": torch.zeros(2)})
    assert manager.steps() == [1, 3, 4]
    assert manager.latest().name == "step_00000004" and manager.best().name == "step_00000001"
    torch.testing.assert_close(manager.load(manager.best())["w"], torch.ones(2))
    assert manager.load()["step"] == 4


def test_a_failed_write_leaves_the_previous_checkpoint_and_no_temp(tmp_path, monkeypatch):
    manager = CheckpointManager(tmp_path)
    manager.save(1, {"w": torch.ones(2)})
    real_save = torch.save

    def torn_save(obj, path, *args, **kwargs):
        with open(path, "wb") as handle:
            handle.write(b"half")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(KeyboardInterrupt):
        manager.save(2, {"w": torch.zeros(2)})
    monkeypatch.setattr(torch, "save", real_save)
    assert manager.steps() == [1]
    assert json.loads((tmp_path / "latest.json").read_text())["step"] == 1
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    torch.testing.assert_close(manager.load()["w"], torch.ones(2))


def test_leftover_temp_folder_is_ignored(tmp_path):
    manager = CheckpointManager(tmp_path)
    manager.save(1, {"w": torch.ones(2)})
    (tmp_path / ".tmp-step_00000002-abc").mkdir()
    (tmp_path / ".tmp-step_00000002-abc" / "state.pt").write_bytes(b"torn")
    assert manager.steps() == [1] and manager.latest().name == "step_00000001"


def test_corrupt_checkpoint_is_refused(tmp_path):
    manager = CheckpointManager(tmp_path)
    path = manager.save(1, {"w": torch.ones(2)})
    (path / "state.pt").write_bytes((path / "state.pt").read_bytes()[:-3] + b"xyz")
    with pytest.raises(ValueError, match="corrupt"):
        manager.load()
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["format_version"] = 999
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="format_version"):
        manager.load()


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_killed_run_resumes_to_the_same_next_loss(tmp_path, grad_accum):
    """An uninterrupted 7-step run vs one killed after step 5 (checkpoint at 4) and resumed.

    The stand-in loss draws random token weights from the global RNG and the data are
    reshuffled each epoch (3 batches, so epochs turn over mid-run): the resumed run only
    matches if model, optimizer, scheduler, RNG and data position were all restored.
    """
    batches = make_batches(3, batch_size=2)
    config = dict(
        max_steps=7, warmup_steps=2, grad_accum=grad_accum, checkpoint_every=2, keep_last=1
    )
    full_losses = {}
    full, full_student = make_trainer(
        tmp_path / "full", batches, loss_kwargs={"noise": True}, **config
    )
    full.train(on_step=lambda s, m: full_losses.__setitem__(s, m["losses/total"]))

    class Killed(Exception):
        pass

    def kill_after_5(step, metrics):
        if step == 5:
            raise Killed

    torch.manual_seed(1234)  # the process that resumes starts from another RNG state
    first, _ = make_trainer(tmp_path / "cut", batches, loss_kwargs={"noise": True}, **config)
    with pytest.raises(Killed):
        first.train(on_step=kill_after_5)
    assert first.checkpoints.steps() == [4]

    resumed_losses = {}
    torch.manual_seed(999)
    again, again_student = make_trainer(
        tmp_path / "cut", batches, student_seed=7, loss_kwargs={"noise": True}, **config
    )
    again.train(on_step=lambda s, m: resumed_losses.__setitem__(s, m["losses/total"]))
    assert sorted(resumed_losses) == [5, 6, 7]
    for step in (5, 6, 7):
        assert resumed_losses[step] == full_losses[step], step
    for a, b in zip(full_student.parameters(), again_student.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # the logs of the resumed run read like the uninterrupted one
    full_rows = [(s, n) for s, n, _ in read_metrics(tmp_path / "full")]
    cut_rows = [(s, n) for s, n, _ in read_metrics(tmp_path / "cut")]
    assert cut_rows == full_rows
