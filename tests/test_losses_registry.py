"""agents.make: every registered algorithm builds around a student and trains on a batch."""

from __future__ import annotations

import pytest
import torch
from losses_contract import make_offline_batch, tiny_student, total_loss

import agents
from agents.registry import ALGORITHMS, loss_class

EXPECTED = {"bd", "sqn", "sac", "iql", "sft", "kd", "rkl", "jsd", "skl", "tvd", "seqkd"}


def test_every_algorithm_of_the_issue_is_registered():
    assert set(ALGORITHMS) == EXPECTED


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_make_builds_a_working_loss(name):
    student = tiny_student()
    loss = agents.make(name, student)
    out = loss(make_offline_batch())
    assert any(k.startswith("loss_") for k in out.keys())
    value = total_loss(out)
    assert torch.isfinite(value)
    value.backward()
    assert any(p.grad is not None for p in student.parameters())


def test_the_divergence_names():
    kinds = {n: ALGORITHMS[n][2].get("divergence") for n in ("kd", "rkl", "jsd", "skl", "tvd")}
    assert kinds == {
        "kd": "forward_kl",
        "rkl": "reverse_kl",
        "jsd": "jsd",
        "skl": "skew_kl",
        "tvd": "tvd",
    }
    assert loss_class("seqkd") is loss_class("sft")


def test_kwargs_reach_the_module():
    loss = agents.make("bd", tiny_student(), alpha_chi=None, gamma=0.5, expert_action="nucleus")
    assert loss.alpha_chi is None and loss.gamma == 0.5 and loss.expert_action == "nucleus"


def test_bad_names_and_arguments():
    with pytest.raises(ValueError, match=r"unknown algorithm 'dpo'.*'bd'"):
        agents.make("dpo", tiny_student())
    with pytest.raises(ValueError, match=r"unknown arguments \['alpha_chi'\]"):
        agents.make("kd", tiny_student(), alpha_chi=0.1)
    with pytest.raises(ValueError, match="fixes"):
        agents.make("kd", tiny_student(), divergence="tvd")


@pytest.mark.parametrize("name", ["bd", "sqn", "kd"])
def test_bf16_student_gives_fp32_td_maths(name):
    td = make_offline_batch()
    ref = total_loss(agents.make(name, tiny_student())(td))
    out = agents.make(name, tiny_student().to(torch.bfloat16))(td)
    value = total_loss(out)
    assert value.dtype == torch.float32
    torch.testing.assert_close(value, ref, rtol=0.05, atol=0.05)
