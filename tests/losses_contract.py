"""Shared helpers for the loss tests: a synthetic offline batch and the contract test base class.

``make_offline_batch`` builds exactly what the cache loader produces (see the issue contract)
from a tiny random teacher, so every loss test reads the same format as training does.
``LossContract`` is the TorchRL-style contract every loss test class inherits: the input
tensordict is unchanged, gradients reach only the student, state_dict round-trips,
reduction="none" keeps the batch shape, a tensordict call equals a keyword call, and a few
gradient steps lower the loss.
"""

from __future__ import annotations

import copy

import pytest
import torch
from tensordict import TensorDict

from tdkd.models import tiny_causal_lm
from tdkd.topp import top_p_support

VOCAB = 32
EOS = 1
PAD = 0


def tiny_student(seed: int = 0, vocab: int = VOCAB):
    return tiny_causal_lm(vocab, hidden_size=16, num_layers=1, num_heads=2, seed=seed)


def make_offline_batch(**kwargs) -> TensorDict:
    """An offline batch (cached per arguments; each call returns a fresh clone)."""
    if kwargs.get("teacher") is not None:
        return _build_offline_batch(**kwargs)
    key = tuple(sorted(kwargs.items()))
    if key not in _BATCHES:
        _BATCHES[key] = _build_offline_batch(**kwargs)
    return _BATCHES[key].clone()


_BATCHES: dict[tuple, TensorDict] = {}


@torch.no_grad()
def _build_offline_batch(
    *,
    batch_size: int = 3,
    prompt_len: int = 3,
    max_new: int = 5,
    p_store: float = 0.9,
    vocab: int = VOCAB,
    seed: int = 0,
    teacher=None,
    max_support: int | None = None,
    sharpness: float = 3.0,
    eos_boost: float = 3.0,
) -> TensorDict:
    """An offline batch: teacher-sampled responses (nucleus sampling at p_store) + supports."""
    gen = torch.Generator().manual_seed(seed)
    model = teacher or tiny_causal_lm(
        vocab, hidden_size=16, num_layers=1, num_heads=2, seed=seed + 1
    )

    def teacher_logits(ids, attention_mask=None):
        # a random tiny LM is nearly uniform: sharpen it so nuclei are small, as real ones are
        out = model(ids, attention_mask=attention_mask).logits.float()
        out = (out - out.mean(-1, keepdim=True)) / out.std(-1, keepdim=True) * sharpness
        out[..., EOS] += eos_boost
        return out

    tokens = torch.randint(2, vocab, (batch_size, prompt_len), generator=gen)
    done = torch.zeros(batch_size, dtype=torch.bool)
    lengths = torch.zeros(batch_size, dtype=torch.long)
    for _ in range(max_new):
        logits = teacher_logits(tokens)[:, -1]
        support = top_p_support(logits, p_store)
        probs = support.log_probs.exp() * support.mask
        pick = torch.multinomial(probs, 1, generator=gen).squeeze(-1)
        nxt = support.ids.gather(-1, pick.unsqueeze(-1)).squeeze(-1)
        nxt = torch.where(done, torch.full_like(nxt, PAD), nxt)
        lengths += (~done).long()
        done = done | (nxt == EOS)
        tokens = torch.cat([tokens, nxt.unsqueeze(-1)], dim=-1)
    length = tokens.shape[1]
    positions = torch.arange(length)
    response = (positions >= prompt_len) & (positions < prompt_len + lengths.unsqueeze(-1))
    attention = positions < prompt_len + lengths.unsqueeze(-1)
    logits = teacher_logits(tokens, attention.long())  # [B, L, V]
    log_probs = torch.log_softmax(logits.float(), -1)
    # position i holds the nucleus of the state before token i: teacher logits at i - 1
    sup = top_p_support(logits[:, :-1], p_store, max_support=max_support)
    k = sup.ids.shape[-1]
    ids = torch.zeros(batch_size, length, k, dtype=torch.long)
    lp = torch.full((batch_size, length, k), float("-inf"))
    mask = torch.zeros(batch_size, length, k, dtype=torch.bool)
    ids[:, 1:], lp[:, 1:], mask[:, 1:] = sup.ids, sup.log_probs, sup.mask
    mask &= response.unsqueeze(-1)
    ids = torch.where(mask, ids, torch.zeros_like(ids))
    lp = lp.masked_fill(~mask, float("-inf"))
    teacher_lp = torch.zeros(batch_size, length)
    teacher_lp[:, 1:] = log_probs[:, :-1].gather(-1, tokens[:, 1:].unsqueeze(-1)).squeeze(-1)
    covered = torch.zeros(batch_size, length)
    covered[:, 1:] = sup.covered_mass
    return TensorDict(
        {
            "tokens": tokens,
            "attention_mask": attention,
            "response_mask": response,
            "support_ids": ids,
            "support_log_probs": lp,
            "support_mask": mask,
            "teacher_log_prob": teacher_lp * response,
            "covered_mass": covered * response,
            "terminated": done,
            "teacher_logits": logits,
        },
        batch_size=[batch_size],
    )


def logits_gradient_on_nucleus(loss, student, td: TensorDict, key: str):
    """(d loss[key] / d student logits [B, L, V], the dense nucleus mask [B, L-1, V]).

    The loss is fed the student's own logits (its ``_logits`` hooked), so their gradient can be
    read; grad[:, i] and dense[:, i] are both at the state before token i + 1 (the step grid).
    """
    from tdkd.topp import support_to_mask

    logits = student(td["tokens"], attention_mask=td["attention_mask"].long()).logits
    logits.retain_grad()
    loss._logits = lambda tensordict, params=None: logits
    loss(td)[key].backward()
    dense = support_to_mask(td["support_ids"][:, 1:], td["support_mask"][:, 1:], logits.shape[-1])
    return logits.grad, dense


def total_loss(out: TensorDict) -> torch.Tensor:
    return sum(v.sum() for k, v in out.items() if k.startswith("loss_"))


class LossContract:
    """Inherit and define ``make_loss(student)`` (and optionally ``make_batch()``)."""

    def make_loss(self, student, **kwargs):  # pragma: no cover - overridden
        raise NotImplementedError

    def make_batch(self) -> TensorDict:
        return make_offline_batch()

    def test_input_unchanged(self):
        loss = self.make_loss(tiny_student())
        td = self.make_batch()
        before = td.clone()
        total_loss(loss(td)).backward()
        assert set(td.keys(True, True)) == set(before.keys(True, True))
        for key in before.keys(True, True):
            torch.testing.assert_close(td.get(key), before.get(key), rtol=0, atol=0)

    def test_gradients_reach_only_the_student(self):
        student = tiny_student()
        loss = self.make_loss(student)
        out = loss(self.make_batch())
        for key, value in out.items():
            if not key.startswith("loss_"):
                assert not value.requires_grad, f"diagnostic {key} must be detached"
        total_loss(out).backward()
        student_ids = {id(p) for p in student.parameters()}
        grads = [p.grad for p in student.parameters() if p.grad is not None]
        assert grads and any(g.abs().sum() > 0 for g in grads)
        for name, buf in loss.named_buffers():
            assert buf.grad is None, name
        for name, param in loss.named_parameters():
            if id(param) not in student_ids:
                assert self.own_parameter_allowed(name), f"unexpected trainable {name}"

    def own_parameter_allowed(self, name: str) -> bool:
        return False

    def test_state_dict_round_trip(self):
        loss = self.make_loss(tiny_student(seed=0))
        other = self.make_loss(tiny_student(seed=5))
        other.load_state_dict(copy.deepcopy(loss.state_dict()))
        td = self.make_batch()
        a, b = loss(td), other(td)
        torch.testing.assert_close(total_loss(a), total_loss(b))

    def test_reduction_none_keeps_batch_shape(self):
        td = self.make_batch()
        loss_none = self.make_loss(tiny_student(), reduction="none")
        out = loss_none(td)
        assert out.batch_size == td.batch_size
        for key, value in out.items():
            assert value.shape[:1] == td.batch_size, key
        loss_mean = self.make_loss(tiny_student(), reduction="mean")
        assert all(v.dim() == 0 for v in loss_mean(td).values())

    def test_tensordict_call_equals_keyword_call(self):
        loss = self.make_loss(tiny_student())
        td = self.make_batch()
        out = loss(td)
        kwargs = {str(k): td.get(k) for k in loss.in_keys}
        values = loss(**kwargs)
        values = values if isinstance(values, tuple) else (values,)
        for key, value in zip(loss.out_keys, values, strict=True):
            torch.testing.assert_close(value, out.get(key))

    def test_one_step_lowers_the_loss(self):
        torch.manual_seed(0)
        student = tiny_student()
        loss = self.make_loss(student)
        td = self.make_batch()
        opt = torch.optim.Adam(loss.parameters(), lr=self.lr)
        start = total_loss(loss(td)).item()
        for _ in range(self.steps):
            opt.zero_grad()
            total_loss(loss(td)).backward()
            opt.step()
            self.after_step(loss)
        assert total_loss(loss(td)).item() < start

    lr = 1e-2
    steps = 1

    def after_step(self, loss) -> None:
        pass


@pytest.fixture
def offline_batch() -> TensorDict:
    return make_offline_batch()


class PositionLogits(torch.nn.Module):
    """A state = (tokens, position) packed as observation [..., L + 1]; returns the causal LM's
    output at that position: logits [..., V] (or a [...]-shaped value for a scalar network).

    This is how the sequence losses' networks become TorchRL's per-transition networks: a
    causal LM's output at position t only depends on tokens[:t+1], so it is the value of the
    state s_t whatever follows.
    """

    def __init__(self, model: torch.nn.Module, scalar: bool = False) -> None:
        super().__init__()
        self.model = model
        self.scalar = scalar

    def forward(self, observation: torch.Tensor) -> torch.Tensor:
        tokens, pos = observation[..., :-1].long(), observation[..., -1].long()
        out = self.model(input_ids=tokens) if self.scalar else self.model(input_ids=tokens).logits
        index = pos.reshape(-1, *([1] * (out.dim() - 1)))
        if self.scalar:
            return out.gather(1, index).squeeze(1).unsqueeze(-1)
        return out.gather(1, index.expand(-1, 1, out.shape[-1])).squeeze(1)


def flatten_transitions(td: TensorDict, keep: torch.Tensor, reward: torch.Tensor) -> TensorDict:
    """The batch's steps (b, t) with keep[b, t] as TorchRL transitions.

    observation = (tokens[b], t), action = tokens[b, t + 1], next observation = (tokens[b], t + 1),
    reward [N, 1], terminated = done = last response step of a terminated row.
    """
    tokens = td["tokens"]
    mask_t = td["response_mask"][:, 1:]
    last = mask_t.clone()
    last[:, :-1] &= ~mask_t[:, 1:]
    b, t = keep.nonzero(as_tuple=True)
    obs = torch.cat([tokens[b], t.unsqueeze(-1)], -1)
    nxt = torch.cat([tokens[b], (t + 1).unsqueeze(-1)], -1)
    term = (last[b, t] & td["terminated"][b]).unsqueeze(-1)
    return TensorDict(
        {
            "observation": obs,
            "action": tokens[b, t + 1],
            ("next", "observation"): nxt,
            ("next", "reward"): reward[b, t].unsqueeze(-1),
            ("next", "terminated"): term,
            ("next", "done"): term.clone(),
        },
        batch_size=[b.numel()],
    )
