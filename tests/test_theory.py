"""Tests of `tdkd theory`: the CLI, its JSON report and its failure detection."""

from __future__ import annotations

import json

import pytest
import torch

from tdkd import theory
from tdkd.cli import main

SMALL = ["--mdps", "12", "--states", "2", "5", "--actions", "2", "4"]
BAND_KEYS = {
    "mdps",
    "states",
    "strict_subset_share",
    "singleton_share",
    "worst_contraction_evaluation_over_gamma",
    "worst_contraction_optimality_over_gamma",
    "worst_gap_over_kappa_q_star_p",
    "worst_gap_over_kappa_teacher",
    "worst_sandwich_violation",
    "sandwich_violations",
    "failures",
}


def run_json(capsys, *extra: str) -> tuple[int, dict]:
    code = main(["theory", *SMALL, "--json", *extra])
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1  # one JSON line
    return code, json.loads(out[0])


def test_json_report(capsys):
    code, report = run_json(capsys)
    assert code == 0
    assert set(report) == {"ok", "failures", "overall", "bands", "config", "seconds"}
    assert report["ok"] is True
    assert report["failures"] == dict.fromkeys(theory.PROPOSITIONS, 0)
    overall = report["overall"]
    assert BAND_KEYS | {"min_nucleus_mass_minus_p"} == set(overall)
    assert overall["mdps"] == 12 and overall["failures"] == 0
    assert 0.0 < overall["strict_subset_share"] <= 1.0
    assert 0.0 < overall["worst_gap_over_kappa_teacher"] <= 1.0 + 1e-6
    assert (
        overall["worst_gap_over_kappa_q_star_p"] <= overall["worst_gap_over_kappa_teacher"] + 1e-9
    )
    assert overall["min_nucleus_mass_minus_p"] >= -1e-6
    assert len(report["bands"]) == 9
    assert sum(band["mdps"] for band in report["bands"]) == 12
    assert all(set(band) == BAND_KEYS | {"gamma", "p"} for band in report["bands"])
    assert report["config"]["mdps"] == 12 and report["config"]["states"] == [2, 5]


def test_same_seed_same_report(capsys):
    _, first = run_json(capsys, "--seed", "3")
    _, second = run_json(capsys, "--seed", "3")
    _, other = run_json(capsys, "--seed", "4")
    first.pop("seconds"), second.pop("seconds"), other.pop("seconds")
    assert first == second
    assert first["overall"] != other["overall"]


def test_table_output(capsys):
    code = main(["theory", *SMALL, "--bands", "2"])
    out = capsys.readouterr().out
    assert code == 0
    assert "gap/k Q*_p" in out and "all four propositions hold" in out
    assert "Proposition 2 projected_teacher: holds" in out
    assert "12 MDPs in" in out


def test_threads_are_restored(capsys):
    before = torch.get_num_threads()
    main(["theory", "--mdps", "2", "--json", "--threads", "1"])
    capsys.readouterr()
    assert torch.get_num_threads() == before


@pytest.fixture(scope="module")
def measured():
    config = theory.TheoryConfig(mdps=10, states=(2, 4), actions=(2, 4))
    with theory._intra_op_threads(1):  # as the command does; tiny tensors
        return config, theory.measure(config)


def test_violations_flag_fabricated_measurements(measured):
    config, m = measured
    assert not any(bad.any() for bad in theory.violations(m, config.tol).values())
    cases = {
        "contraction_evaluation": (1.01, "1_contraction"),
        "contraction_optimality": (float("nan"), "1_contraction"),
        "gap_kappa_teacher": (1.01, "2_projected_teacher"),
        "sandwich_violation": (1e-3, "3_sandwich"),
        "gap_kappa_q_star_p": (1 + 1e-5, "4_suboptimality"),
    }
    for key, (value, proposition) in cases.items():
        fabricated = {k: v.clone() for k, v in m.items()}
        fabricated[key][3] = value
        bad = theory.violations(fabricated, config.tol)
        assert bad[proposition].tolist() == [i == 3 for i in range(10)], key
        assert not any(b.any() for name, b in bad.items() if name != proposition), key
        report = theory.summarise(fabricated, config)
        assert report["ok"] is False and report["failures"][proposition] == 1
        assert report["overall"]["failures"] == 1
    # Within tolerance is not a failure.
    fabricated = {k: v.clone() for k, v in m.items()}
    fabricated["gap_kappa_teacher"][0] = 1 + config.tol / 2
    assert not theory.violations(fabricated, config.tol)["2_projected_teacher"].any()


def test_failure_gives_nonzero_exit_code(measured, monkeypatch, capsys):
    _, m = measured
    fabricated = {k: v.clone() for k, v in m.items()}
    fabricated["gap_kappa_q_star_p"][0] = 1.5
    monkeypatch.setattr(theory, "measure", lambda config: fabricated)
    assert main(["theory", "--mdps", "10", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["failures"]["4_suboptimality"] == 1
    assert main(["theory", "--mdps", "10"]) == 1
    assert "SOME PROPOSITIONS FAIL" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--p", "0.5", "1.0"], "--p must be LO HI"),
        (["--p", "0.9", "0.5"], "--p must be LO HI"),
        (["--gamma", "0.0", "0.9"], "--gamma must be LO HI"),
        (["--gamma", "0.5", "1.0"], "--gamma must be LO HI"),
        (["--states", "0", "3"], "--states must be LO HI"),
        (["--mdps", "0"], "--mdps must be >= 1"),
        (["--alpha", "-1"], "--alpha must be > 0"),
        (["--tol", "-1"], "--tol must be >= 0"),
        (["--threads", "0"], "--threads must be >= 1"),
    ],
)
def test_bad_arguments(args, message, capsys):
    assert main(["theory", *args]) == 2
    assert message in capsys.readouterr().err
