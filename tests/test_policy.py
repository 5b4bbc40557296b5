from __future__ import annotations

import pytest
import torch
from torchrl.collectors import Collector
from torchrl.envs.utils import ExplorationType, set_exploration_type

from envs import StudentPolicy, TopPTokenEnv, episodes_to_batch
from tdkd.models import tiny_causal_lm

V = 64
PROMPTS = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14]]


pytestmark = pytest.mark.usefixtures("one_thread")


def make_env(teacher, **kwargs):
    defaults = dict(batch_size=3, p=0.8, max_new_tokens=4, max_support=16, seed=0)
    defaults.update(kwargs)
    return TopPTokenEnv(teacher, PROMPTS, **defaults)


def reference_logits(model, sequence):
    with torch.no_grad():
        return model(sequence[None]).logits[0, -1]


def test_logits_equal_full_recompute_across_resets(teacher, student):
    env = make_env(teacher)
    policy = StudentPolicy(student, seed=0, return_logits=True)
    rollout = env.rollout(12, policy, break_when_any_done=False)
    assert rollout["next", "done"].sum() >= 6
    for b in range(3):
        for t in range(12):
            step = rollout[b, t]
            logits = reference_logits(student, step["tokens"][: int(step["length"])])
            torch.testing.assert_close(step["logits"], logits, atol=1e-5, rtol=1e-5)
            masked = logits.masked_fill(~step["action_mask"], float("-inf"))
            expected = torch.log_softmax(masked, -1)[step["action"]]
            torch.testing.assert_close(step["action_log_prob"], expected, atol=1e-5, rtol=1e-5)


def test_actions_inside_mask_and_cached_equals_naive(teacher, student):
    out = []
    for kv in (True, False):
        policy = StudentPolicy(student, seed=3, kv_cache=kv)
        out.append(
            make_env(teacher, seed=1, kv_cache=kv).rollout(10, policy, break_when_any_done=False)
        )
    assert torch.equal(out[0]["action"], out[1]["action"])
    torch.testing.assert_close(
        out[0]["action_log_prob"], out[1]["action_log_prob"], atol=1e-5, rtol=1e-5
    )
    inside = out[0]["action_mask"].gather(-1, out[0]["action"].unsqueeze(-1))
    assert inside.all()


def test_greedy_is_masked_argmax(teacher, student):
    env = make_env(teacher)
    td = env.reset()
    greedy = StudentPolicy(student, greedy=True, return_logits=True)(td.clone())
    masked = greedy["logits"].masked_fill(~td["action_mask"], float("-inf"))
    assert torch.equal(greedy["action"], masked.argmax(-1))
    with set_exploration_type(ExplorationType.DETERMINISTIC):
        deterministic = StudentPolicy(student, seed=0)(td.clone())
    assert torch.equal(deterministic["action"], greedy["action"])


def test_repeated_call_reuses_cache(student, teacher):
    env = make_env(teacher)
    td = env.reset()
    policy = StudentPolicy(student, seed=0)
    policy(td.clone())
    tokens = policy.lm.forward_tokens
    policy(td.clone())  # same observation: no forward at all
    assert policy.lm.forward_tokens == tokens
    nxt = env.step(td.set("action", td["support_ids"][:, 0]))["next"]
    policy(nxt)  # one new token per row: a one-column step
    assert policy.lm.forward_tokens - tokens == 3


def test_support_action_space(teacher, student):
    env = make_env(teacher, action_space="support")
    policy = StudentPolicy(student, action_space="support", seed=0, return_logits=True)
    rollout = env.rollout(6, policy, break_when_any_done=False)
    assert rollout["support_mask"].gather(-1, rollout["action"].unsqueeze(-1)).all()
    q = (
        rollout["logits"]
        .gather(-1, rollout["support_ids"])
        .masked_fill(~rollout["support_mask"], float("-inf"))
    )
    expected = torch.log_softmax(q, -1).gather(-1, rollout["action"].unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(rollout["action_log_prob"], expected)


def test_collector_batches_convert_to_offline_format(teacher, student):
    env = make_env(teacher)
    collector = Collector(
        env,
        StudentPolicy(student, seed=0),
        frames_per_batch=30,
        total_frames=60,
        auto_register_policy_transforms=False,
    )
    sizes = []
    for batch in collector:
        assert batch.batch_size == torch.Size([3, 10])
        assert batch["action_mask"].gather(-1, batch["action"].unsqueeze(-1)).all()
        offline = episodes_to_batch(batch)
        assert offline["response_mask"].any(-1).all()
        sizes.append(offline.batch_size[0])
    collector.shutdown()
    assert len(sizes) == 2 and min(sizes) >= 3


def test_bad_input(teacher, student):
    with pytest.raises(ValueError, match="temperature"):
        StudentPolicy(student, temperature=0.0)
    with pytest.raises(ValueError, match="action_space"):
        StudentPolicy(student, action_space="tokens")
    other = tiny_causal_lm(vocab_size=V + 8, seed=4)
    td = make_env(teacher).reset()
    with pytest.raises(ValueError, match="must share a tokenizer"):
        StudentPolicy(other)(td)
    with pytest.raises(ValueError, match=r"\[B, L\]"):
        StudentPolicy(student)(td.unsqueeze(0))


def test_inverse_cdf_sampling_matches_the_distribution(student):
    """Frequencies of 4000 draws vs the masked softmax (a chi-square-free tolerance check)."""
    policy = StudentPolicy(student, seed=0)
    log_probs = torch.log_softmax(torch.tensor([[0.0, 1.0, float("-inf"), 2.0, float("-inf")]]), -1)
    draws = torch.cat([policy._sample(log_probs) for _ in range(4000)])
    assert not torch.isin(draws, torch.tensor([2, 4])).any()
    frequencies = torch.bincount(draws, minlength=5).float() / 4000
    torch.testing.assert_close(frequencies, log_probs.exp()[0], atol=0.03, rtol=0)
