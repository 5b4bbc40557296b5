from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from tdkd.cache import (
    FORMAT_VERSION,
    CacheWriter,
    ScoreTimings,
    TeacherCache,
    build_cache,
    data_hash,
    extract_supports,
    support_stats,
    teacher_fingerprint,
)
from tdkd.data import assign_splits, encode_prompts, generate_responses, synthetic_prompts
from tdkd.models import tiny_teacher_student
from tdkd.topp import RaggedSupport, support_to_mask, top_p_mask

CONTRACT = {
    "tokens": torch.int64,
    "attention_mask": torch.bool,
    "response_mask": torch.bool,
    "support_ids": torch.int64,
    "support_log_probs": torch.float32,
    "support_mask": torch.bool,
    "teacher_log_prob": torch.float32,
    "covered_mass": torch.float32,
    "terminated": torch.bool,
}


def _random_logits(n, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, vocab, generator=g) * torch.rand(n, 1, generator=g) * 8
    logits[: n // 4] = logits[: n // 4].round()  # many ties
    logits[n // 4 : n // 4 + 2, 5] = 40.0  # single-token nuclei
    logits[-1, :3] = float("-inf")  # impossible tokens
    return logits


def _reference_nucleus(log_probs_row, p, max_support):
    """Loop reference: stable sort, then add tokens while the mass before them is < p
    (at p = 1: every finite token, whatever the rounding of the running mass)."""
    order = sorted(range(len(log_probs_row)), key=lambda i: (-log_probs_row[i], i))
    ids, mass = [], 0.0
    for i in order:
        if log_probs_row[i] == float("-inf") or (ids and p < 1.0 and mass >= p):
            break
        ids.append(i)
        mass += math.exp(log_probs_row[i])
    kept = ids if max_support is None else ids[:max_support]
    dropped = sum(math.exp(log_probs_row[i]) for i in ids[len(kept) :])
    return kept, dropped


@pytest.mark.parametrize("p", [1e-4, 0.3, 0.8, 0.95, 1.0])
@pytest.mark.parametrize("max_support", [None, 1, 4])
def test_extract_supports_matches_loop_reference(p, max_support):
    logits = _random_logits(40, 300, seed=int(p * 100))
    actions = torch.randint(0, 300, (40,))
    support, action_lp = extract_supports(logits, actions, p, max_support=max_support)
    log_probs = torch.log_softmax(logits, -1)
    assert len(support) == 40
    for i in range(40):
        ids, dropped = _reference_nucleus(log_probs[i].double().tolist(), p, max_support)
        start, end = int(support.offsets[i]), int(support.offsets[i + 1])
        assert support.ids[start:end].tolist() == ids
        torch.testing.assert_close(
            support.log_probs[start:end], log_probs[i, support.ids[start:end].long()]
        )
        assert float(support.dropped_mass[i]) == pytest.approx(dropped, abs=1e-6)
    torch.testing.assert_close(action_lp, log_probs.gather(-1, actions[:, None]).squeeze(-1))


def test_extract_supports_bad_input():
    with pytest.raises(ValueError, match="actions"):
        extract_supports(torch.zeros(3, 5), torch.zeros(4, dtype=torch.long), 0.5)
    with pytest.raises(ValueError, match="max_support"):
        extract_supports(torch.zeros(3, 5), torch.zeros(3, dtype=torch.long), 0.5, max_support=0)
    with pytest.raises(ValueError, match="p"):
        extract_supports(torch.zeros(3, 5), torch.zeros(3, dtype=torch.long), 1.5)
    with pytest.raises(ValueError, match="NaN"):
        extract_supports(torch.full((3, 5), float("nan")), torch.zeros(3, dtype=torch.long), 0.5)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny teacher whose distributions are peaked enough to give varied nuclei."""
    teacher, _, tok = tiny_teacher_student()
    with torch.no_grad():
        teacher.lm_head.weight.mul_(25.0)
    root = tmp_path_factory.mktemp("cache")
    prompts = encode_prompts(tok, assign_splits(synthetic_prompts(8), seed=1), max_prompt_tokens=64)
    responses = generate_responses(
        teacher,
        tok,
        prompts,
        root / "responses",
        samples_per_prompt=2,
        max_new_tokens=6,
        batch_size=8,
        top_p=0.95,
    )
    timings = ScoreTimings()
    build_cache(
        teacher, tok, responses, root / "cache", p_store=0.95, batch_size=5, timings=timings
    )
    return teacher, tok, responses, root, timings


def _live(teacher, tokens, attention):
    with torch.inference_mode():
        return teacher(input_ids=tokens, attention_mask=attention.long()).logits


def test_batch_matches_contract(tiny_run):
    _, _, responses, root, timings = tiny_run
    cache = TeacherCache(root / "cache")
    assert len(cache) == len(responses) == 16
    assert (
        timings.tokens == sum(len(r) for r in responses["response_ids"]) and timings.forward_s > 0
    )
    batch = cache.batch([0, 3, 5], p=0.8)
    assert batch.batch_size == torch.Size([3])
    assert set(batch.keys()) == set(CONTRACT)
    for key, dtype in CONTRACT.items():
        assert batch[key].dtype == dtype, key
    b, length = batch["tokens"].shape
    k = batch["support_ids"].shape[-1]
    assert batch["support_log_probs"].shape == batch["support_mask"].shape == (b, length, k)
    sizes = batch["support_mask"].sum(-1)
    assert int(sizes.max()) == k  # padded to the batch's own largest support
    assert torch.equal(sizes > 0, batch["response_mask"])
    assert not (batch["response_mask"] & ~batch["attention_mask"]).any()
    assert (batch["teacher_log_prob"][~batch["response_mask"]] == 0).all()
    assert (batch["covered_mass"][~batch["response_mask"]] == 0).all()
    assert torch.isneginf(batch["support_log_probs"][~batch["support_mask"]]).all()
    for j, i in enumerate([0, 3, 5]):
        row = responses[i]
        n = len(row["prompt_ids"]) + len(row["response_ids"])
        assert batch["tokens"][j, :n].tolist() == row["prompt_ids"] + row["response_ids"]
        assert bool(batch["terminated"][j]) == row["terminated"]


@pytest.mark.parametrize("p", [0.3, 0.8, 0.95])
def test_cache_reconstructs_live_teacher_nucleus(tiny_run, p):
    teacher, tok, _, root, _ = tiny_run
    cache = TeacherCache(root / "cache")
    batch = cache.batch(range(len(cache)), p=p)
    logits = _live(teacher, batch["tokens"], batch["attention_mask"])
    vocab = logits.shape[-1]
    resp = batch["response_mask"]
    state_logits = logits[:, :-1][resp[:, 1:]]  # the state before each response token
    dense = support_to_mask(batch["support_ids"][resp], batch["support_mask"][resp], vocab)
    assert torch.equal(dense, top_p_mask(state_logits, p))
    live_lp = torch.log_softmax(state_logits, -1)
    cached_lp = batch["support_log_probs"][resp]
    mask = batch["support_mask"][resp]
    gathered = live_lp.gather(-1, batch["support_ids"][resp])
    torch.testing.assert_close(cached_lp[mask], gathered[mask])
    tokens = batch["tokens"][resp]
    torch.testing.assert_close(
        batch["teacher_log_prob"][resp], live_lp.gather(-1, tokens[:, None]).squeeze(-1)
    )
    torch.testing.assert_close(batch["covered_mass"][resp], (gathered.exp() * mask).sum(-1))
    assert (batch["covered_mass"][resp] >= p - 1e-5).all()
    # Varied nuclei: the test exercises more than one support size.
    assert len(set(batch["support_mask"][resp].sum(-1).tolist())) > 1


def test_max_support_caps_and_records_mass(tiny_run):
    _, _, _, root, _ = tiny_run
    cache = TeacherCache(root / "cache")
    full = cache.batch(range(6), p=0.9)
    capped = cache.batch(range(6), p=0.9, max_support=2)
    assert capped["support_ids"].shape[-1] == min(2, full["support_ids"].shape[-1])
    resp = full["response_mask"]
    kept = full["support_mask"][resp][:, :2]
    assert torch.equal(capped["support_mask"][resp], kept)
    assert torch.equal(capped["support_ids"][resp][kept], full["support_ids"][resp][:, :2][kept])
    assert (capped["covered_mass"][resp] <= full["covered_mass"][resp] + 1e-6).all()


def test_cap_at_store_time_records_dropped_mass(tiny_run, tmp_path):
    teacher, tok, responses, root, _ = tiny_run
    build_cache(teacher, tok, responses, tmp_path / "capped", p_store=0.95, max_support=3)
    capped, full = TeacherCache(tmp_path / "capped"), TeacherCache(root / "cache")
    assert capped.fingerprint["max_support"] == 3
    for i in range(len(full)):
        c, f = capped.row(i)["support"], full.row(i)["support"]
        assert torch.equal(c.lengths, f.lengths.clamp(max=3))
        probs = f.to_padded().log_probs.double().exp()
        torch.testing.assert_close(c.dropped_mass.double(), probs[:, 3:].sum(-1), atol=1e-6, rtol=0)
    assert (capped.supports().dropped_mass > 0).any()


def test_read_p_above_store_is_refused(tiny_run):
    _, _, _, root, _ = tiny_run
    cache = TeacherCache(root / "cache")
    with pytest.raises(ValueError, match="p_store"):
        cache.batch([0], p=0.99)


def test_iter_batches_covers_split_once(tiny_run):
    _, _, responses, root, _ = tiny_run
    cache = TeacherCache(root / "cache")
    seen = []
    for batch in cache.iter_batches(3, split="train", p=0.5, seed=2):
        assert batch.batch_size[0] <= 3
        seen.append(batch["tokens"].shape[0])
    train = cache.indices("train")
    assert sum(seen) == len(train)
    assert {responses[int(i)]["split"] for i in train} <= {"train"}
    assert sorted(
        np.concatenate([cache.indices(s) for s in ("train", "validation", "test")])
    ) == list(range(len(cache)))
    assert cache.row_ids(train) == [responses[int(i)]["row_id"] for i in train]


def test_fingerprint_checked_on_open(tiny_run):
    teacher, tok, responses, root, _ = tiny_run
    expect = teacher_fingerprint(teacher, tok)
    cache = TeacherCache(root / "cache", expect=expect)
    assert cache.fingerprint["format_version"] == FORMAT_VERSION
    assert cache.fingerprint["p_store"] == 0.95
    assert cache.fingerprint["data_hash"] == data_hash(
        [(r["row_id"], r["prompt_ids"], r["response_ids"]) for r in responses]
    )
    other_teacher, _, _ = tiny_teacher_student(seed=5)
    with pytest.raises(ValueError, match="teacher_weights_hash"):
        other = teacher_fingerprint(other_teacher, tok)["teacher_weights_hash"]
        TeacherCache(root / "cache", expect={**expect, "teacher_weights_hash": other})
    with pytest.raises(ValueError, match="p_store"):
        TeacherCache(root / "cache", expect={"p_store": 0.8})
    # The same teacher loaded from another folder is the same teacher.
    TeacherCache(root / "cache", expect={**expect, "teacher_id": "/some/other/folder"})


def _copy_cache(root, tmp_path):
    import shutil

    target = tmp_path / "copy"
    shutil.copytree(root / "cache", target)
    return target


def test_format_version_mismatch_refused(tiny_run, tmp_path):
    path = _copy_cache(tiny_run[3], tmp_path)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["format_version"] = FORMAT_VERSION + 1
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="format version"):
        TeacherCache(path)


def test_corrupted_and_truncated_shards_detected(tiny_run, tmp_path):
    path = _copy_cache(tiny_run[3], tmp_path)
    shard = sorted(path.glob("shard-*.bin"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupted"):
        TeacherCache(path)
    shard.write_bytes(bytes(data[:-100]))
    with pytest.raises(ValueError, match="truncated"):
        TeacherCache(path, verify=False)
    shard.unlink()
    with pytest.raises(FileNotFoundError, match="missing"):
        TeacherCache(path)
    with pytest.raises(FileNotFoundError, match="tdkd prepare"):
        TeacherCache(tmp_path / "nothing")


def _one_row_support(n):
    return RaggedSupport.from_logits(torch.randn(n, 10), 0.9)


def test_writer_is_atomic(tmp_path):
    path = tmp_path / "c"
    with pytest.raises(RuntimeError):
        with CacheWriter(
            path, fingerprint={"p_store": 0.9, "data_hash": "x"}, vocab_size=10, pad_token_id=0
        ) as w:
            w.add(
                row_id=0,
                split="train",
                prompt_ids=[1],
                response_ids=[2, 3],
                terminated=False,
                support=_one_row_support(2),
                teacher_log_prob=torch.zeros(2),
            )
            raise RuntimeError("crash while writing")
    assert list(tmp_path.iterdir()) == []
    with CacheWriter(
        path,
        fingerprint={"p_store": 0.9, "data_hash": "x"},
        vocab_size=10,
        pad_token_id=0,
        shard_rows=1,
    ) as w:
        for i in range(3):
            w.add(
                row_id=i,
                split="test",
                prompt_ids=[1],
                response_ids=[2, 3],
                terminated=True,
                support=_one_row_support(2),
                teacher_log_prob=torch.zeros(2),
            )
    assert TeacherCache(path).indices("test").tolist() == [0, 1, 2]
    assert len(list(path.glob("shard-*.bin"))) == 3
    with pytest.raises(ValueError, match="already exists"):
        CacheWriter(
            path, fingerprint={"p_store": 0.9, "data_hash": "x"}, vocab_size=10, pad_token_id=0
        )
    with pytest.raises(ValueError, match="supports"):
        with CacheWriter(
            tmp_path / "d",
            fingerprint={"p_store": 0.9, "data_hash": "x"},
            vocab_size=10,
            pad_token_id=0,
        ) as w:
            w.add(
                row_id=0,
                split="train",
                prompt_ids=[1],
                response_ids=[2],
                terminated=False,
                support=_one_row_support(2),
                teacher_log_prob=torch.zeros(1),
            )
    assert not (tmp_path / "d").exists()


def test_support_stats_matches_numpy():
    support = RaggedSupport.from_logits(_random_logits(50, 100, seed=3), 0.8)
    sizes = support.lengths.numpy()
    stats = support_stats(support)
    assert stats["states"] == 50 and stats["max"] == sizes.max()
    assert stats["mean"] == pytest.approx(sizes.mean(), abs=0.01)
    assert stats["median"] == pytest.approx(np.median(sizes), abs=0.51)
    assert stats["p95"] == pytest.approx(np.quantile(sizes, 0.95))
