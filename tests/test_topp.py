"""tdkd.topp against brute-force references (a per-row Python loop over the ranking).

The reference ranks tokens by (-log_prob, id) with ``sorted`` and walks the ranking adding
probabilities one at a time: token k is in the nucleus iff the mass before it is < p. The
ranking key is the documented one: float32 ``log_softmax(logits.float())``; the mass is
accumulated in Python floats (float64), the same sequential order as the library's sums.
"""

from __future__ import annotations

import math

import pytest
import torch

from tdkd import topp
from tdkd.topp import (
    RaggedSupport,
    gather_support,
    nucleus_size,
    proj_p_log_probs,
    rank_log_probs,
    support_to_mask,
    top_p_mask,
    top_p_mask_and_support,
    top_p_support,
)

NEG_INF = float("-inf")


# ---------------------------------------------------------------- references


def ref_ranking(row: torch.Tensor) -> tuple[list[int], list[float], list[float]]:
    """(ids by (-log_prob, id), their float32 log-probs, their float64 probs) of one row."""
    log_probs = torch.log_softmax(row.float(), dim=-1)
    values = log_probs.tolist()
    probs = log_probs.double().exp().tolist()
    order = sorted(range(len(values)), key=lambda i: (-values[i], i))
    return order, [values[i] for i in order], [probs[i] for i in order]


def ref_nucleus(row: torch.Tensor, p: float) -> list[int]:
    """Token ids of A_p in ranking order: add tokens while the mass before them is < p."""
    order, values, probs = ref_ranking(row)
    kept: list[int] = []
    mass = 0.0
    for token, value, prob in zip(order, values, probs, strict=True):
        if value == NEG_INF:
            break
        if p < 1.0 and mass >= p:
            break
        kept.append(token)
        mass += prob
    return kept or order[:1]


def ref_mass(row: torch.Tensor, count: int) -> float:
    """Teacher mass of the first ``count`` ranked tokens (sequential float64 sum)."""
    mass = 0.0
    for prob in ref_ranking(row)[2][:count]:
        mass += prob
    return mass


def rows_of(logits: torch.Tensor) -> list[torch.Tensor]:
    return list(logits.reshape(-1, logits.shape[-1]))


def random_logits(*shape: int, scale: float = 3.0, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale


def zipf_logits(n: int, vocab: int, seed: int = 0) -> torch.Tensor:
    """Heavy-tailed rows like a language model's: log-prob ~ -a log(rank) + noise."""
    g = torch.Generator().manual_seed(seed)
    ranks = torch.stack([torch.randperm(vocab, generator=g) for _ in range(n)]).double()
    slope = 0.8 + torch.rand(n, 1, generator=g, dtype=torch.float64)
    noise = 0.3 * torch.randn(n, vocab, generator=g, dtype=torch.float64)
    return (-slope * torch.log1p(ranks) + noise).float()


P_VALUES = [1e-6, 0.1, 0.5, 0.8, 0.95, 0.999, 1.0]
DTYPES = [torch.float32, torch.float64, torch.bfloat16]


def assert_mask_matches_reference(logits: torch.Tensor, p: float) -> None:
    mask = top_p_mask(logits, p)
    assert mask.shape == logits.shape and mask.dtype == torch.bool
    for row, row_mask in zip(rows_of(logits), rows_of(mask), strict=True):
        expected = torch.zeros(row.shape[-1], dtype=torch.bool)
        expected[ref_nucleus(row, p)] = True
        assert torch.equal(row_mask, expected), (p, row_mask.nonzero(), expected.nonzero())


# ---------------------------------------------------------------- dense mask


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", P_VALUES)
def test_mask_matches_reference_over_batch_and_sequence(dtype: torch.dtype, p: float) -> None:
    logits = random_logits(3, 4, 37, scale=2.5, seed=1).to(dtype)
    logits[0, 1, ::3] = NEG_INF
    assert_mask_matches_reference(logits, p)


@pytest.mark.parametrize("p", [0.2, 0.3, 0.6, 0.9, 1.0])
def test_ties_are_broken_by_lower_token_id(p: float) -> None:
    # Few distinct values: large tie groups everywhere, including at the nucleus boundary.
    g = torch.Generator().manual_seed(2)
    logits = torch.randint(0, 3, (6, 40), generator=g).float()
    assert_mask_matches_reference(logits, p)
    equal = torch.zeros(1, 4)  # four tokens of mass 1/4 each
    assert top_p_mask(equal, 0.3).tolist() == [[True, True, False, False]]
    assert top_p_mask(equal, 0.6).tolist() == [[True, True, True, False]]
    assert top_p_support(equal, 0.6).ids.tolist() == [[0, 1, 2]]


def test_p_one_keeps_every_finite_logit_token() -> None:
    logits = torch.tensor([[0.0, -100.0, NEG_INF, -300.0, 5.0], [NEG_INF, 1.0, NEG_INF, 1.0, 0.0]])
    expected = torch.isfinite(logits)
    assert torch.equal(top_p_mask(logits, 1.0), expected)
    support = top_p_support(logits, 1.0)
    assert torch.equal(support.sizes, expected.sum(-1))
    assert torch.equal(support_to_mask(support.ids, support.mask, 5), expected)


def test_tiny_p_keeps_only_the_argmax() -> None:
    logits = random_logits(5, 7, 30, seed=3)
    logits[0, 0, :] = 1.0  # all tied: the argmax is token 0
    mask = top_p_mask(logits, 1e-9)
    assert torch.equal(mask.sum(-1), torch.ones(5, 7, dtype=torch.int64))
    first_max = torch.stack([torch.tensor(ref_ranking(row)[0][0]) for row in rows_of(logits)])
    assert torch.equal(mask.reshape(-1, 30).float().argmax(-1), first_max)


def test_one_dominant_token() -> None:
    logits = torch.zeros(2, 10)
    logits[0, 3] = 30.0
    logits[1, 7] = 30.0
    assert torch.equal(
        top_p_mask(logits, 0.99), torch.nn.functional.one_hot(torch.tensor([3, 7]), 10).bool()
    )
    support = top_p_support(logits, 0.99)
    assert support.ids.tolist() == [[3], [7]]
    torch.testing.assert_close(support.covered_mass, torch.ones(2), atol=1e-6, rtol=0)


@pytest.mark.parametrize("p", [0.3, 0.999, 1.0])
def test_neg_inf_logits_are_never_in_the_nucleus(p: float) -> None:
    logits = random_logits(4, 12, seed=4)
    logits[:, ::2] = NEG_INF
    logits[3, :] = NEG_INF
    logits[3, 5] = -50.0  # the only possible action
    mask = top_p_mask(logits, p)
    assert not mask[:, ::2].any()
    assert mask[3].nonzero().flatten().tolist() == [5]
    assert_mask_matches_reference(logits, p)


@pytest.mark.parametrize("p", [1e-6, 0.5, 1.0])
def test_single_action_rows(p: float) -> None:
    logits = random_logits(3, 2, 1, seed=5)
    assert top_p_mask(logits, p).all()
    support = top_p_support(logits, p)
    assert support.ids.shape == (3, 2, 1) and support.mask.all() and (support.ids == 0).all()
    torch.testing.assert_close(support.log_probs, torch.zeros(3, 2, 1))
    torch.testing.assert_close(support.covered_mass, torch.ones(3, 2))


def test_nucleus_is_the_smallest_top_set_with_mass_p() -> None:
    logits = random_logits(20, 25, seed=6)
    for p in (0.3, 0.7, 0.9):
        support = top_p_support(logits, p)
        probs = torch.softmax(logits.double(), -1)
        mass = (probs * support_to_mask(support.ids, support.mask, 25)).sum(-1)
        assert (mass >= p - 1e-6).all()
        # dropping the last kept token falls below p
        last = support.log_probs.gather(-1, (support.sizes - 1).unsqueeze(-1)).squeeze(-1)
        assert (mass - last.double().exp() < p + 1e-6).all()


def test_nucleus_size_and_rank_log_probs_against_reference() -> None:
    logits = random_logits(6, 30, seed=7)
    sorted_log_probs, sorted_ids = rank_log_probs(logits)
    for row, ids, values in zip(logits, sorted_ids, sorted_log_probs, strict=True):
        order, ref_values, _ = ref_ranking(row)
        assert ids.tolist() == order
        assert values.tolist() == ref_values
    for p in P_VALUES:
        expected = torch.tensor([len(ref_nucleus(row, p)) for row in logits])
        assert torch.equal(nucleus_size(sorted_log_probs, p), expected)
        # any prefix that contains the nucleus gives the same size
        width = int(expected.max())
        assert torch.equal(nucleus_size(sorted_log_probs[:, :width], p), expected)
    only_padding = torch.full((2, 3), NEG_INF)
    assert nucleus_size(only_padding, 0.5).tolist() == [1, 1]


# ------------------------------------------ the top-k shortcut is exact


@pytest.mark.parametrize(
    "make",
    [
        lambda: zipf_logits(24, 6000, seed=8),  # short nuclei: resolved inside a top-k
        lambda: random_logits(6, 6000, scale=1.0, seed=9),  # flat: full sort
        lambda: random_logits(12, 6000, scale=4.0, seed=10),  # medium: 512 / 4096
        lambda: torch.round(random_logits(12, 6000, scale=2.0, seed=11)),  # ties at the k-th
        lambda: zipf_logits(12, 6000, seed=12).to(torch.bfloat16),  # bf16 ties
    ],
)
@pytest.mark.parametrize("p", [0.5, 0.8, 0.95])
def test_top_k_shortcut_equals_the_full_sort(make, p: float) -> None:
    logits = make()
    sorted_log_probs, sorted_ids = rank_log_probs(logits)
    size = nucleus_size(sorted_log_probs, p)
    ranks = torch.arange(logits.shape[-1])
    dense = torch.zeros(logits.shape, dtype=torch.bool).scatter(
        -1, sorted_ids, ranks < size.unsqueeze(-1)
    )
    assert torch.equal(top_p_mask(logits, p), dense)
    support = top_p_support(logits, p)
    width = int(size.max())
    mask = ranks[:width] < size.unsqueeze(-1)
    assert torch.equal(support.mask, mask)
    assert torch.equal(support.ids, sorted_ids[:, :width].masked_fill(~mask, 0))
    assert torch.equal(support.log_probs, sorted_log_probs[:, :width].masked_fill(~mask, NEG_INF))
    expected_mass = torch.cumsum(sorted_log_probs.double().exp(), -1).gather(
        -1, (size - 1)[:, None]
    )
    assert torch.equal(support.covered_mass, expected_mass.squeeze(-1).float())


def test_top_k_shortcut_paths_are_all_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    """The exactness test above covers resolved-at-64, at 512, at 4096 and full-sort rows."""
    seen: list[tuple[int, int]] = []
    original = topp._prefix_rank

    def spy(log_probs, rows, k, p):
        result = original(log_probs, rows, k, p)
        seen.append((k, result[0].rows.numel()))
        return result

    monkeypatch.setattr(topp, "_prefix_rank", spy)
    top_p_mask(random_logits(12, 6000, scale=4.0, seed=10), 0.95)
    top_p_mask(zipf_logits(24, 6000, seed=8), 0.8)
    resolved = {k for k, count in seen if count}
    assert resolved == {64, 512, 4096}


# ---------------------------------------------------------------- padded support


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9, 1.0])
def test_support_matches_dense_mask_and_reference(dtype: torch.dtype, p: float) -> None:
    logits = random_logits(2, 3, 40, scale=2.0, seed=13).to(dtype)
    logits[1, 2, 10:] = NEG_INF
    support = top_p_support(logits, p)
    width = support.ids.shape[-1]
    assert support.ids.shape == support.log_probs.shape == support.mask.shape == (2, 3, width)
    assert support.ids.dtype == torch.int64 and support.log_probs.dtype == torch.float32
    assert torch.equal(support_to_mask(support.ids, support.mask, 40), top_p_mask(logits, p))
    assert width == int(support.sizes.max())  # padded to the batch's own largest nucleus
    rows = zip(
        rows_of(logits),
        rows_of(support.ids),
        rows_of(support.log_probs),
        rows_of(support.mask),
        support.covered_mass.reshape(-1),
        support.dropped_mass.reshape(-1),
        strict=True,
    )
    for row, ids, log_probs, mask, covered, dropped in rows:
        expected = ref_nucleus(row, p)
        n = len(expected)
        assert ids[:n].tolist() == expected and not mask[n:].any() and mask[:n].all()
        assert (ids[n:] == 0).all() and (log_probs[n:] == NEG_INF).all()
        _, ref_values, _ = ref_ranking(row)
        assert log_probs[:n].tolist() == ref_values[:n]
        torch.testing.assert_close(
            covered.double(), torch.tensor(ref_mass(row, n), dtype=torch.float64), rtol=0, atol=1e-6
        )
        assert dropped == 0.0


@pytest.mark.parametrize("cap", [1, 2, 5])
def test_max_support_caps_and_records_dropped_mass(cap: int) -> None:
    logits = random_logits(4, 6, 30, scale=1.5, seed=14)
    p = 0.9
    support = top_p_support(logits, p, max_support=cap)
    full = top_p_support(logits, p)
    kept = full.sizes.clamp(max=cap)
    assert support.ids.shape[-1] == int(kept.max())
    assert torch.equal(support.sizes, kept)
    width = support.ids.shape[-1]
    assert torch.equal(support.ids, full.ids[..., :width].masked_fill(~support.mask, 0))
    for row, covered, dropped, k in zip(
        rows_of(logits),
        support.covered_mass.reshape(-1),
        support.dropped_mass.reshape(-1),
        kept.reshape(-1),
        strict=True,
    ):
        n = len(ref_nucleus(row, p))
        torch.testing.assert_close(
            covered.double(),
            torch.tensor(ref_mass(row, int(k)), dtype=torch.float64),
            rtol=0,
            atol=1e-6,
        )
        expected_drop = ref_mass(row, n) - ref_mass(row, int(k))
        torch.testing.assert_close(
            dropped.double(), torch.tensor(expected_drop, dtype=torch.float64), rtol=0, atol=1e-6
        )
        if n <= cap:
            assert dropped == 0.0  # exactly, not a rounding residue
    torch.testing.assert_close(support.covered_mass + support.dropped_mass, full.covered_mass)


def _bf16_ties() -> torch.Tensor:
    logits = zipf_logits(4, 300, seed=33).to(torch.bfloat16)
    logits[1, 150:] = NEG_INF
    return logits


@pytest.mark.parametrize(
    "make",
    [
        lambda: zipf_logits(6, 6000, seed=32),  # resolved inside the top-k prefixes
        lambda: random_logits(3, 2, 300, scale=1.0, seed=34),  # flat: the full sort
        _bf16_ties,  # ties and -inf
    ],
)
@pytest.mark.parametrize("p", [1e-6, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("cap", [None, 2, 100])
def test_mask_and_support_equal_separate_calls_and_reference(make, p: float, cap) -> None:
    logits = make()
    mask, support = top_p_mask_and_support(logits, p, max_support=cap)
    assert torch.equal(mask, top_p_mask(logits, p))
    assert_support_equal(support, top_p_support(logits, p, max_support=cap))
    rows = zip(
        rows_of(logits),
        rows_of(mask),
        rows_of(support.ids),
        support.covered_mass.reshape(-1),
        support.dropped_mass.reshape(-1),
        strict=True,
    )
    for row, row_mask, ids, covered, dropped in rows:
        expected = ref_nucleus(row, p)
        n = len(expected)
        kept = n if cap is None else min(n, cap)
        # the dense mask holds the whole nucleus even where the support is capped
        assert row_mask.nonzero().squeeze(-1).tolist() == sorted(expected)
        assert ids[:kept].tolist() == expected[:kept]
        torch.testing.assert_close(
            covered.double() + dropped.double(),
            torch.tensor(ref_mass(row, n), dtype=torch.float64),
            rtol=0,
            atol=1e-6,
        )


def test_mask_and_support_rank_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    original = topp._rank_nuclei

    def spy(log_probs, p):
        calls.append(log_probs.shape[0])
        return original(log_probs, p)

    monkeypatch.setattr(topp, "_rank_nuclei", spy)
    top_p_mask_and_support(zipf_logits(6, 500, seed=35).reshape(2, 3, 500), 0.8, max_support=4)
    assert calls == [6]


def test_mask_and_support_reject_bad_input() -> None:
    with pytest.raises(ValueError, match=r"p must be in \(0, 1\], got p=0"):
        top_p_mask_and_support(random_logits(2, 5, seed=36), 0)
    with pytest.raises(ValueError, match="max_support must be an integer >= 1 or None"):
        top_p_mask_and_support(random_logits(2, 5, seed=36), 0.5, max_support=0)
    with pytest.raises(ValueError, match="logits contains NaN"):
        top_p_mask_and_support(torch.tensor([[0.0, float("nan")]]), 0.5)


def test_support_to_mask_round_trip() -> None:
    g = torch.Generator().manual_seed(15)
    dense = torch.rand(3, 5, 16, generator=g) < 0.3
    dense[..., 0] |= torch.rand(3, 5, generator=g) < 0.5  # token 0 vs id-0 padding
    width = int(dense.sum(-1).max())
    ids = torch.zeros(3, 5, width, dtype=torch.int64)
    mask = torch.zeros(3, 5, width, dtype=torch.bool)
    for index in range(15):
        i, j = divmod(index, 5)
        chosen = dense[i, j].nonzero().flatten().flip(0)
        ids[i, j, : chosen.numel()] = chosen
        mask[i, j, : chosen.numel()] = True
    assert torch.equal(support_to_mask(ids, mask, 16), dense)
    logits = random_logits(3, 5, 16, seed=16)
    support = top_p_support(logits, 0.7)
    assert torch.equal(support_to_mask(support.ids, support.mask, 16), top_p_mask(logits, 0.7))


# ---------------------------------------------------------------- ragged support


def assert_support_equal(a: topp.Support, b: topp.Support) -> None:
    for field in ("ids", "log_probs", "mask", "covered_mass", "dropped_mass"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field


def test_ragged_from_support_to_padded_round_trip() -> None:
    logits = random_logits(3, 4, 50, scale=2.0, seed=17)
    support = top_p_support(logits, 0.8)
    store = RaggedSupport.from_support(support, 0.8)
    assert len(store) == 12 and store.ids.dtype == torch.int32
    assert torch.equal(store.lengths, support.sizes.reshape(-1))
    padded = store.to_padded()
    flat = topp.Support(
        support.ids.reshape(12, -1),
        support.log_probs.reshape(12, -1),
        support.mask.reshape(12, -1),
        support.covered_mass.reshape(12),
        support.dropped_mass.reshape(12),
    )
    assert_support_equal(padded, flat)
    assert_support_equal(RaggedSupport.from_logits(logits, 0.8).to_padded(), flat)


@pytest.mark.parametrize("cap", [1, 3, 8])
def test_ragged_to_padded_with_cap_equals_fresh_capped_support(cap: int) -> None:
    logits = random_logits(10, 40, scale=1.5, seed=18)
    store = RaggedSupport.from_logits(logits, 0.9)
    assert_support_equal(store.to_padded(cap), top_p_support(logits, 0.9, max_support=cap))
    # a store capped once, padded with a smaller cap: dropped mass adds up
    capped = RaggedSupport.from_logits(logits, 0.9, max_support=cap + 2)
    twice = capped.to_padded(cap)
    fresh = top_p_support(logits, 0.9, max_support=cap)
    for field in ("ids", "log_probs", "mask", "covered_mass"):
        assert torch.equal(getattr(twice, field), getattr(fresh, field)), field
    torch.testing.assert_close(twice.dropped_mass, fresh.dropped_mass)


def test_ragged_select() -> None:
    logits = random_logits(8, 30, scale=2.0, seed=19)
    store = RaggedSupport.from_logits(logits, 0.9)
    padded = top_p_support(logits, 0.9)
    for index in (
        torch.tensor([5, 0, 5, 7]),
        slice(2, 6),
        [3, 1],
        4,
        torch.tensor([], dtype=torch.int64),
    ):
        rows = torch.arange(8)[index].reshape(-1)
        picked = store.select(index)
        assert len(picked) == rows.numel() and picked.p == store.p
        again = RaggedSupport.from_logits(logits[rows], 0.9)
        for field in ("offsets", "ids", "log_probs", "dropped_mass"):
            assert torch.equal(getattr(picked, field), getattr(again, field)), field
        if rows.numel():
            width = int(padded.sizes[rows].max())
            assert torch.equal(picked.to_padded().ids, padded.ids[rows, :width])


@pytest.mark.parametrize("p_store", [0.95, 1.0])
def test_ragged_restrict_equals_fresh_nucleus(p_store: float) -> None:
    logits = torch.cat(
        [random_logits(6, 2, 60, scale=2.5, seed=20).reshape(12, 60), zipf_logits(12, 60, seed=21)]
    )
    store = RaggedSupport.from_logits(logits, p_store)
    for p in (1e-6, 0.2, 0.5, 0.75, 0.9, 0.95):
        restricted = store.restrict(p)
        fresh = RaggedSupport.from_logits(logits, p)
        assert restricted.p == p
        for field in ("offsets", "ids", "log_probs", "dropped_mass"):
            assert torch.equal(getattr(restricted, field), getattr(fresh, field)), (p, field)
        assert_support_equal(restricted.to_padded(), top_p_support(logits, p))
    assert store.restrict(p_store) is store


@pytest.mark.parametrize("cap", [1, 3, 6])
def test_ragged_restrict_with_capped_store(cap: int) -> None:
    logits = random_logits(30, 40, scale=1.5, seed=22)
    store = RaggedSupport.from_logits(logits, 0.95, max_support=cap)
    assert (store.lengths <= cap).all()
    for p in (0.2, 0.5, 0.8, 0.95):
        restricted = store.restrict(p).to_padded()
        fresh = top_p_support(logits, p, max_support=cap)
        for field in ("ids", "log_probs", "mask", "covered_mass"):
            assert torch.equal(getattr(restricted, field), getattr(fresh, field)), (p, field)
        # Where the cap still bites at p the true dropped mass is unknowable from the store;
        # restrict reports the lower bound p - covered, within pi_last of the truth.
        last = restricted.log_probs.gather(-1, (restricted.sizes - 1)[:, None]).squeeze(-1).exp()
        capped = fresh.dropped_mass > 0
        assert torch.equal(restricted.dropped_mass[~capped], torch.zeros(int((~capped).sum())))
        low = restricted.dropped_mass[capped]
        assert (low <= fresh.dropped_mass[capped] + 1e-6).all()
        assert (fresh.dropped_mass[capped] < low + last[capped] + 1e-6).all()
        if p < 0.95:
            torch.testing.assert_close(low, (p - restricted.covered_mass[capped]).clamp(min=0))
        else:  # p = p_store: the store itself, whose dropped mass is exact
            assert torch.equal(restricted.dropped_mass, fresh.dropped_mass)
        assert (store.restrict(p).dropped_mass <= store.dropped_mass).all()


def test_ragged_rejects_bad_input() -> None:
    store = RaggedSupport.from_logits(random_logits(3, 10, seed=23), 0.8)
    with pytest.raises(ValueError, match=r"p=0\.9 is above .*p_store=0\.8"):
        store.restrict(0.9)
    with pytest.raises(ValueError, match="offsets must start at 0"):
        RaggedSupport(torch.tensor([1, 2]), store.ids[:1], store.log_probs[:1], 0.8, torch.zeros(1))
    with pytest.raises(ValueError, match="non-empty nucleus"):
        RaggedSupport(
            torch.tensor([0, 0, 1]), store.ids[:1], store.log_probs[:1], 0.8, torch.zeros(2)
        )
    with pytest.raises(ValueError, match=r"dropped_mass must have shape \(3,\)"):
        RaggedSupport(store.offsets, store.ids, store.log_probs, 0.8, torch.zeros(2))
    with pytest.raises(ValueError, match=r"p must be in \(0, 1\], got p=1.5"):
        RaggedSupport(store.offsets, store.ids, store.log_probs, 1.5, store.dropped_mass)
    with pytest.raises(ValueError, match="max_support must be an integer >= 1"):
        store.to_padded(0)


# ---------------------------------------------------------------- projection and gather


def test_proj_p_log_probs_against_loop() -> None:
    q = random_logits(3, 4, 9, seed=24)
    mask = torch.rand(3, 4, 9, generator=torch.Generator().manual_seed(25)) < 0.5
    mask[..., 4] = True
    out = proj_p_log_probs(q, mask)
    expected = torch.full((3, 4, 9), NEG_INF, dtype=torch.float64)
    for i in range(3):
        for t in range(4):
            allowed = [a for a in range(9) if mask[i, t, a]]
            norm = math.log(sum(math.exp(q[i, t, a].item()) for a in allowed))
            for a in allowed:
                expected[i, t, a] = q[i, t, a].item() - norm
    torch.testing.assert_close(out, expected.float())
    # support form: gathered logits + support mask give the same values on the support
    teacher = random_logits(3, 4, 9, seed=26)
    support = top_p_support(teacher, 0.8)
    dense = proj_p_log_probs(q, top_p_mask(teacher, 0.8))
    sparse = proj_p_log_probs(gather_support(q, support.ids, support.mask), support.mask)
    torch.testing.assert_close(sparse, gather_support(dense, support.ids, support.mask))
    # p = 1 with finite logits: the ordinary log-softmax
    torch.testing.assert_close(
        proj_p_log_probs(q, top_p_mask(teacher, 1.0)), torch.log_softmax(q, -1)
    )


def test_gather_support_against_loop_and_gradient() -> None:
    values = random_logits(2, 3, 11, seed=27).requires_grad_()
    support = top_p_support(random_logits(2, 3, 11, seed=28), 0.9)
    out = gather_support(values, support.ids, support.mask, fill=-7.0)
    plain = out.detach()
    for i in range(2):
        for t in range(3):
            for k in range(support.ids.shape[-1]):
                expected = (
                    values.detach()[i, t, support.ids[i, t, k]] if support.mask[i, t, k] else -7.0
                )
                assert plain[i, t, k].item() == float(expected)
    out.sum().backward()
    expected_grad = support_to_mask(support.ids, support.mask, 11).float()
    assert torch.equal(values.grad, expected_grad)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("bad_p", [0, -0.1, 1.5, float("nan")])
def test_p_outside_unit_interval_is_rejected(bad_p: float) -> None:
    logits = random_logits(2, 5, seed=29)
    pattern = rf"p must be in \(0, 1\], got p={bad_p}"
    for call in (
        lambda: top_p_mask(logits, bad_p),
        lambda: top_p_support(logits, bad_p),
        lambda: nucleus_size(logits, bad_p),
        lambda: RaggedSupport.from_logits(logits, bad_p),
        lambda: RaggedSupport.from_logits(logits, 1.0).restrict(bad_p),
    ):
        with pytest.raises(ValueError, match=pattern):
            call()
    with pytest.raises(ValueError, match="p_store must be"):
        topp.check_p("high", "p_store")


@pytest.mark.parametrize(
    ("logits", "pattern"),
    [
        (torch.tensor([[0.0, float("nan")]]), "logits contains NaN"),
        (torch.tensor([[0.0, float("inf")]]), r"logits contains \+inf"),
        (torch.zeros(3, 0), r"non-empty last \(action\) dimension, got shape \(3, 0\)"),
        (torch.tensor(1.0), r"non-empty last \(action\) dimension, got shape \(\)"),
        (torch.tensor([[0.0, 1.0], [NEG_INF, NEG_INF]]), "every entry is -inf"),
        (torch.tensor([[1, 2]]), "floating-point tensor, got dtype torch.int64"),
        (torch.tensor([[1e300, 0.0]], dtype=torch.float64), "beyond the float32 range"),
    ],
)
def test_bad_logits_are_rejected(logits: torch.Tensor, pattern: str) -> None:
    for call in (top_p_mask, top_p_support, RaggedSupport.from_logits, rank_log_probs):
        with pytest.raises(ValueError, match=pattern):
            call(logits) if call is rank_log_probs else call(logits, 0.5)


def test_shape_mismatches_are_rejected() -> None:
    ids = torch.zeros(2, 3, dtype=torch.int64)
    mask = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(
        ValueError, match=r"ids and mask must have the same shape, got \(2, 3\) and \(2, 4\)"
    ):
        support_to_mask(ids, torch.ones(2, 4, dtype=torch.bool), 5)
    with pytest.raises(ValueError, match=r"support ids must lie in \[0, 5\), got ids in \[0, 9\]"):
        support_to_mask(ids + torch.tensor([[0, 0, 9], [0, 0, 0]]), mask, 5)
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        support_to_mask(ids, mask.long(), 5)
    with pytest.raises(ValueError, match=r"values \(3, 5\), ids \(2, 3\)"):
        gather_support(torch.zeros(3, 5), ids, mask)
    with pytest.raises(ValueError, match=r"support ids must lie in \[0, 5\)"):
        gather_support(torch.zeros(2, 5), ids + 5, mask)
    with pytest.raises(
        ValueError, match=r"logits and mask must have the same shape, got \(2, 3\) and \(2, 4\)"
    ):
        proj_p_log_probs(torch.zeros(2, 3), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="no allowed action"):
        proj_p_log_probs(torch.zeros(2, 3), torch.tensor([[True, False, False], [False] * 3]))
    with pytest.raises(
        ValueError, match="max_support must be an integer >= 1 or None, got max_support=0"
    ):
        top_p_support(torch.zeros(2, 3), 0.5, max_support=0)


def test_top_k_shortcut_does_not_rely_on_topk_tie_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    """topk may return any of the entries tied at its k-th value; take the highest ids."""

    def adversarial_topk(block, k, dim=-1, largest=True, sorted=True):
        vocab = block.shape[-1]
        values, flipped = torch.sort(block.flip(-1), dim=-1, descending=True, stable=True)
        return values[..., :k], (vocab - 1 - flipped)[..., :k]

    logits = torch.round(random_logits(16, 3000, scale=2.0, seed=30))  # big tie groups
    logits[:8] = torch.round(zipf_logits(8, 3000, seed=31) * 2) / 2
    expected = {p: (top_p_mask(logits, p), top_p_support(logits, p)) for p in (0.5, 0.8, 0.95)}
    reference = {p: nucleus_size(rank_log_probs(logits)[0], p) for p in expected}
    monkeypatch.setattr(torch, "topk", adversarial_topk)
    for p, (mask, support) in expected.items():
        assert torch.equal(top_p_mask(logits, p), mask)
        assert_support_equal(top_p_support(logits, p), support)
        assert torch.equal(support.sizes, reference[p])


def test_empty_batches_and_stores() -> None:
    for vocab in (10, 100):  # below and above the first top-k length
        logits = torch.zeros(0, 3, vocab)
        assert top_p_mask(logits, 0.5).shape == (0, 3, vocab)
        mask, capped = top_p_mask_and_support(logits, 0.5, max_support=2)
        assert mask.shape == (0, 3, vocab) and capped.ids.shape == (0, 3, 1)
        support = top_p_support(logits, 0.5)
        assert support.ids.shape == (0, 3, 1) and support.covered_mass.shape == (0, 3)
        assert len(RaggedSupport.from_logits(logits, 0.5)) == 0
    empty = RaggedSupport(
        torch.zeros(1, dtype=torch.int64),
        torch.zeros(0, dtype=torch.int32),
        torch.zeros(0),
        0.9,
        torch.zeros(0),
    )
    assert len(empty.restrict(0.5)) == 0 and len(empty.select(slice(0, 0))) == 0
    assert empty.to_padded().ids.shape == (0, 1) and empty.to_padded(3).mask.shape == (0, 1)
