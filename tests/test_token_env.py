from __future__ import annotations

import pytest
import torch
from tensordict import TensorDict
from torchrl.envs import ActionMask, TransformedEnv
from torchrl.envs.utils import check_env_specs

from envs import IncrementalLM, StudentPolicy, TopPTokenEnv, episodes_to_batch, nucleus_view
from tdkd.models import tiny_causal_lm
from tdkd.topp import top_p_mask, top_p_support

V = 64
PROMPTS = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14]]


def peaky_lm(seed: int, scale: float = 30.0, vocab: int = V):
    """A tiny random Llama whose next-token distributions are concentrated (small nuclei)."""
    model = tiny_causal_lm(vocab_size=vocab, seed=seed)
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)
    return model


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models: one intra-op thread is much faster on a shared CPU (restored afterwards)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def teacher():
    return peaky_lm(1)


@pytest.fixture(scope="module")
def student():
    return tiny_causal_lm(vocab_size=V, seed=2)


def make_env(teacher, **kwargs):
    defaults = dict(batch_size=3, p=0.8, max_new_tokens=5, max_support=16, seed=0)
    defaults.update(kwargs)
    return TopPTokenEnv(
        teacher,
        kwargs.pop("prompts", PROMPTS),
        **{k: v for k, v in defaults.items() if k != "prompts"},
    )


def reference_logits(model, sequence: torch.Tensor) -> torch.Tensor:
    """Full recompute, one unpadded row: next-token logits [V] after ``sequence``."""
    with torch.no_grad():
        return model(sequence[None]).logits[0, -1]


# ----------------------------------------------------------------------------- specs


@pytest.mark.parametrize("action_space", ["token", "support"])
def test_check_env_specs(teacher, action_space):
    check_env_specs(make_env(teacher, action_space=action_space), seed=0)


@pytest.mark.parametrize("width", [1, 8, V])
def test_nucleus_view_matches_topp(width):
    logits = torch.randn(6, V) * 3
    logits[1, :] = 0.0  # all ties: the full sort
    logits[2, 7] = 50.0  # one dominant token
    logits[3, :5] = 9.0  # ties inside the top-k prefix
    logits[4, 0] = 40.0  # token 0 in the nucleus (padding ids are 0 too)
    logits[5] *= 4.0  # peaked
    for p in (0.3, 0.8, 0.95, 1.0):
        view = nucleus_view(logits, p, width=width)
        dense = top_p_mask(logits, p)
        torch.testing.assert_close(view["action_mask"], dense)
        assert torch.equal(view["nucleus_size"], dense.sum(-1))  # uncapped, unlike the view
        capped = top_p_support(logits, p, max_support=width)
        k = capped.ids.shape[-1]
        for key in ("support_ids", "support_log_probs", "support_mask"):
            assert view[key].shape == (6, width), key  # the env's fixed observation width
        torch.testing.assert_close(view["support_ids"][:, :k], capped.ids)
        torch.testing.assert_close(view["support_mask"][:, :k], capped.mask)
        assert not view["support_mask"][:, k:].any()
        assert (view["support_ids"][:, k:] == 0).all()
        assert (view["support_log_probs"][:, k:] == float("-inf")).all()
        torch.testing.assert_close(view["support_log_probs"][:, :k], capped.log_probs)
        torch.testing.assert_close(view["covered_mass"], capped.covered_mass)
        torch.testing.assert_close(view["dropped_mass"], capped.dropped_mass, atol=1e-6, rtol=0)
        torch.testing.assert_close(view["log_probs"], torch.log_softmax(logits, -1))
        # sort + cumsum reference for the (uncapped) nucleus mass
        sorted_probs = torch.sort(torch.softmax(logits.double(), -1), -1, descending=True)[0]
        cumulative = torch.cumsum(sorted_probs, -1)
        reference = cumulative.gather(-1, (dense.sum(-1) - 1).unsqueeze(-1)).squeeze(-1)
        torch.testing.assert_close(view["nucleus_mass"], reference, atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- dynamics


def test_same_seed_same_rollout(teacher, student):
    rollouts = []
    for _ in range(2):
        env = make_env(teacher, seed=3)
        rollouts.append(env.rollout(12, StudentPolicy(student, seed=5), break_when_any_done=False))
    assert (rollouts[0] == rollouts[1]).all()
    other = make_env(teacher, seed=3).rollout(
        12, StudentPolicy(student, seed=6), break_when_any_done=False
    )
    assert not torch.equal(other["action"], rollouts[0]["action"])


def test_batched_env_equals_single_envs(teacher, student):
    batched = make_env(teacher, batch_size=3, seed=1)
    greedy = StudentPolicy(student, greedy=True)
    ref = batched.rollout(5, greedy)
    prompts = [ref["tokens"][b, 0, : int(ref["prompt_length"][b, 0])].tolist() for b in range(3)]
    assert len({tuple(p) for p in prompts}) > 1  # different prompts, hence different padding
    for b, prompt in enumerate(prompts):
        single = make_env(teacher, batch_size=1, prompts=[prompt], max_prompt_tokens=4)
        out = single.rollout(5, StudentPolicy(student, greedy=True))
        steps = out.shape[1]
        assert torch.equal(out["action"][0], ref["action"][b, :steps])
        for key in ("support_ids", "support_mask", "tokens", "length"):
            assert torch.equal(out[key][0], ref[key][b, :steps]), key
        torch.testing.assert_close(
            out["support_log_probs"][0], ref["support_log_probs"][b, :steps], atol=1e-5, rtol=1e-5
        )
        torch.testing.assert_close(
            out["next", "reward"][0], ref["next", "reward"][b, :steps], atol=1e-5, rtol=1e-5
        )


def test_action_mask_transform_samples_inside_nucleus(teacher):
    env = TransformedEnv(make_env(teacher, batch_size=4, max_new_tokens=4), ActionMask())
    rollout = env.rollout(20, break_when_any_done=False)  # random actions from the masked spec
    inside = rollout["action_mask"].gather(-1, rollout["action"].unsqueeze(-1)).squeeze(-1)
    assert inside.all()
    assert not rollout["next", "out_of_support"].any()
    assert (rollout["action_mask"].sum(-1) < V).all()  # the mask does restrict


def test_kv_cache_equals_full_recompute_with_partial_resets(teacher, student):
    env = make_env(teacher, batch_size=3, max_new_tokens=4, seed=2)
    rollout = env.rollout(14, StudentPolicy(student, seed=0), break_when_any_done=False)
    assert rollout["next", "done"].sum() >= 6  # several partial resets happened
    for b in range(3):
        for t in range(rollout.shape[1]):
            step = rollout[b, t]
            sequence = step["tokens"][: int(step["length"])]
            logits = reference_logits(teacher, sequence)
            log_probs = torch.log_softmax(logits, -1)
            ids, mask = step["support_ids"], step["support_mask"]
            torch.testing.assert_close(
                step["support_log_probs"][mask], log_probs[ids[mask]], atol=1e-5, rtol=1e-5
            )
            assert torch.equal(step["action_mask"], top_p_mask(logits, 0.8))
            torch.testing.assert_close(
                step["next", "teacher_log_prob"], log_probs[step["action"]], atol=1e-5, rtol=1e-5
            )


def test_naive_env_equals_cached_env(teacher, student):
    out = []
    for kv in (True, False):
        env = make_env(teacher, seed=4, kv_cache=kv)
        out.append(
            env.rollout(10, StudentPolicy(student, seed=1, kv_cache=kv), break_when_any_done=False)
        )
    assert torch.equal(out[0]["action"], out[1]["action"])
    torch.testing.assert_close(
        out[0]["next", "reward"], out[1]["next", "reward"], atol=1e-5, rtol=1e-5
    )


def test_partial_reset_prefills_only_reset_rows(teacher):
    env = make_env(teacher, batch_size=3)
    td = env.reset()
    for _ in range(2):
        td = env.step(td.set("action", td["support_ids"][:, 0]))["next"]
    before = td.clone()
    tokens_before = env.lm.forward_tokens
    reset = torch.tensor([[False], [True], [False]])
    after = env.reset(td.clone().set("_reset", reset))
    # the teacher ran over the new prompt of row 1 only (left-padded to its own length)
    assert env.lm.forward_tokens - tokens_before == int(after["prompt_length"][1])
    for key in ("tokens", "length", "support_ids", "support_log_probs", "action_mask"):
        assert torch.equal(after[key][[0, 2]], before[key][[0, 2]]), key
    assert int(after["step"][1]) == 0 and int(after["length"][1]) == int(after["prompt_length"][1])
    # and the cache keeps serving rows 0 and 2 exactly
    nxt = env.step(after.set("action", after["support_ids"][:, 0]))["next"]
    for b in range(3):
        logits = reference_logits(teacher, nxt["tokens"][b, : int(nxt["length"][b])])
        ids, mask = nxt["support_ids"][b], nxt["support_mask"][b]
        torch.testing.assert_close(
            nxt["support_log_probs"][b][mask],
            torch.log_softmax(logits, -1)[ids[mask]],
            atol=1e-5,
            rtol=1e-5,
        )


def test_incremental_lm_matches_reference_with_sitting_out_rows(teacher):
    generator = torch.Generator().manual_seed(0)
    lm = IncrementalLM(teacher)
    rows = [torch.randint(2, V, (n,), generator=generator) for n in (5, 1, 3)]
    lm.start(rows)
    for step in range(6):
        tokens = torch.randint(2, V, (3,), generator=generator)
        live = torch.tensor([True, step % 2 == 0, step != 3])
        if step == 2:
            rows[0] = torch.randint(2, V, (9,), generator=generator)  # longer than the cache
            lm.restart_rows(torch.tensor([0]), [rows[0]])
        out = lm.append(tokens, rows=live)
        for b in range(3):
            if live[b]:
                rows[b] = torch.cat([rows[b], tokens[b : b + 1]])
            torch.testing.assert_close(
                out[b], reference_logits(teacher, rows[b]), atol=1e-5, rtol=1e-5
            )
    assert lm.lengths.tolist() == [len(r) for r in rows]
    assert lm.mask.any(0)[0]  # no all-padding leading column is kept


# ----------------------------------------------------------------------------- rewards and ends


def _first_step(env):
    td = env.reset()
    return td, td["support_ids"][:, 0]


@pytest.mark.parametrize("mode", ["teacher_logp", "teacher_logp_projected", "zero"])
def test_reward_modes(teacher, mode):
    env = make_env(teacher, reward=mode, max_support=V)
    td, action = _first_step(env)
    nxt = env.step(td.set("action", action))["next"]
    for b in range(3):
        logits = reference_logits(teacher, td["tokens"][b, : int(td["length"][b])]).double()
        log_probs = torch.log_softmax(logits, -1)
        mass = log_probs.exp()[top_p_mask(logits, 0.8)].sum()  # nucleus mass, sort-free reference
        expected = {
            "teacher_logp": log_probs[action[b]],
            "teacher_logp_projected": log_probs[action[b]] - mass.log(),
            "zero": torch.zeros((), dtype=torch.float64),
        }[mode]
        torch.testing.assert_close(nxt["reward"][b, 0].double(), expected, atol=1e-5, rtol=1e-5)


def test_truncated_after_max_new_tokens(teacher):
    env = make_env(teacher, max_new_tokens=3, eos_token_id=V - 1)  # an EOS the teacher rarely picks
    td = env.reset()
    for t in range(3):
        td = env.step(td.set("action", td["support_ids"][:, 0]))
        nxt = td["next"]
        is_eos = td["action"] == V - 1
        assert torch.equal(nxt["terminated"].squeeze(-1), is_eos)
        assert torch.equal(nxt["truncated"].squeeze(-1), (t == 2) & ~is_eos)
        td = nxt
    with pytest.raises(ValueError, match="row 0 is done"):
        env.step(td.set("action", td["support_ids"][:, 0]))


def test_terminated_on_eos(teacher):
    env = make_env(teacher, out_of_support="allow", eos_token_id=[1, 2])
    td = env.reset()
    nxt = env.step(td.set("action", torch.tensor([1, 2, 3])))["next"]
    assert nxt["terminated"].squeeze(-1).tolist() == [True, True, False]
    assert nxt["done"].squeeze(-1).tolist() == [True, True, False]
    assert not nxt["truncated"].any()


def test_out_of_support_error_names_row_token_step(teacher):
    env = make_env(teacher)
    td = env.reset()
    outside = (~td["action_mask"]).float().argmax(-1)
    action = td["support_ids"][:, 0].clone()
    action[1] = outside[1]
    with pytest.raises(ValueError, match=rf"row 1: token {int(outside[1])} at step 0 is outside"):
        env.step(td.set("action", action))


def test_out_of_support_allow_flags_and_rewards(teacher):
    env = make_env(teacher, out_of_support="allow")
    td = env.reset()
    action = (~td["action_mask"]).float().argmax(-1)
    action[0] = td["support_ids"][0, 0]
    nxt = env.step(td.set("action", action))["next"]
    assert nxt["out_of_support"].tolist() == [False, True, True]
    for b in range(3):
        logits = reference_logits(teacher, td["tokens"][b, : int(td["length"][b])])
        torch.testing.assert_close(
            nxt["reward"][b, 0], torch.log_softmax(logits, -1)[action[b]], atol=1e-5, rtol=1e-5
        )


def test_support_action_space(teacher):
    env = make_env(teacher, action_space="support")
    td = env.reset()
    index = torch.zeros(3, dtype=torch.long)
    nxt = env.step(td.set("action", index))["next"]
    rows = torch.arange(3)
    assert torch.equal(nxt["tokens"][rows, td["length"]], td["support_ids"][:, 0])
    padded = (~nxt["support_mask"]).float().argmax(-1)
    with pytest.raises(ValueError, match="points at padding"):
        env.step(nxt.set("action", padded))
    # Padding is not a token even when out-of-support tokens are allowed.
    allow = make_env(teacher, action_space="support", out_of_support="allow")
    td = allow.reset()
    with pytest.raises(ValueError, match="points at padding"):
        allow.step(td.set("action", (~td["support_mask"]).float().argmax(-1)))


def test_rollout_break_when_all_done_is_a_clear_error(teacher):
    env = make_env(teacher)
    td = env.reset()
    td.set("_step", torch.ones(3, dtype=torch.bool))
    td.set("action", td["support_ids"][:, 0])
    with pytest.raises(ValueError, match="break_when_any_done=False"):
        env.step(td)


# ----------------------------------------------------------------------------- prompts and bad input


def test_text_prompts_with_tokenizer():
    from tdkd.models import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    model = tiny_causal_lm(vocab_size=len(tokenizer), seed=3)
    env = TopPTokenEnv(
        model, ["what is 1 + 2 ?", "hello"], tokenizer=tokenizer, batch_size=2, seed=0
    )
    td = env.reset()
    expected = {
        tuple(tokenizer(t, add_special_tokens=False)["input_ids"])
        for t in ["what is 1 + 2 ?", "hello"]
    }
    for b in range(2):
        assert tuple(td["tokens"][b, : int(td["length"][b])].tolist()) in expected


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(prompts=[]), "prompts is empty"),
        (dict(prompts=[[]]), "prompt 0 is empty"),
        (dict(prompts=[[1, 2, V]]), "outside the vocabulary"),
        (dict(prompts=["text"]), "no tokenizer"),
        (dict(prompts=[list(range(2, 60)) * 5]), "exceed the teacher's context"),
        (dict(prompts=[[3, 4, 5]], max_prompt_tokens=2), "more than max_prompt_tokens"),
        (dict(batch_size=0), "batch_size must be >= 1"),
        (dict(reward="kl"), "reward must be one of"),
        (dict(out_of_support="ignore"), "out_of_support must be one of"),
        (dict(p=1.5), "p must be in"),
        (dict(max_new_tokens=0), "max_new_tokens must be >= 1"),
    ],
)
def test_bad_construction(teacher, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_env(teacher, **kwargs)


def test_bad_actions(teacher):
    env = make_env(teacher)
    with pytest.raises(ValueError, match="before reset"):
        env.step(TensorDict({"action": torch.zeros(3, dtype=torch.long)}, batch_size=[3]))
    td = env.reset()
    for action, match in (
        (torch.zeros(3, 1, dtype=torch.long), r"shape \(3,\)"),
        (torch.zeros(3), "integer tensor"),
        (torch.full((3,), V), "outside"),
        (torch.full((3,), -1), "outside"),
    ):
        with pytest.raises(ValueError, match=match):
            env.step(td.clone().set("action", action))


# ----------------------------------------------------------------------------- episodes -> offline batch


def reference_batch(rollout, keep_incomplete=False):
    """Loop over rows and steps: one dict per finished episode (the contract, spelled out)."""
    episodes, current = [], None
    batch, steps = rollout.shape
    for b in range(batch):
        current = None
        for t in range(steps):
            step = rollout[b, t]
            if current is None:
                current = {"positions": [], "steps": []}
            current["positions"].append(int(step["length"]))
            current["steps"].append(step)
            if bool(step["next", "done"]):
                current["final"] = step["next"]
                episodes.append(current)
                current = None
        if current is not None and keep_incomplete:
            current["final"] = current["steps"][-1]["next"]
            episodes.append(current)
    return episodes


@pytest.mark.parametrize("keep_incomplete", [False, True])
def test_episodes_to_batch_matches_loop(teacher, student, keep_incomplete):
    env = make_env(teacher, batch_size=3, max_new_tokens=4, eos_token_id=[1, 5, 9])
    rollout = env.rollout(11, StudentPolicy(student, seed=0), break_when_any_done=False)
    batch = episodes_to_batch(rollout, pad_token_id=0, keep_incomplete=keep_incomplete)
    episodes = reference_batch(rollout, keep_incomplete)
    assert batch.batch_size == torch.Size([len(episodes)])
    width = max(int(e["final"]["length"]) for e in episodes)
    k = max(int(s["support_mask"].sum()) for e in episodes for s in e["steps"])
    assert batch["tokens"].shape == (len(episodes), width)
    assert batch["support_ids"].shape == (len(episodes), width, k)
    for n, episode in enumerate(episodes):
        final = episode["final"]
        length = int(final["length"])
        assert batch["tokens"][n, :length].tolist() == final["tokens"][:length].tolist()
        assert (
            not batch["attention_mask"][n, length:].any()
            and batch["attention_mask"][n, :length].all()
        )
        expected_response = torch.zeros(width, dtype=torch.bool)
        expected_response[episode["positions"]] = True
        assert torch.equal(batch["response_mask"][n], expected_response)
        assert bool(batch["terminated"][n]) == (bool(final["terminated"]) and bool(final["done"]))
        for pos, step in zip(episode["positions"], episode["steps"]):
            assert batch["tokens"][n, pos] == step["action"]
            assert torch.equal(batch["support_ids"][n, pos], step["support_ids"][:k])
            assert torch.equal(batch["support_mask"][n, pos], step["support_mask"][:k])
            assert torch.equal(batch["support_log_probs"][n, pos], step["support_log_probs"][:k])
            assert batch["teacher_log_prob"][n, pos] == step["next", "teacher_log_prob"]
            assert batch["covered_mass"][n, pos] == step["covered_mass"]
            assert batch["reward"][n, pos] == step["next", "reward"][0]
        outside = ~expected_response
        assert not batch["support_mask"][n][outside].any()
        assert (batch["teacher_log_prob"][n][outside] == 0).all()
        assert torch.isinf(batch["support_log_probs"][n][outside]).all()
    # tokens at response positions are teacher-admissible: their log-prob is on the support
    on_support = (batch["support_ids"] == batch["tokens"].unsqueeze(-1)) & batch["support_mask"]
    assert torch.equal(on_support.any(-1), batch["response_mask"])


def test_episodes_to_batch_needs_a_finished_episode(teacher, student):
    env = make_env(teacher, max_new_tokens=5, eos_token_id=V - 1)
    rollout = env.rollout(2, StudentPolicy(student, seed=0), break_when_any_done=False)
    with pytest.raises(ValueError, match="no finished episode"):
        episodes_to_batch(rollout)
    with pytest.raises(ValueError, match="lacks"):
        episodes_to_batch(rollout.exclude("support_ids"))


# ----------------------------------------------------------------------------- the embedded teacher


@pytest.mark.slow
def test_embedded_teacher_rollout_matches_full_recompute():
    from tdkd.models import load_student, load_teacher

    teacher, tokenizer = load_teacher()
    student, _ = load_student("layers:2", teacher=teacher, tokenizer=tokenizer)
    prompts = ["What is the capital of France?", "Name a colour."]
    env = TopPTokenEnv(
        teacher, prompts, tokenizer=tokenizer, batch_size=2, max_new_tokens=4, seed=0
    )
    assert env.vocab_size == 49152
    rollout = env.rollout(4, StudentPolicy(student.eval(), seed=0), break_when_any_done=False)
    assert rollout["action_mask"].gather(-1, rollout["action"].unsqueeze(-1)).all()
    batch = episodes_to_batch(rollout, pad_token_id=env.pad_token_id, keep_incomplete=True)
    assert batch["response_mask"].sum() == 8
    last = rollout[:, -1]
    for b in range(2):
        sequence = last["tokens"][b, : int(last["length"][b])]
        logits = reference_logits(teacher, sequence)
        ids, mask = last["support_ids"][b], last["support_mask"][b]
        torch.testing.assert_close(
            last["support_log_probs"][b][mask],
            torch.log_softmax(logits, -1)[ids[mask]],
            atol=1e-4,
            rtol=1e-4,
        )
