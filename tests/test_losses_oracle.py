"""End-to-end oracle: on a tabular token MDP, the loss modules reach tdkd.tabular's exact answers.

The toy MDP is the token setting in miniature: a prompt token, then up to H response tokens
from {EOS, w1, w2}; s' = s + a (deterministic), EOS absorbing, the last step must be EOS. The
"student" is a lookup table Q[prefix, token] behind an HF-like ``.logits`` interface, so the
loss modules run unchanged. The offline batch holds every path of the teacher's nucleus tree
(full coverage), with the teacher's exact nuclei and log-probs, as the cache would.

- soft-Q (reward from the batch = the MDP's reward r, and reward = log pi_T): fitted soft
  Q-iteration (hard target update, inner problem solved by L-BFGS) must reach Q*_p from
  ``tdkd.tabular.soft_value_iteration`` on the nucleus.
- BD without chi^2, trained on the teacher's occupancy (paths weighted by their probability
  under proj_p(pi_T)): its policy proj_p(softmax Q) must equal the projected teacher.
"""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest
import torch
from tensordict import TensorDict
from torchrl.objectives import HardUpdate

from agents.losses import BellmanDistillLoss, TopPSoftQLoss
from tdkd.tabular import soft_value_iteration, solve_top_p

PAD, EOS, PROMPT = 0, 1, 3
ACTIONS = (EOS, 2, 3)  # action index -> token id
VOCAB = 4
H = 4
GAMMA = 0.9
P_NUCLEUS = 0.7


class TabularLM(torch.nn.Module):
    """Q[prefix, token] for every token prefix, indexed by the prefix's base-VOCAB code."""

    def __init__(self, max_len: int) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(
            torch.zeros(VOCAB ** (max_len + 1), VOCAB, dtype=torch.float64)
        )

    def forward(self, input_ids, attention_mask=None):
        codes = torch.zeros_like(input_ids)
        running = torch.zeros_like(input_ids[:, 0])
        for i in range(input_ids.shape[1]):
            running = running * VOCAB + input_ids[:, i] + 1  # +1: distinct from shorter prefixes
            codes[:, i] = running
        return SimpleNamespace(logits=self.table[codes % self.table.shape[0]])


def _tree_mdp(seed: int = 0):
    """States = response prefixes without EOS of length < H, plus the absorbing end state."""
    prefixes = [p for n in range(H) for p in itertools.product(ACTIONS[1:], repeat=n)]
    index = {p: i for i, p in enumerate(prefixes)}
    end = len(prefixes)
    S, A = end + 1, len(ACTIONS)
    P = torch.zeros(S, A, S, dtype=torch.float64)
    mask = torch.zeros(S, A, dtype=torch.bool)
    gen = torch.Generator().manual_seed(seed)
    r = 0.3 * torch.randn(S, A, generator=gen, dtype=torch.float64)
    for p, s in index.items():
        for a, tok in enumerate(ACTIONS):
            if tok == EOS:
                P[s, a, end] = 1.0
                mask[s, a] = True
            elif len(p) + 1 < H:
                P[s, a, index[(*p, tok)]] = 1.0
                mask[s, a] = True
    P[~mask] = 0.0
    P[..., end] += (~mask).double()  # inadmissible pairs: any distribution (masked out)
    P[end, :, :] = 0.0
    P[end, :, end] = 1.0
    mask[end, 0] = True
    r[end] = 0.0
    return P, r.masked_fill(~mask, 0.0), mask, index, end


def _batch(index, nucleus, teacher, rewards):
    """Every nucleus path as one row: prompt + path (ending with EOS), supports, rewards."""
    paths = []

    def walk(prefix):
        s = index[prefix]
        for a, tok in enumerate(ACTIONS):
            if nucleus[s, a]:
                if tok == EOS:
                    paths.append((*prefix, tok))
                else:
                    walk((*prefix, tok))

    walk(())
    L, B = 1 + H, len(paths)
    tokens = torch.zeros(B, L, dtype=torch.long)
    response = torch.zeros(B, L, dtype=torch.bool)
    ids = torch.zeros(B, L, len(ACTIONS), dtype=torch.long)
    lp = torch.full((B, L, len(ACTIONS)), float("-inf"))
    sup = torch.zeros(B, L, len(ACTIONS), dtype=torch.bool)
    teacher_lp = torch.zeros(B, L)
    reward = torch.zeros(B, L)
    weight = torch.ones(B, dtype=torch.float64)
    for b, path in enumerate(paths):
        tokens[b, 0] = PROMPT
        for t, tok in enumerate(path):
            s = index[path[:t]]
            a = ACTIONS.index(tok)
            tokens[b, t + 1], response[b, t + 1] = tok, True
            order = sorted(
                range(len(ACTIONS)), key=lambda j, s=s: (-float(teacher[s, j]), ACTIONS[j])
            )
            kept = [j for j in order if nucleus[s, j]]
            for k, j in enumerate(kept):
                ids[b, t + 1, k], lp[b, t + 1, k], sup[b, t + 1, k] = (
                    ACTIONS[j],
                    teacher[s, j].log(),
                    True,
                )
            teacher_lp[b, t + 1] = teacher[s, a].log()
            reward[b, t + 1] = rewards[s, a]
            weight[b] *= teacher[s, a] / (teacher[s] * nucleus[s]).sum()  # proj_p(pi_T)
    td = TensorDict(
        {
            "tokens": tokens,
            "attention_mask": tokens != PAD,
            "response_mask": response,
            "support_ids": ids,
            "support_log_probs": lp,
            "support_mask": sup,
            "teacher_log_prob": teacher_lp,
            "covered_mass": torch.ones(B, L),
            "terminated": torch.ones(B, dtype=torch.bool),
            "reward": reward,
        },
        batch_size=[B],
    )
    return td, paths, weight


def _reachable(index, paths, end) -> torch.Tensor:
    """bool [S - 1]: states on some nucleus path (the only states the batch can teach)."""
    seen = torch.zeros(end, dtype=torch.bool)
    for path in paths:
        for t in range(len(path)):
            seen[index[path[:t]]] = True
    return seen


def _student_q(student, index):
    """The table's Q[s, a] for every non-end state of the tree."""
    out = torch.zeros(len(index), len(ACTIONS), dtype=torch.float64)
    for prefix, s in index.items():
        ids = torch.tensor([[PROMPT, *prefix]])
        out[s] = student(ids).logits[0, -1, list(ACTIONS)]
    return out


def _lbfgs(params, closure_loss, iters: int = 60) -> None:
    opt = torch.optim.LBFGS(
        params,
        lr=1.0,
        max_iter=iters,
        tolerance_grad=1e-12,
        tolerance_change=1e-14,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        loss = closure_loss()
        loss.backward()
        return loss

    opt.step(closure)


@pytest.fixture(scope="module")
def toy():
    P, r, mask, index, end = _tree_mdp()
    sol = solve_top_p(P, r, GAMMA, P_NUCLEUS, mask)
    assert bool((sol.nucleus.sum(-1)[:end] > 1).any()) and bool(
        (sol.nucleus.sum(-1)[:end] == 1).any()
    )
    return SimpleNamespace(P=P, r=r, mask=mask, index=index, end=end, sol=sol)


def _fit_soft_q(td, reward_mode):
    student = TabularLM(H)
    loss = TopPSoftQLoss(student, gamma=GAMMA, alpha=1.0, reward=reward_mode)
    loss.double()
    updater = HardUpdate(loss, value_network_update_interval=1)
    for _ in range(H + 2):  # the tree has depth H: H + 1 exact backups reach the fixed point
        updater.step()
        _lbfgs(list(loss.parameters()), lambda: loss(td)["loss_qvalue"])
    return student


@pytest.mark.parametrize("reward_mode", ["batch", "teacher_logp"])
def test_soft_q_reaches_the_exact_top_p_soft_optimum(toy, reward_mode):
    sol = toy.sol
    teacher = sol.teacher
    r = (
        toy.r
        if reward_mode == "batch"
        else teacher.clamp(min=1e-300).log().masked_fill(~toy.mask, 0.0)
    )
    r = r.clone()
    r[toy.end] = 0.0
    td, paths, _ = _batch(toy.index, sol.nucleus, teacher, r)
    student = _fit_soft_q(td, reward_mode)
    q_star_p = soft_value_iteration(toy.P, r, GAMMA, sol.nucleus)
    if reward_mode == "batch":
        torch.testing.assert_close(q_star_p, sol.q_star_p)
    q = _student_q(student, toy.index)
    nucleus = sol.nucleus[: toy.end] & _reachable(toy.index, paths, toy.end).unsqueeze(-1)
    err = (q - q_star_p[: toy.end]).abs()[nucleus].max().item()
    assert err < 1e-6, f"max |Q - Q*_p| over the nucleus = {err:.3g}"


def test_bellman_distill_without_chi2_recovers_the_projected_teacher(toy):
    sol = toy.sol
    td, paths, weight = _batch(toy.index, sol.nucleus, sol.teacher, toy.r)
    student = TabularLM(H)
    loss = BellmanDistillLoss(student, gamma=GAMMA, alpha_chi=None, q_min=None, reduction="none")
    loss.double()
    steps = td["response_mask"].sum(-1).double()

    def objective():  # the expectation over the teacher's occupancy, not a path average
        return (weight * steps * loss(td)["loss_bd"]).sum()

    _lbfgs(list(loss.parameters()), objective, iters=200)
    q = _student_q(student, toy.index)
    reach = _reachable(toy.index, paths, toy.end)
    nucleus = sol.nucleus[: toy.end][reach]
    q = q[reach]
    policy = torch.softmax(q.masked_fill(~nucleus, float("-inf")), -1)
    projected = sol.teacher[: toy.end][reach] * nucleus
    projected = projected / projected.sum(-1, keepdim=True)
    err = (policy - projected).abs().max().item()
    assert err < 1e-5, f"max |proj_p pi_Q - proj_p pi_T| = {err:.3g}"
