"""`tdkd theory`: check Propositions 1-4 of PAPER.md section 3 on random tabular soft MDPs.

For each of N random soft MDPs (S states, A actions, discount gamma, nucleus mass p, all drawn
from the given ranges with one seeded generator) the teacher is the soft-optimal policy
pi* = softmax(Q*/alpha) of the full MDP and M_p keeps its nucleus A_p(s) at every state.
Measured per MDP (``tdkd.tabular`` does the maths):

    1. contraction factor / gamma of B^pi_p (pi = teacher and a random policy) and of T_p,
       observed on random pairs of Q's in ||.||_{inf,p}                       (<= 1)
    2. ||Q* - Q^{proj_p pi*}_p||_{inf,p} / kappa(p)                             (<= 1)
    3. max violation of Q^{proj_p pi*}_p <= Q*_p <= Q*, relative to max(1, ||Q*||_{inf,p}) (0)
    4. ||Q* - Q*_p||_{inf,p} / kappa(p)                                         (<= 1)

A proposition fails when a ratio exceeds 1 + tol or a relative sandwich violation exceeds tol.
Rewards are scaled (log-uniform over --reward-scale) so that most states have a nucleus
strictly smaller than their action set; the share is reported, since a check where every
nucleus is the full action set would be vacuous. Exit code 1 when any proposition fails.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch

PROPOSITIONS = ("1_contraction", "2_projected_teacher", "3_sandwich", "4_suboptimality")


@dataclass(frozen=True)
class TheoryConfig:
    """Ranges are inclusive [lo, hi]; sizes uniform integers, gamma and p uniform,
    reward scale log-uniform, transition sharpness uniform in [0, 3]."""

    mdps: int = 300
    states: tuple[int, int] = (2, 12)
    actions: tuple[int, int] = (2, 10)
    gamma: tuple[float, float] = (0.5, 0.99)
    p: tuple[float, float] = (0.3, 0.95)
    reward_scale: tuple[float, float] = (0.1, 3.0)
    alpha: float = 1.0
    seed: int = 0
    tol: float = 1e-6
    bands: int = 3
    pairs: int = 8
    chunk: int = 32

    def validate(self) -> None:
        def ordered(name: str, lo: float, hi: float, ok: bool, what: str) -> None:
            if not (ok and lo <= hi):
                raise ValueError(f"--{name} must be LO HI with {what} and LO <= HI, got {lo} {hi}")

        if self.mdps < 1:
            raise ValueError(f"--mdps must be >= 1, got {self.mdps}")
        ordered("states", *self.states, self.states[0] >= 1, "sizes >= 1")
        ordered("actions", *self.actions, self.actions[0] >= 1, "sizes >= 1")
        ordered(
            "gamma",
            *self.gamma,
            0.0 < self.gamma[0] and self.gamma[1] < 1.0,
            "0 < gamma < 1 (kappa = 0 at gamma = 0, so gap/kappa is undefined)",
        )
        ordered(
            "p",
            *self.p,
            0.0 < self.p[0] and self.p[1] < 1.0,
            "0 < p < 1 (kappa = 0 at p = 1, so gap/kappa is undefined)",
        )
        ordered("reward-scale", *self.reward_scale, self.reward_scale[0] > 0, "scales > 0")
        if not (self.alpha > 0 and math.isfinite(self.alpha)):
            raise ValueError(f"--alpha must be > 0, got {self.alpha}")
        if not self.tol >= 0:
            raise ValueError(f"--tol must be >= 0, got {self.tol}")
        if min(self.bands, self.pairs, self.chunk) < 1:
            raise ValueError(
                f"--bands, --pairs and --chunk must be >= 1, got {self.bands}, {self.pairs}, "
                f"{self.chunk}"
            )


def measure(config: TheoryConfig) -> dict[str, torch.Tensor]:
    """Draw the MDPs and measure the four propositions on each: a dict of [N] tensors."""
    from tdkd import tabular

    config.validate()
    gen = torch.Generator().manual_seed(config.seed)
    n = config.mdps

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=gen, dtype=torch.float64)

    states = torch.randint(config.states[0], config.states[1] + 1, (n,), generator=gen)
    actions = torch.randint(config.actions[0], config.actions[1] + 1, (n,), generator=gen)
    gamma = uniform(*config.gamma)
    p = uniform(*config.p)
    reward_scale = uniform(*map(math.log, config.reward_scale)).exp()
    sharpness = uniform(0.0, 3.0)
    mdps = [
        tabular.random_soft_mdp(
            int(states[i]),
            int(actions[i]),
            generator=gen,
            reward_scale=float(reward_scale[i]),
            transition_sharpness=float(sharpness[i]),
        )
        for i in range(n)
    ]
    # Solved in chunks of MDPs with similar gamma: value iteration runs until the chunk's
    # largest gamma has converged, so mixing gamma = 0.5 with 0.99 would waste sweeps.
    order = torch.argsort(gamma)
    parts = [
        _measure_chunk(
            [mdps[i] for i in chunk.tolist()], gamma[chunk], p[chunk], random_gen=gen, config=config
        )
        for chunk in torch.split(order, config.chunk)
    ]
    inverse = torch.argsort(order)
    measured = {key: torch.cat([part[key] for part in parts])[inverse] for key in parts[0]}
    return {"states": states, "actions": actions, "gamma": gamma, "p": p, **measured}


def _measure_chunk(
    mdps: list[tuple[torch.Tensor, torch.Tensor]],
    gamma: torch.Tensor,
    p: torch.Tensor,
    *,
    random_gen: torch.Generator,
    config: TheoryConfig,
) -> dict[str, torch.Tensor]:
    """The measurements of ``measure`` for one padded batch of MDPs ([n] tensors)."""
    from tdkd import tabular

    P, r, mask, state_mask = tabular.stack_mdps(mdps)
    sol = tabular.solve_top_p(P, r, gamma, p, mask, config.alpha)
    logits = 2.0 * torch.randn(r.shape, generator=random_gen, dtype=torch.float64)
    random_policy = torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1)
    operators = {
        "optimality": tabular.optimality_operator(P, r, gamma, sol.nucleus, config.alpha),
        "teacher": tabular.evaluation_operator(P, r, gamma, sol.teacher, sol.nucleus, config.alpha),
        "random": tabular.evaluation_operator(
            P, r, gamma, random_policy, sol.nucleus, config.alpha
        ),
    }
    factors = {
        name: tabular.contraction_factor(
            op, sol.nucleus, generator=random_gen, num_pairs=config.pairs, state_mask=state_mask
        )
        for name, op in operators.items()
    }
    _, ratio_teacher = tabular.projected_teacher_gap(sol)
    _, ratio_q_star_p = tabular.suboptimality_gap(sol)
    scale = tabular.topp_sup_norm(sol.q_star, sol.nucleus).clamp(min=1.0)
    nucleus_size = sol.nucleus.sum(-1)
    margin = torch.where(
        state_mask, sol.nucleus_mass - p[:, None], torch.ones_like(sol.nucleus_mass)
    )
    return {
        "strict_states": ((nucleus_size < mask.sum(-1)) & state_mask).sum(-1),
        "singleton_states": ((nucleus_size == 1) & state_mask).sum(-1),
        "contraction_evaluation": torch.maximum(factors["teacher"], factors["random"]) / gamma,
        "contraction_optimality": factors["optimality"] / gamma,
        "gap_kappa_q_star_p": ratio_q_star_p,
        "gap_kappa_teacher": ratio_teacher,
        "sandwich_violation": tabular.sandwich_violation(sol) / scale,
        "nucleus_mass_margin": margin.amin(-1),
    }


def violations(measurements: dict[str, torch.Tensor], tol: float) -> dict[str, torch.Tensor]:
    """bool [N] per proposition: True where the MDP breaks it by more than ``tol``.

    A ratio (contraction / gamma, gap / kappa) breaks its bound when > 1 + tol or NaN; the
    relative sandwich violation when > tol.
    """

    def above(x: torch.Tensor, bound: float) -> torch.Tensor:
        return ~(x <= bound)  # NaN counts as a failure

    return {
        "1_contraction": above(measurements["contraction_evaluation"], 1 + tol)
        | above(measurements["contraction_optimality"], 1 + tol),
        "2_projected_teacher": above(measurements["gap_kappa_teacher"], 1 + tol),
        "3_sandwich": above(measurements["sandwich_violation"], tol),
        "4_suboptimality": above(measurements["gap_kappa_q_star_p"], 1 + tol),
    }


def _band_index(x: torch.Tensor, lo: float, hi: float, bands: int) -> torch.Tensor:
    if hi <= lo:
        return torch.zeros_like(x, dtype=torch.int64)
    return ((x - lo) / (hi - lo) * bands).floor().long().clamp(0, bands - 1)


def _band_edges(lo: float, hi: float, bands: int) -> list[list[float]]:
    if hi <= lo:
        return [[lo, hi]] * bands
    step = (hi - lo) / bands
    return [[round(lo + i * step, 4), round(lo + (i + 1) * step, 4)] for i in range(bands)]


def _summary(
    m: dict[str, torch.Tensor], bad: dict[str, torch.Tensor], rows: torch.Tensor
) -> dict[str, float | int | None]:
    """Counts and worst values over the MDPs selected by the bool [N] ``rows``."""

    def worst(key: str) -> float | None:
        return float(m[key][rows].max()) if rows.any() else None

    real_states = int(m["states"][rows].sum())
    return {
        "mdps": int(rows.sum()),
        "states": real_states,
        "strict_subset_share": int(m["strict_states"][rows].sum()) / max(real_states, 1),
        "singleton_share": int(m["singleton_states"][rows].sum()) / max(real_states, 1),
        "worst_contraction_evaluation_over_gamma": worst("contraction_evaluation"),
        "worst_contraction_optimality_over_gamma": worst("contraction_optimality"),
        "worst_gap_over_kappa_q_star_p": worst("gap_kappa_q_star_p"),
        "worst_gap_over_kappa_teacher": worst("gap_kappa_teacher"),
        "worst_sandwich_violation": worst("sandwich_violation"),
        "sandwich_violations": int(bad["3_sandwich"][rows].sum()),
        "failures": int(torch.stack([b[rows] for b in bad.values()]).any(0).sum()),
    }


def summarise(measurements: dict[str, torch.Tensor], config: TheoryConfig) -> dict[str, object]:
    """The report: overall worst values, failures per proposition, one entry per (gamma, p) band."""
    bad = violations(measurements, config.tol)
    everything = torch.ones_like(measurements["gamma"], dtype=torch.bool)
    g_band = _band_index(measurements["gamma"], *config.gamma, config.bands)
    p_band = _band_index(measurements["p"], *config.p, config.bands)
    g_edges = _band_edges(*config.gamma, config.bands)
    p_edges = _band_edges(*config.p, config.bands)
    bands = [
        {
            "gamma": g_edges[i],
            "p": p_edges[j],
            **_summary(measurements, bad, (g_band == i) & (p_band == j)),
        }
        for i in range(config.bands)
        for j in range(config.bands)
    ]
    failures = {name: int(b.sum()) for name, b in bad.items()}
    return {
        "ok": not any(failures.values()),
        "failures": failures,
        "overall": {
            **_summary(measurements, bad, everything),
            "min_nucleus_mass_minus_p": float(measurements["nucleus_mass_margin"].min()),
        },
        "bands": bands,
        "config": asdict(config),
    }


def format_table(report: dict[str, object]) -> str:
    """A fixed-width table: one row per (gamma, p) band, then the total."""
    header = (
        f"{'gamma band':>13} {'p band':>13} {'MDPs':>5} {'states':>6} {'strict':>7} {'single':>7} "
        f"{'contr.eval/g':>12} {'contr.opt/g':>11} {'gap/k Q*_p':>10} {'gap/k teach':>11} "
        f"{'sandw.viol':>10}"
    )

    def row(g: str, p: str, s: dict) -> str:
        return (
            f"{g:>13} {p:>13} {s['mdps']:>5d} {s['states']:>6d} "
            f"{s['strict_subset_share']:>7.1%} {s['singleton_share']:>7.1%} "
            f"{s['worst_contraction_evaluation_over_gamma']:>12.6f} "
            f"{s['worst_contraction_optimality_over_gamma']:>11.6f} "
            f"{s['worst_gap_over_kappa_q_star_p']:>10.4f} {s['worst_gap_over_kappa_teacher']:>11.4f} "
            f"{s['sandwich_violations']:>10d}"
        )

    lines = [header, "-" * len(header)]
    for band in report["bands"]:
        if band["mdps"]:
            g0, g1 = band["gamma"]
            p0, p1 = band["p"]
            lines.append(row(f"[{g0:.3f},{g1:.3f}]", f"[{p0:.3f},{p1:.3f}]", band))
    lines.append("-" * len(header))
    lines.append(row("all", "all", report["overall"]))
    lines.append("")
    lines.append(
        "worst values over MDPs (bounds: contraction/gamma <= 1, gap/kappa <= 1, 0 sandwich "
        f"violations; tol {report['config']['tol']:g}); strict = share of states whose nucleus "
        "is smaller than their action set, single = share whose nucleus is one action"
    )
    for name, count in report["failures"].items():
        verdict = f"FAILS on {count} MDPs" if count else "holds"
        lines.append(f"  Proposition {name.replace('_', ' ', 1)}: {verdict}")
    lines.append("all four propositions hold" if report["ok"] else "SOME PROPOSITIONS FAIL")
    return "\n".join(lines)


@contextlib.contextmanager
def _intra_op_threads(threads: int) -> Iterator[None]:
    """torch's intra-op thread count for the duration of the command, restored afterwards.

    The solver's tensors are tiny ([chunk, S, A]); extra threads only add synchronisation,
    which on a busy machine made `tdkd theory` 10x slower (31 s vs 3 s for 300 MDPs).
    """
    if threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = TheoryConfig()
    parser.add_argument("--mdps", type=int, default=d.mdps, help="number of random MDPs")
    parser.add_argument("--states", type=int, nargs=2, default=d.states, metavar=("MIN", "MAX"))
    parser.add_argument("--actions", type=int, nargs=2, default=d.actions, metavar=("MIN", "MAX"))
    parser.add_argument("--gamma", type=float, nargs=2, default=d.gamma, metavar=("LO", "HI"))
    parser.add_argument(
        "--p",
        type=float,
        nargs=2,
        default=d.p,
        metavar=("LO", "HI"),
        help="nucleus mass range, inside (0, 1)",
    )
    parser.add_argument(
        "--reward-scale",
        type=float,
        nargs=2,
        default=d.reward_scale,
        metavar=("LO", "HI"),
        help="reward std, drawn log-uniformly",
    )
    parser.add_argument("--alpha", type=float, default=d.alpha, help="entropy temperature")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument(
        "--tol",
        type=float,
        default=d.tol,
        help="slack on every bound (relative) before a proposition counts as failed",
    )
    parser.add_argument(
        "--bands", type=int, default=d.bands, help="bands per gamma and per p range"
    )
    parser.add_argument(
        "--pairs",
        type=int,
        default=d.pairs,
        help="random Q pairs per MDP and operator for the contraction check",
    )
    parser.add_argument(
        "--chunk", type=int, default=d.chunk, help="MDPs solved together (sorted by gamma)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads while solving (restored afterwards); the tensors are tiny",
    )
    parser.add_argument(
        "--json", action="store_true", help="print one JSON line instead of a table"
    )


def run(args: argparse.Namespace) -> int:
    config = TheoryConfig(
        mdps=args.mdps,
        states=tuple(args.states),
        actions=tuple(args.actions),
        gamma=tuple(args.gamma),
        p=tuple(args.p),
        reward_scale=tuple(args.reward_scale),
        alpha=args.alpha,
        seed=args.seed,
        tol=args.tol,
        bands=args.bands,
        pairs=args.pairs,
        chunk=args.chunk,
    )
    start = time.perf_counter()
    with _intra_op_threads(args.threads):
        report = summarise(measure(config), config)
    report["seconds"] = round(time.perf_counter() - start, 3)
    if args.json:
        print(json.dumps(report))
    else:
        print(format_table(report))
        print(f"{config.mdps} MDPs in {report['seconds']:.2f} s")
    sys.stdout.flush()
    return 0 if report["ok"] else 1
