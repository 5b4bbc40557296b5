"""Top-p soft-Q, discrete SAC and Implicit Q: contracts, and equality with TorchRL's stock losses.

Equivalence setting: p = 1 (the nucleus is the whole vocabulary of a tiny LM), the same
networks, and the sequence batch flattened into TorchRL transitions (``flatten_transitions``:
observation = (tokens, position), the network's output at that position). TorchRL's losses see
one transition per trained step, ours the sequences; both use squared error, TD(0) and the
same discount, so losses and every gradient must agree to float32 round-off.
"""

from __future__ import annotations

import pytest
import torch
from losses_contract import (
    LossContract,
    PositionLogits,
    flatten_transitions,
    make_offline_batch,
    tiny_student,
)
from tensordict import TensorDict
from tensordict.nn import TensorDictModule
from torchrl.data import Categorical
from torchrl.modules import ProbabilisticActor, QValueActor, ValueOperator
from torchrl.objectives import DiscreteIQLLoss, DiscreteSACLoss, DQNLoss, SoftUpdate

from agents.losses import TopPDiscreteSACLoss, TopPImplicitQLoss, TopPSoftQLoss
from agents.losses._base import last_step

VOCAB = 32
GAMMA = 0.9
TOL = {"rtol": 1e-5, "atol": 1e-6}


class TestSoftQContract(LossContract):
    def make_loss(self, student, **kwargs):
        return TopPSoftQLoss(student, p=0.8, **kwargs)


class TestSoftQProjectedRewardContract(LossContract):
    def make_loss(self, student, **kwargs):
        return TopPSoftQLoss(student, reward="teacher_logp_projected", backup="hard", **kwargs)


def _own(name: str) -> bool:
    return name.startswith(("critic", "log_alpha", "value_params"))


class TestSACContract(LossContract):
    def make_loss(self, student, **kwargs):
        return TopPDiscreteSACLoss(student, p=0.8, **kwargs)

    def own_parameter_allowed(self, name):
        return _own(name)


class TestImplicitQContract(LossContract):
    def make_loss(self, student, **kwargs):
        return TopPImplicitQLoss(student, p=0.8, **kwargs)

    def test_one_step_lowers_the_loss(self):
        """The losses are coupled (the AWR weights and the Q target move with V), so each
        network's step must lower its own loss with the other networks held fixed."""
        student = tiny_student()
        loss = self.make_loss(student)
        td = self.make_batch()
        named = dict(loss.named_parameters())
        critics = [p for n, p in named.items() if n.startswith("critic")]
        value = [p for n, p in named.items() if n.startswith("value_params")]
        players = (
            (list(student.parameters()), ("loss_actor",)),
            (critics, ("loss_qvalue",)),
            (value, ("loss_value",)),
        )
        for params, keys in players:
            opt = torch.optim.Adam(params, lr=1e-3)
            before = loss(td)
            opt.zero_grad()
            sum(before[k] for k in keys).backward()
            opt.step()
            after = loss(td)
            assert sum(after[k] for k in keys) < sum(before[k] for k in keys).detach()

    def own_parameter_allowed(self, name):
        return _own(name)


def _trained_steps(td: TensorDict) -> torch.Tensor:
    mask = td["response_mask"][:, 1:]
    return mask & ~(last_step(mask) & ~td["terminated"].unsqueeze(-1))


def _perturb_(module: torch.nn.Module, scale: float = 0.05) -> None:
    gen = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for param in module.parameters():
            param.add_(scale * torch.randn(param.shape, generator=gen))


def _grads(params) -> list[torch.Tensor]:
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]


def _zero(params) -> None:
    for p in params:
        p.grad = None


def _batch() -> TensorDict:
    td = make_offline_batch(p_store=1.0, batch_size=4, max_new=5, seed=7)
    # p = 1: every token of the tiny vocabulary is in the support
    assert bool((td["support_mask"].sum(-1)[td["response_mask"]] == VOCAB).all())
    return td


def test_soft_q_hard_backup_equals_torchrl_dqn():
    """TopPSoftQLoss(backup="hard", p=1) == DQNLoss (l2, target network, TD(0)).

    DQN backs up max_a Q^-(s', a); our default soft backup alpha log sum exp(Q^-/alpha) is its
    alpha -> 0 limit, so the honest comparable configuration is backup="hard". The soft
    backup is checked against a loop reference in test_td.py and below against the bound
    0 <= V_soft - V_hard <= alpha log|A|.
    """
    td = _batch()
    student = tiny_student(seed=1)
    ours = TopPSoftQLoss(student, gamma=GAMMA, backup="hard", loss_function="l2")
    actor = QValueActor(
        PositionLogits(student),
        in_keys=["observation"],
        spec=Categorical(VOCAB),
        action_space="categorical",
    )
    dqn = DQNLoss(actor, action_space="categorical", loss_function="l2", delay_value=True)
    dqn.make_value_estimator(gamma=GAMMA)
    _perturb_(student)  # the online network moves away from both (equal) target copies
    flat = flatten_transitions(td, _trained_steps(td), td["teacher_log_prob"][:, 1:])

    params = list(student.parameters())
    loss_ours = ours(td)["loss_qvalue"]
    loss_ours.backward()
    grads_ours = _grads(params)
    _zero(params)
    loss_dqn = dqn(flat)["loss"]
    loss_dqn.backward()
    torch.testing.assert_close(loss_ours, loss_dqn, **TOL)
    for g_ours, g_dqn in zip(grads_ours, _grads(params), strict=True):
        torch.testing.assert_close(g_ours, g_dqn, rtol=1e-4, atol=1e-6)


def test_soft_backup_is_within_alpha_log_k_of_hard():
    td = _batch()
    student = tiny_student(seed=1)
    hard = TopPSoftQLoss(student, gamma=GAMMA, backup="hard")(td)["target_mean"]
    for alpha in (1.0, 0.1, 0.01):
        soft = TopPSoftQLoss(student, gamma=GAMMA, alpha=alpha)(td)["target_mean"]
        gap = soft - hard
        assert 0.0 <= gap <= GAMMA * alpha * torch.log(torch.tensor(float(VOCAB))) + 1e-6


def _load_stacked_(dst, modules) -> None:
    """Write the parameters of ``modules`` (one per critic) into TorchRL's stacked params."""
    stacked = torch.stack([TensorDict.from_module(m).detach() for m in modules])
    dst.data.update_(stacked.data)


def _actor(student):
    module = TensorDictModule(PositionLogits(student), in_keys=["observation"], out_keys=["logits"])
    return ProbabilisticActor(
        module,
        in_keys=["logits"],
        distribution_class=torch.distributions.Categorical,
        spec=Categorical(VOCAB),
    )


def _critic_wrappers(loss, out_key):
    return [
        ValueOperator(
            PositionLogits(getattr(loss, f"critic{i}")), in_keys=["observation"], out_keys=[out_key]
        )
        for i in range(loss.num_critics)
    ]


def _target_wrappers(loss, out_key):
    """Critic wrappers carrying our *target* parameters (deep copies)."""
    import copy

    wrappers = []
    for i in range(loss.num_critics):
        critic = copy.deepcopy(getattr(loss, f"critic{i}"))
        getattr(loss, f"target_critic{i}_params").to_module(critic)
        critic = copy.deepcopy(critic)
        wrappers.append(
            ValueOperator(PositionLogits(critic), in_keys=["observation"], out_keys=[out_key])
        )
    return wrappers


def _critic_grads(loss) -> list[torch.Tensor]:
    out = []
    for i in range(loss.num_critics):
        out += _grads(getattr(loss, f"critic{i}_params").values(True, True))
    return out


def _rl_critic_grads(params, n) -> list[torch.Tensor]:
    grads = _grads(params.values(True, True))
    return [g[i] for i in range(n) for g in grads]


def test_sac_equals_torchrl_discrete_sac():
    """TopPDiscreteSACLoss(p=1) == DiscreteSACLoss: losses, actor / critic / alpha gradients.

    Terminated rows only: our actor and alpha losses also use the last step of a truncated
    response (only its critic target is missing), which a transition list cannot express.
    """
    td = _batch()
    td = td[td["terminated"]]
    assert td.shape[0] >= 2
    student = tiny_student(seed=1)
    ours = TopPDiscreteSACLoss(
        student, gamma=GAMMA, num_critics=2, alpha_init=0.7, loss_function="l2"
    )
    rl = DiscreteSACLoss(
        _actor(student),
        _critic_wrappers(ours, "action_value")[0],
        action_space="categorical",
        num_actions=VOCAB,
        num_qvalue_nets=2,
        alpha_init=0.7,
        loss_function="l2",
    )
    rl.make_value_estimator(gamma=GAMMA)
    targets = _target_wrappers(ours, "action_value")
    for i in range(2):  # online critics move away from their targets
        _perturb_(getattr(ours, f"critic{i}"), 0.05 * (i + 1))
    _load_stacked_(rl.qvalue_network_params, _critic_wrappers(ours, "action_value"))
    _load_stacked_(rl.target_qvalue_network_params, targets)
    flat = flatten_transitions(td, _trained_steps(td), td["teacher_log_prob"][:, 1:])
    # every response step is an actor / alpha step; the critic is trained on _trained_steps.

    student_params = list(student.parameters())
    out = ours(td)
    (out["loss_actor"] + out["loss_qvalue"] + out["loss_alpha"]).backward()
    g_student, g_critics, g_alpha = (
        _grads(student_params),
        _critic_grads(ours),
        ours.log_alpha.grad.clone(),
    )
    _zero(student_params)
    rl_out = rl(flat)
    (rl_out["loss_actor"] + rl_out["loss_qvalue"] + rl_out["loss_alpha"]).backward()
    for key in ("loss_actor", "loss_qvalue", "loss_alpha", "alpha", "entropy"):
        torch.testing.assert_close(out[key], rl_out[key], **TOL, msg=key)
    for a, b in zip(g_student, _grads(student_params), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    for a, b in zip(g_critics, _rl_critic_grads(rl.qvalue_network_params, 2), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(g_alpha, rl.log_alpha.grad, **TOL)


def test_implicit_q_equals_torchrl_discrete_iql():
    """TopPImplicitQLoss(p=1) == DiscreteIQLLoss: losses and actor / critic / value gradients."""
    td = _batch()
    student = tiny_student(seed=1)
    ours = TopPImplicitQLoss(student, gamma=GAMMA, num_critics=2, expectile=0.7, temperature=3.0)
    value = ValueOperator(
        PositionLogits(ours.value, scalar=True), in_keys=["observation"], out_keys=["state_value"]
    )
    rl = DiscreteIQLLoss(
        _actor(student),
        _critic_wrappers(ours, "state_action_value")[0],
        value,
        action_space="categorical",
        num_qvalue_nets=2,
        loss_function="l2",
        temperature=3.0,
        expectile=0.7,
    )
    rl.make_value_estimator(gamma=GAMMA)
    targets = _target_wrappers(ours, "state_action_value")
    for i in range(2):
        _perturb_(getattr(ours, f"critic{i}"), 0.05 * (i + 1))
    _load_stacked_(rl.qvalue_network_params, _critic_wrappers(ours, "state_action_value"))
    _load_stacked_(rl.target_qvalue_network_params, targets)
    flat = flatten_transitions(td, _trained_steps(td), td["teacher_log_prob"][:, 1:])

    shared = list(student.parameters()) + list(ours.value.parameters())
    out = ours(td)
    (out["loss_actor"] + out["loss_qvalue"] + out["loss_value"]).backward()
    g_shared, g_critics = _grads(shared), _critic_grads(ours)
    _zero(shared)
    rl_out = rl(flat)
    (rl_out["loss_actor"] + rl_out["loss_qvalue"] + rl_out["loss_value"]).backward()
    for key in ("loss_actor", "loss_qvalue", "loss_value"):
        torch.testing.assert_close(out[key], rl_out[key], **TOL, msg=key)
    for a, b in zip(g_shared, _grads(shared), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    for a, b in zip(g_critics, _rl_critic_grads(rl.qvalue_network_params, 2), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_soft_update_moves_the_target_toward_the_student():
    student = tiny_student()
    loss = TopPSoftQLoss(student)
    updater = SoftUpdate(loss, tau=0.5)
    before = loss.target_student_params.clone()
    _perturb_(student)
    updater.step()
    for key, online in loss.student_params.items(True, True):
        torch.testing.assert_close(
            loss.target_student_params[key], 0.5 * before[key] + 0.5 * online.detach()
        )


@pytest.mark.parametrize("mode", ["teacher_logp", "teacher_logp_projected", "zero", "batch"])
def test_reward_modes(mode):
    from agents.losses.soft_q import step_rewards

    td = make_offline_batch(p_store=0.8)
    lp = td["teacher_log_prob"][:, 1:]
    sup_lp, sup = td["support_log_probs"][:, 1:], td["support_mask"][:, 1:]
    reward = torch.randn(lp.shape)
    r = step_rewards(
        mode, teacher_log_prob_t=lp, support_log_probs_t=sup_lp, support_t=sup, reward_t=reward
    )
    mass = (sup_lp.exp() * sup).sum(-1)
    expected = {
        "teacher_logp": lp,
        "teacher_logp_projected": torch.where(mass > 0, lp - mass.clamp(min=1e-30).log(), lp),
        "zero": torch.zeros_like(lp),
        "batch": reward,
    }[mode]
    torch.testing.assert_close(r, expected)
    td["reward"] = torch.randn(td["tokens"].shape)
    out = TopPSoftQLoss(tiny_student(), reward=mode)(td)
    assert torch.isfinite(out["loss_qvalue"])


def test_unknown_reward_mode():
    with pytest.raises(ValueError, match="reward must be one of"):
        TopPSoftQLoss(tiny_student(), reward="kl")
