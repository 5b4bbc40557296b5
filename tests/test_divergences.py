"""tdkd.divergences: each divergence against a loop over probabilities, invariants, chunking."""

from __future__ import annotations

import math

import pytest
import torch

from tdkd.divergences import (
    DIVERGENCES,
    full_vocab_cross_entropy,
    full_vocab_divergence,
    get_divergence,
)

HYPER = {"jsd": {"beta": 0.3}, "skew_kl": {"lam": 0.2}, "skew_rkl": {"lam": 0.2}}


def _kl(a, b):
    return sum(x * (math.log(x) - math.log(y)) for x, y in zip(a, b, strict=True) if x > 0)


def _reference(name, p, q):
    """Loop over the entries of two probability lists (teacher p, student q)."""
    if name == "forward_kl":
        return _kl(p, q)
    if name == "reverse_kl":
        return _kl(q, p)
    if name == "jsd":
        beta = HYPER["jsd"]["beta"]
        m = [beta * x + (1 - beta) * y for x, y in zip(p, q, strict=True)]
        return beta * _kl(p, m) + (1 - beta) * _kl(q, m)
    if name == "skew_kl":
        lam = HYPER["skew_kl"]["lam"]
        return _kl(p, [lam * x + (1 - lam) * y for x, y in zip(p, q, strict=True)])
    if name == "skew_rkl":
        lam = HYPER["skew_rkl"]["lam"]
        return _kl(q, [lam * y + (1 - lam) * x for x, y in zip(p, q, strict=True)])
    if name == "tvd":
        return 0.5 * sum(abs(x - y) for x, y in zip(p, q, strict=True))
    if name == "cross_entropy":
        return -sum(x * math.log(y) for x, y in zip(p, q, strict=True) if x > 0)
    raise AssertionError(name)


def _random_pair(seed, rows=6, k=7, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(rows, k, generator=gen) < 0.7
    mask[:, 0] = True
    t = torch.randn(rows, k, generator=gen, dtype=dtype).masked_fill(~mask, float("-inf"))
    s = (torch.randn(rows, k, generator=gen, dtype=dtype) * 2).masked_fill(~mask, float("-inf"))
    return torch.log_softmax(t, -1), torch.log_softmax(s, -1), mask


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_matches_loop_reference_on_supports(name):
    t, s, mask = _random_pair(0)
    out = get_divergence(name)(t, s, mask, **HYPER.get(name, {}))
    for row in range(t.shape[0]):
        keep = mask[row]
        p = t[row][keep].exp().tolist()
        q = s[row][keep].exp().tolist()
        torch.testing.assert_close(out[row].item(), _reference(name, p, q), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", sorted(set(DIVERGENCES) - {"cross_entropy"}))
def test_zero_at_equality_and_nonnegative(name):
    t, s, mask = _random_pair(1, rows=50)
    fn = get_divergence(name)
    torch.testing.assert_close(
        fn(t, t, mask, **HYPER.get(name, {})), torch.zeros(50, dtype=t.dtype)
    )
    assert (fn(t, s, mask, **HYPER.get(name, {})) >= -1e-12).all()


def test_cross_entropy_is_kl_plus_entropy():
    t, s, mask = _random_pair(2)
    entropy = -(t.exp() * t.masked_fill(~mask, 0.0)).sum(-1)
    torch.testing.assert_close(
        get_divergence("cross_entropy")(t, s, mask),
        get_divergence("forward_kl")(t, s, mask) + entropy,
    )


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_no_nan_gradients_and_none_off_the_mask(name):
    t, s, mask = _random_pair(3, dtype=torch.float32)
    logits = torch.randn(s.shape, requires_grad=True)
    student = torch.log_softmax(logits.masked_fill(~mask, float("-inf")), -1)
    get_divergence(name)(t, student, mask, **HYPER.get(name, {})).sum().backward()
    assert torch.isfinite(logits.grad).all()
    assert (logits.grad[~mask] == 0).all()


def test_jsd_limits():
    t, s, mask = _random_pair(4)
    jsd = get_divergence("jsd")
    torch.testing.assert_close(jsd(t, s, mask, beta=0.0), torch.zeros(t.shape[0], dtype=t.dtype))
    # symmetric at beta = 0.5
    torch.testing.assert_close(jsd(t, s, mask, beta=0.5), jsd(s, t, mask, beta=0.5))
    skew = get_divergence("skew_kl")
    torch.testing.assert_close(skew(t, s, mask, lam=0.0), get_divergence("forward_kl")(t, s, mask))


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "jsd", "tvd"])
@pytest.mark.parametrize("chunk_size", [1, 3, 1000])
def test_full_vocab_chunked_equals_unchunked(name, chunk_size):
    torch.manual_seed(0)
    teacher = torch.randn(2, 5, 11)
    student = torch.randn(2, 5, 11, requires_grad=True)
    rows = torch.rand(2, 5) < 0.6
    out = full_vocab_divergence(
        teacher, student, name, mask=rows, chunk_size=chunk_size, **HYPER.get(name, {})
    )
    out.sum().backward()
    grad = student.grad.clone()
    student.grad = None
    ref = get_divergence(name)(
        torch.log_softmax(teacher, -1), torch.log_softmax(student, -1), **HYPER.get(name, {})
    )
    ref = torch.where(rows, ref, torch.zeros_like(ref))
    ref.sum().backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(grad, student.grad)
    assert (grad[~rows] == 0).all()


@pytest.mark.parametrize("chunk_size", [1, 4, 64])
def test_full_vocab_cross_entropy(chunk_size):
    torch.manual_seed(0)
    logits = torch.randn(3, 4, 9, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, 9, (3, 4))
    out = full_vocab_cross_entropy(logits, targets, chunk_size=chunk_size)
    assert out.dtype == torch.float32
    ref = torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, 9), targets.reshape(-1), reduction="none"
    )
    torch.testing.assert_close(out, ref.reshape(3, 4))
    out.sum().backward()
    assert logits.grad is not None and logits.grad.dtype == torch.bfloat16


def test_bad_input():
    with pytest.raises(ValueError, match="unknown divergence"):
        get_divergence("kl")
    with pytest.raises(ValueError, match="share a tokenizer"):
        full_vocab_divergence(torch.zeros(2, 3), torch.zeros(2, 4), "forward_kl")
    with pytest.raises(ValueError, match="chunk_size"):
        full_vocab_cross_entropy(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), chunk_size=0)
    with pytest.raises(ValueError, match="beta"):
        get_divergence("jsd")(torch.zeros(1, 2), torch.zeros(1, 2), beta=2.0)


def test_full_vocab_forms_read_rows_of_a_shifted_view_in_place():
    """logits[:, :-1] is a non-contiguous view: the chunked forms must not copy all of it."""
    from tdkd.divergences import _rows

    logits = torch.randn(3, 6, 11, requires_grad=True)
    view = logits[:, :-1]
    rows_tensor, rows = _rows(view, None)
    assert rows_tensor.data_ptr() == logits.data_ptr()
    assert rows.tolist() == list(range(15))
    teacher = torch.randn(3, 5, 11)
    mask = torch.rand(3, 5) > 0.3
    got = full_vocab_divergence(teacher, view, "forward_kl", mask=mask, chunk_size=4)
    t = torch.log_softmax(teacher, -1)
    s = torch.log_softmax(view, -1)
    expected = torch.where(mask, (t.exp() * (t - s)).sum(-1), 0.0)
    torch.testing.assert_close(got, expected)
    targets = torch.randint(0, 11, (3, 5))
    ce = full_vocab_cross_entropy(view, targets, mask=mask, chunk_size=4)
    expected_ce = torch.where(mask, -s.gather(-1, targets.unsqueeze(-1)).squeeze(-1), 0.0)
    torch.testing.assert_close(ce, expected_ce)
    (got.sum() + ce.sum()).backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
