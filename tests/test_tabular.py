"""Tests of tdkd.tabular: exact soft MDP solvers and the paper's propositions (PAPER.md s.3)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from tdkd import tabular
from tdkd.tabular import (
    contraction_factor,
    evaluation_operator,
    kappa,
    optimality_operator,
    projected_teacher_gap,
    random_soft_mdp,
    sandwich_violation,
    soft_policy_evaluation,
    soft_value_iteration,
    solve_top_p,
    stack_mdps,
    suboptimality_gap,
    teacher_nucleus,
    topp_sup_norm,
)

F64 = torch.float64
NEG_INF = float("-inf")
LOG2, LOG3 = math.log(2.0), math.log(3.0)


@pytest.fixture(autouse=True, scope="module")
def _one_intra_op_thread():
    """Tiny tensors: on a busy 2-core machine torch's intra-op threads made this module 30x
    slower (27 s vs 0.8 s for the 120-MDP solve). Restored after the module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------- naive references


def naive_fixed_point(P, r, gamma, values, tol):
    """Iterate Q <- r + gamma P values(Q) from Q = 0, in loops over s, a, s', until no entry
    moves by tol; ``values`` maps Q (lists) to V(s) (a list). Returns Q as lists."""
    S, A = r.shape
    P, r = P.tolist(), r.tolist()
    q = [[0.0] * A for _ in range(S)]
    while True:
        v = values(q)
        new = [
            [r[s][a] + gamma * sum(P[s][a][t] * v[t] for t in range(S)) for a in range(A)]
            for s in range(S)
        ]
        change = max(abs(new[s][a] - q[s][a]) for s in range(S) for a in range(A))
        q = new
        if change < tol:
            return q


def naive_value_iteration(P, r, gamma, mask, alpha=1.0, tol=1e-13):
    """Soft value iteration in Python loops over s, a, s' (lists of floats)."""
    S, A = r.shape
    mask = mask.tolist()

    def values(q):
        v = []
        for s in range(S):
            total = sum(math.exp(q[s][a] / alpha) for a in range(A) if mask[s][a])
            v.append(alpha * math.log(total))
        return v

    q = naive_fixed_point(P, r, gamma, values, tol)
    return torch.tensor(
        [[q[s][a] if mask[s][a] else NEG_INF for a in range(A)] for s in range(S)], dtype=F64
    )


def naive_projection(policy, mask):
    """proj_p(pi)(a|s) = pi(a|s) 1[a in A_p(s)] / sum_{b in A_p(s)} pi(b|s), in loops."""
    S, A = policy.shape
    out = []
    for s in range(S):
        z = sum(float(policy[s, a]) for a in range(A) if mask[s, a])
        out.append([float(policy[s, a]) / z if mask[s, a] else 0.0 for a in range(A)])
    return out


def naive_policy_evaluation(P, r, gamma, policy, mask, alpha=1.0, tol=1e-13):
    """Iterate the top-p evaluation operator B^pi_p, in loops, until it stops moving."""
    S, A = r.shape
    pi = naive_projection(policy, mask)

    def values(q):
        return [
            sum(pi[t][b] * (q[t][b] - alpha * math.log(pi[t][b])) for b in range(A) if pi[t][b] > 0)
            for t in range(S)
        ]

    q = naive_fixed_point(P, r, gamma, values, tol)
    return torch.tensor(q, dtype=F64).masked_fill(~mask, NEG_INF)


def naive_nucleus(probs, p):
    """Sort + cumsum reference: ranking by descending prob, ties by id; keep while mass before < p."""
    keep = torch.zeros(probs.shape, dtype=torch.bool)
    for s in range(probs.shape[0]):
        order = sorted(range(probs.shape[1]), key=lambda a: (-float(probs[s, a]), a))
        before = 0.0
        for k, a in enumerate(order):
            if k == 0 or before < p:
                keep[s, a] = True
            before += float(probs[s, a])
    return keep


def random_mask(gen, S, A):
    mask = torch.rand(S, A, generator=gen) < 0.6
    mask[torch.arange(S), torch.randint(0, A, (S,), generator=gen)] = True
    return mask


def random_policy(gen, S, A, zeros=True):
    policy = torch.softmax(2 * torch.randn(S, A, generator=gen, dtype=F64), -1)
    if zeros:
        policy[:, 0] = 0.0  # an action the policy never takes (still allowed by some masks)
        policy = policy / policy.sum(-1, keepdim=True)
    return policy


# ----------------------------------------------------------------------------- hand fixtures


def to_state0_mdp():
    """2 states x 3 actions, every action leads to state 0; gamma = 1/2, alpha = 1.

    r(0, .) = [log 2, 0, 0], r(1, .) = [0, 0, log 2].
    """
    P = torch.zeros(2, 3, 2, dtype=F64)
    P[:, :, 0] = 1.0
    r = torch.tensor([[LOG2, 0.0, 0.0], [0.0, 0.0, LOG2]], dtype=F64)
    return P, r


def cycle_mdp():
    """2 states x 3 actions, every action at s leads to 1 - s; gamma = 1/2, alpha = 1.

    r(0, .) = [0, 0, 0], r(1, .) = [log 2, 0, 0].
    """
    P = torch.zeros(2, 3, 2, dtype=F64)
    P[0, :, 1] = 1.0
    P[1, :, 0] = 1.0
    r = torch.tensor([[0.0, 0.0, 0.0], [LOG2, 0.0, 0.0]], dtype=F64)
    return P, r


def test_value_iteration_hand_fixture_to_state0():
    P, r = to_state0_mdp()
    # V*(0) = log(e^{log 2} + e^0 + e^0) + V*(0)/2 = log 4 + V*(0)/2  =>  V*(0) = 2 log 4 = 4 log 2.
    # Q*(s, a) = r(s, a) + V*(0)/2 = r(s, a) + 2 log 2.
    expected = torch.tensor(
        [[3 * LOG2, 2 * LOG2, 2 * LOG2], [2 * LOG2, 2 * LOG2, 3 * LOG2]], dtype=F64
    )
    assert_close(soft_value_iteration(P, r, 0.5), expected, atol=1e-9, rtol=0)


def test_value_iteration_hand_fixture_masked():
    P, r = to_state0_mdp()
    mask = torch.tensor([[True, False, False], [True, True, True]])
    # Only action 0 at state 0: V(0) = log 2 + V(0)/2  =>  V(0) = 2 log 2; Q(s, a) = r(s, a) + log 2.
    expected = torch.tensor([[2 * LOG2, NEG_INF, NEG_INF], [LOG2, LOG2, 2 * LOG2]], dtype=F64)
    assert_close(soft_value_iteration(P, r, 0.5, mask), expected, atol=1e-9, rtol=0)


def test_value_iteration_hand_fixture_cycle():
    P, r = cycle_mdp()
    # V0 = log 3 + V1/2, V1 = log(2 + 1 + 1) + V0/2  =>  (3/4) V0 = log 3 + log 2  =>  V0 = (4/3) log 6,
    # V1 = log 4 + (2/3) log 6.  Q*(0, a) = V1/2 = log 2 + (1/3) log 6;  Q*(1, a) = r(1, a) + (2/3) log 6.
    log6 = math.log(6.0)
    q0 = LOG2 + log6 / 3
    expected = torch.tensor(
        [[q0, q0, q0], [LOG2 + 2 * log6 / 3, 2 * log6 / 3, 2 * log6 / 3]], dtype=F64
    )
    assert_close(soft_value_iteration(P, r, 0.5), expected, atol=1e-9, rtol=0)


def test_policy_evaluation_hand_fixture():
    P, r = to_state0_mdp()
    mask = torch.tensor([[True, True, False], [True, True, True]])
    uniform = torch.full((2, 3), 1.0 / 3.0, dtype=F64)
    # proj_p(uniform)(.|0) = [1/2, 1/2, 0]:  sum_a pi (r - log pi) = (log 2 + log 2)/2 + (0 + log 2)/2
    # = 1.5 log 2, so V(0) = 1.5 log 2 + V(0)/2 = 3 log 2 and Q(s, a) = r(s, a) + 1.5 log 2.
    expected = torch.tensor(
        [[2.5 * LOG2, 1.5 * LOG2, NEG_INF], [1.5 * LOG2, 1.5 * LOG2, 2.5 * LOG2]], dtype=F64
    )
    assert_close(soft_policy_evaluation(P, r, 0.5, uniform, mask), expected, atol=1e-12, rtol=0)


def test_top_p_hand_fixture():
    P, r = to_state0_mdp()
    sol = solve_top_p(P, r, 0.5, 0.6)
    # pi*(.|0) = [1/2, 1/4, 1/4]: mass before action 1 is 1/2 < 0.6, before action 2 is 3/4 -> {0, 1}.
    # pi*(.|1) = [1/4, 1/4, 1/2]: ranking 2, 0, 1 (tie by id) -> {2, 0}.
    assert sol.nucleus.tolist() == [[True, True, False], [True, False, True]]
    assert_close(sol.nucleus_mass, torch.tensor([0.75, 0.75], dtype=F64))
    # M_p: V_p(0) = log(2 + 1) + V_p(0)/2 = 2 log 3;  Q*_p(s, a) = r(s, a) + log 3 on the nucleus.
    expected = torch.tensor([[LOG2 + LOG3, LOG3, NEG_INF], [LOG3, NEG_INF, LOG2 + LOG3]], dtype=F64)
    assert_close(sol.q_star_p, expected, atol=1e-9, rtol=0)
    # proj_p pi*(.|0) = [2/3, 1/3]: sum pi (r - log pi) = (2/3) log 3 + (1/3) log 3 = log 3, the
    # same backup as Q*_p, so the projected teacher is optimal in M_p here.
    assert_close(sol.q_teacher_p, expected, atol=1e-9, rtol=0)
    # Q* - Q*_p = (r + 2 log 2) - (r + log 3) = log(4/3) on every supported pair. m = 3/4 everywhere,
    # so this is gamma/(1 - gamma) (-log m), the bound with m in place of p;  kappa = -log 0.6.
    gap4, ratio4 = suboptimality_gap(sol)
    gap2, ratio2 = projected_teacher_gap(sol)
    assert_close(gap4, torch.tensor(math.log(4 / 3), dtype=F64), atol=1e-9, rtol=0)
    assert_close(gap2, torch.tensor(math.log(4 / 3), dtype=F64), atol=1e-9, rtol=0)
    assert_close(
        ratio4, torch.tensor(math.log(4 / 3) / -math.log(0.6), dtype=F64), atol=1e-9, rtol=0
    )
    assert float(sandwich_violation(sol)) < 1e-9  # Q^proj = Q*_p: equal up to solver error


def test_kappa_formula():
    assert_close(kappa(0.5, 0.5), torch.tensor(LOG2, dtype=F64))
    assert_close(kappa(0.8, 0.9, alpha=2.0), torch.tensor(-2.0 * 9.0 * math.log(0.8), dtype=F64))
    assert float(kappa(1.0, 0.9)) == 0.0 and float(kappa(0.3, 0.0)) == 0.0
    p = torch.tensor([0.3, 0.6], dtype=F64)
    g = torch.tensor([0.5, 0.9], dtype=F64)
    assert_close(kappa(p, g), -g / (1 - g) * p.log())


# ----------------------------------------------------------------------------- vs naive solvers


@pytest.mark.parametrize("seed", range(12))
def test_value_iteration_matches_naive(seed):
    gen = torch.Generator().manual_seed(seed)
    S, A = 2 + seed % 3, 2 + seed % 2
    P, r = random_soft_mdp(S, A, generator=gen, reward_scale=2.0)
    mask = random_mask(gen, S, A) if seed % 2 else torch.ones(S, A, dtype=torch.bool)
    gamma, alpha = [0.3, 0.7, 0.9][seed % 3], [1.0, 0.5][seed % 2]
    got = soft_value_iteration(P, r, gamma, mask, alpha)
    assert_close(got, naive_value_iteration(P, r, gamma, mask, alpha), atol=1e-8, rtol=0)


@pytest.mark.parametrize("seed", range(12))
def test_policy_evaluation_matches_naive(seed):
    gen = torch.Generator().manual_seed(100 + seed)
    S, A = 2 + seed % 3, 3
    P, r = random_soft_mdp(S, A, generator=gen, reward_scale=2.0)
    mask = random_mask(gen, S, A)
    mask[:, 1] = True  # the policy has mass on action 1 everywhere
    policy = random_policy(gen, S, A, zeros=seed % 2 == 0)
    gamma, alpha = [0.3, 0.7, 0.9][seed % 3], [1.0, 2.0][seed % 2]
    got = soft_policy_evaluation(P, r, gamma, policy, mask, alpha)
    expected = naive_policy_evaluation(P, r, gamma, policy, mask, alpha)
    assert_close(got, expected, atol=1e-9, rtol=0)


def test_operators_match_naive_one_step():
    gen = torch.Generator().manual_seed(3)
    S, A, gamma, alpha = 3, 4, 0.8, 0.7
    P, r = random_soft_mdp(S, A, generator=gen)
    mask = random_mask(gen, S, A)
    mask[:, 0] = True
    policy = random_policy(gen, S, A, zeros=False)
    q = torch.randn(S, A, generator=gen, dtype=F64)
    pi = naive_projection(policy, mask)
    expected_t = torch.zeros(S, A, dtype=F64)
    expected_b = torch.zeros(S, A, dtype=F64)
    for s in range(S):
        for a in range(A):
            v_opt = v_pi = 0.0
            for t in range(S):
                lse = alpha * math.log(
                    sum(math.exp(q[t, b] / alpha) for b in range(A) if mask[t, b])
                )
                soft = sum(
                    pi[t][b] * (q[t, b] - alpha * math.log(pi[t][b]))
                    for b in range(A)
                    if mask[t, b]
                )
                v_opt += float(P[s, a, t]) * lse
                v_pi += float(P[s, a, t]) * float(soft)
            expected_t[s, a] = r[s, a] + gamma * v_opt
            expected_b[s, a] = r[s, a] + gamma * v_pi
    neg = torch.full_like(expected_t, NEG_INF)
    assert_close(
        optimality_operator(P, r, gamma, mask, alpha)(q), torch.where(mask, expected_t, neg)
    )
    assert_close(
        evaluation_operator(P, r, gamma, policy, mask, alpha)(q), torch.where(mask, expected_b, neg)
    )


def test_solutions_are_fixed_points_of_the_operators():
    gen = torch.Generator().manual_seed(4)
    P, r = random_soft_mdp(5, 4, generator=gen, reward_scale=3.0)
    mask = random_mask(gen, 5, 4)
    policy = random_policy(gen, 5, 4, zeros=False)
    q_opt = soft_value_iteration(P, r, 0.95, mask)
    q_pi = soft_policy_evaluation(P, r, 0.95, policy, mask)
    assert_close(optimality_operator(P, r, 0.95, mask)(q_opt), q_opt, atol=1e-8, rtol=0)
    assert_close(evaluation_operator(P, r, 0.95, policy, mask)(q_pi), q_pi, atol=1e-10, rtol=0)


def test_mask_none_equals_all_true_mask():
    gen = torch.Generator().manual_seed(5)
    P, r = random_soft_mdp(4, 3, generator=gen)
    policy = random_policy(gen, 4, 3)
    ones = torch.ones(4, 3, dtype=torch.bool)
    assert torch.equal(soft_value_iteration(P, r, 0.9), soft_value_iteration(P, r, 0.9, ones))
    assert torch.equal(
        soft_policy_evaluation(P, r, 0.9, policy), soft_policy_evaluation(P, r, 0.9, policy, ones)
    )
    q = torch.randn(4, 3, generator=gen, dtype=F64)
    assert torch.equal(optimality_operator(P, r, 0.9)(q), optimality_operator(P, r, 0.9, ones)(q))


def test_masked_pairs_are_minus_inf_and_others_finite():
    gen = torch.Generator().manual_seed(6)
    P, r = random_soft_mdp(5, 4, generator=gen)
    mask = random_mask(gen, 5, 4)
    mask[:, 2] = False
    mask[:, 1] = True
    policy = random_policy(gen, 5, 4)
    q = torch.randn(5, 4, generator=gen, dtype=F64)
    for out in (
        soft_value_iteration(P, r, 0.9, mask),
        soft_policy_evaluation(P, r, 0.9, policy, mask),
        optimality_operator(P, r, 0.9, mask)(q),
        evaluation_operator(P, r, 0.9, policy, mask)(q),
    ):
        assert out.dtype == F64
        assert torch.equal(out[~mask], torch.full_like(out[~mask], NEG_INF))
        assert torch.isfinite(out[mask]).all()


def test_batch_and_per_mdp_gamma_equal_single_solves():
    gen = torch.Generator().manual_seed(7)
    P, r = random_soft_mdp(4, 3, generator=gen, batch_shape=(3,))
    gamma = torch.tensor([0.2, 0.6, 0.9], dtype=F64)
    policy = torch.softmax(torch.randn(3, 4, 3, generator=gen, dtype=F64), -1)
    batched = soft_value_iteration(P, r, gamma)
    evaluated = soft_policy_evaluation(P, r, gamma, policy)
    for i in range(3):
        assert_close(
            batched[i], soft_value_iteration(P[i], r[i], float(gamma[i])), atol=1e-9, rtol=0
        )
        assert_close(evaluated[i], soft_policy_evaluation(P[i], r[i], float(gamma[i]), policy[i]))


def test_stack_mdps_keeps_every_value():
    gen = torch.Generator().manual_seed(8)
    mdps = [random_soft_mdp(s, a, generator=gen) for s, a in [(2, 3), (5, 2), (3, 4)]]
    P, r, mask, state_mask = stack_mdps(mdps)
    assert P.shape == (3, 5, 4, 5) and state_mask.sum(-1).tolist() == [2, 5, 3]
    gamma = torch.tensor([0.5, 0.8, 0.9], dtype=F64)
    batched = soft_value_iteration(P, r, gamma, mask)
    for i, (Pi, ri) in enumerate(mdps):
        s, a = ri.shape
        alone = soft_value_iteration(Pi, ri, float(gamma[i]))
        assert_close(batched[i, :s, :a], alone, atol=1e-9, rtol=0)
        assert torch.isneginf(batched[i, :s, a:]).all()


def test_p_one_gives_the_full_mdp():
    gen = torch.Generator().manual_seed(9)
    P, r = random_soft_mdp(4, 5, generator=gen, reward_scale=3.0)
    sol = solve_top_p(P, r, 0.9, 1.0)
    assert sol.nucleus.all()
    assert torch.equal(sol.q_star_p, sol.q_star)
    assert_close(sol.q_teacher_p, sol.q_star, atol=1e-8, rtol=0)
    gap, ratio = suboptimality_gap(sol)
    assert float(gap) == 0.0 and math.isnan(float(ratio))  # kappa(1) = 0: the ratio is undefined


def test_teacher_nucleus_matches_sort_cumsum_and_per_mdp_p():
    gen = torch.Generator().manual_seed(10)
    q = 3.0 * torch.randn(6, 5, 7, generator=gen, dtype=F64)
    q[0, 0, :3] = 1.5  # a three-way tie at the top
    q[1, :, 6] = NEG_INF  # an unavailable action
    p = torch.tensor([0.2, 0.5, 0.7, 0.9, 0.99, 1.0], dtype=F64)
    alpha = 0.7
    per_mdp = teacher_nucleus(q, p, alpha)
    for i in range(6):
        probs = torch.softmax(q[i] / alpha, -1)
        assert torch.equal(per_mdp[i], naive_nucleus(probs, float(p[i])))
        assert torch.equal(per_mdp[i], teacher_nucleus(q[i], float(p[i]), alpha))
    assert not per_mdp[1, :, 6].any()


def test_random_soft_mdp_is_seeded():
    a = random_soft_mdp(3, 4, generator=torch.Generator().manual_seed(1), batch_shape=(2,))
    b = random_soft_mdp(3, 4, generator=torch.Generator().manual_seed(1), batch_shape=(2,))
    c = random_soft_mdp(3, 4, generator=torch.Generator().manual_seed(2), batch_shape=(2,))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])
    assert a[0].shape == (2, 3, 4, 3) and (a[0] >= 0).all()


def test_topp_sup_norm_ignores_unsupported_pairs():
    q = torch.tensor([[[1.0, -7.0], [NEG_INF, -3.0]]], dtype=F64)
    mask = torch.tensor([[[True, False], [False, True]]])
    assert topp_sup_norm(q, mask).tolist() == [3.0]


# ----------------------------------------------------------------------------- propositions


@pytest.fixture(scope="module")
def random_batch():
    """120 random MDPs of mixed sizes, gammas and p's, padded into one batch and solved."""
    gen = torch.Generator().manual_seed(2024)
    n = 120
    sizes = torch.randint(2, 8, (n, 2), generator=gen)
    scales = torch.exp(
        torch.empty(n, dtype=F64).uniform_(math.log(0.1), math.log(3.0), generator=gen)
    )
    mdps = [
        random_soft_mdp(
            int(s), int(a), generator=gen, reward_scale=float(k), transition_sharpness=float(k)
        )
        for (s, a), k in zip(sizes, scales, strict=True)
    ]
    P, r, mask, state_mask = stack_mdps(mdps)
    gamma = torch.empty(n, dtype=F64).uniform_(0.3, 0.97, generator=gen)
    p = torch.empty(n, dtype=F64).uniform_(0.3, 0.95, generator=gen)
    sol = solve_top_p(P, r, gamma, p, mask)
    return gen, P, r, mask, state_mask, gamma, p, sol


def test_nucleus_is_nontrivial_and_has_mass_p(random_batch):
    _, _, _, mask, state_mask, _, p, sol = random_batch
    strict = (sol.nucleus.sum(-1) < mask.sum(-1)) & state_mask
    share = strict.sum() / state_mask.sum()
    assert 0.3 < float(share) < 1.0  # the propositions are not checked on the full MDP only
    assert (
        sol.nucleus_mass[state_mask] >= (p[:, None].expand_as(state_mask))[state_mask] - 1e-6
    ).all()


def test_proposition1_contraction(random_batch):
    gen, P, r, mask, state_mask, gamma, _, sol = random_batch
    policy = torch.softmax(
        (2 * torch.randn(r.shape, generator=gen, dtype=F64)).masked_fill(~mask, NEG_INF), -1
    )
    operators = [
        optimality_operator(P, r, gamma, sol.nucleus),
        evaluation_operator(P, r, gamma, sol.teacher, sol.nucleus),
        evaluation_operator(P, r, gamma, policy, sol.nucleus),
    ]
    for op in operators:
        factor = contraction_factor(op, sol.nucleus, generator=gen, state_mask=state_mask)
        assert (factor <= gamma * (1 + 1e-9)).all()
        assert float((factor / gamma).max()) > 0.9  # the pairs do probe close to the bound


def test_proposition1_is_tight_for_a_constant_shift(random_batch):
    # B(Q + c) = B(Q) + gamma c on supported pairs: the factor gamma is attained.
    _, P, r, _, _, gamma, _, sol = random_batch
    op = evaluation_operator(P, r, gamma, sol.teacher, sol.nucleus)
    q = torch.where(sol.nucleus, torch.zeros_like(r), torch.full_like(r, NEG_INF))
    diff = torch.where(sol.nucleus, op(q + 1.0) - op(q), torch.zeros_like(r))
    assert_close(topp_sup_norm(diff, sol.nucleus), gamma)


def test_proposition2_projected_teacher(random_batch):
    *_, sol = random_batch
    gap, ratio = projected_teacher_gap(sol)
    assert (ratio <= 1 + 1e-6).all()
    assert (gap >= 0).all() and float(ratio.max()) > 0.5  # the bound is nearly reached


def test_proposition3_sandwich(random_batch):
    *_, sol = random_batch
    scale = topp_sup_norm(sol.q_star, sol.nucleus).clamp(min=1.0)
    assert (sandwich_violation(sol) <= 1e-8 * scale).all()


def test_proposition4_suboptimality(random_batch):
    *_, sol = random_batch
    gap4, ratio4 = suboptimality_gap(sol)
    gap2, _ = projected_teacher_gap(sol)
    assert (ratio4 <= 1 + 1e-6).all()
    assert (gap4 <= gap2 + 1e-8).all()  # Q*_p is at least as good as the projected teacher
    assert (gap4 > 1e-3).sum() > 60


def test_sandwich_violation_detects_a_broken_order(random_batch):
    *_, sol = random_batch
    broken = tabular.TopPSolution(
        **{**sol.__dict__, "q_star_p": sol.q_star_p + 0.5 * sol.nucleus.to(F64)}
    )
    # Q*_p + 0.5 exceeds Q* wherever the gap is below 0.5.
    assert (sandwich_violation(broken) > 0).any()


# ----------------------------------------------------------------------------- bad input


def test_bad_inputs_raise_value_errors():
    P, r = to_state0_mdp()
    ok_policy = torch.full((2, 3), 1.0 / 3.0, dtype=F64)
    with pytest.raises(ValueError, match="P must be a distribution over s'.*sums to 1.5"):
        soft_value_iteration(P * 1.5, r, 0.5)
    with pytest.raises(ValueError, match="non-negative"):
        soft_value_iteration(P - 0.5, r, 0.5)
    with pytest.raises(ValueError, match=r"P must have shape \[..., S, A, S\]"):
        soft_value_iteration(torch.ones(2, 3, 4, dtype=F64) / 4, r, 0.5)
    with pytest.raises(ValueError, match=r"r must have shape .*\(2, 3\).*got r \(3, 2\)"):
        soft_value_iteration(P, r.T, 0.5)
    for gamma in (1.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="gamma must be in \\[0, 1\\), got gamma="):
            soft_value_iteration(P, r, gamma)
        with pytest.raises(ValueError, match="gamma"):
            soft_policy_evaluation(P, r, gamma, ok_policy)
    with pytest.raises(ValueError, match="gamma must be a float or a tensor"):
        soft_value_iteration(P, r, torch.tensor([0.5, 0.5]))
    empty_row = torch.tensor([[True, True, True], [False, False, False]])
    with pytest.raises(ValueError, match="mask has a state with no allowed action.*\\(1,\\)"):
        soft_value_iteration(P, r, 0.5, empty_row)
    with pytest.raises(ValueError, match="mask must be a bool tensor of shape"):
        soft_value_iteration(P, r, 0.5, torch.ones(3, 2, dtype=torch.bool))
    for p in (0.0, -0.2, 1.5):
        with pytest.raises(ValueError, match=f"p must be in \\(0, 1\\], got p={p}"):
            solve_top_p(P, r, 0.5, p)
        with pytest.raises(ValueError, match="p must be in"):
            kappa(p, 0.5)
    with pytest.raises(ValueError, match="p must be in"):
        teacher_nucleus(r, torch.tensor([1.2]))
    with pytest.raises(ValueError, match="policy must be a distribution"):
        soft_policy_evaluation(P, r, 0.5, ok_policy * 2)
    with pytest.raises(ValueError, match="policy puts no mass on the allowed actions"):
        soft_policy_evaluation(
            P,
            r,
            0.5,
            torch.tensor([[0.0, 0.0, 1.0]] * 2, dtype=F64),
            torch.tensor([[True, True, False]] * 2),
        )
    with pytest.raises(ValueError, match="policy must have shape"):
        soft_policy_evaluation(P, r, 0.5, ok_policy[:1])
    with pytest.raises(ValueError, match="alpha must be a finite number > 0, got alpha=0.0"):
        soft_value_iteration(P, r, 0.5, alpha=0.0)
    with pytest.raises(ValueError, match="tol must be > 0"):
        soft_value_iteration(P, r, 0.5, tol=0.0)
    with pytest.raises(ValueError, match="q must have shape"):
        optimality_operator(P, r, 0.5)(torch.zeros(3, 2, dtype=F64))
    with pytest.raises(ValueError, match="mdps must contain"):
        stack_mdps([])


def test_non_convergence_is_reported():
    P, r = to_state0_mdp()
    with pytest.raises(RuntimeError, match="did not reach tol"):
        soft_value_iteration(P, r, 0.99, max_iter=3)
