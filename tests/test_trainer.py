"""Offline trainer: schedule, diagnostics, accumulation, clipping, evaluation, export, logs.

The helpers here (``offline_batch``, ``CrossEntropyLoss``, ``make_trainer``) are shared with
test_checkpoint.py, test_distributed.py and test_distill_cli.py.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
from tensordict import TensorDict
from torchrl.objectives import LossModule

from agents.config import TrainConfig
from agents.trainer import (
    ListBatchSource,
    NonFiniteLossError,
    OfflineTrainer,
    support_diagnostics,
    total_loss,
    warmup_cosine_factor,
)
from tdkd.models import tiny_causal_lm
from tdkd.sequence import align_steps
from tdkd.topp import top_p_support

VOCAB = 32


# ------------------------------------------------------------------------------------------
# Shared helpers


def tiny_model(seed: int = 0):
    return tiny_causal_lm(VOCAB, hidden_size=16, num_layers=1, num_heads=2, seed=seed)


@torch.no_grad()
def offline_batch(
    teacher,
    *,
    batch_size: int = 4,
    prompt_len: int = 3,
    response_len: int = 5,
    p: float = 0.9,
    seed: int = 0,
    ragged: bool = False,
    eos_id: int | None = None,
    pad_id: int = 0,
) -> TensorDict:
    """A valid offline batch: prompts of random ids, responses sampled inside the teacher's
    nucleus token by token; supports from ``top_p_support`` at the state before each token.

    With ``ragged`` the i-th row keeps ``response_len - i % 2`` response tokens (the rest is
    padding); with ``eos_id`` rows whose sampled token is EOS stop there (terminated).
    """
    g = torch.Generator().manual_seed(seed)
    B, L = batch_size, prompt_len + response_len
    tokens = torch.full((B, L), pad_id, dtype=torch.int64)
    tokens[:, :prompt_len] = torch.randint(2, VOCAB, (B, prompt_len), generator=g)
    lengths = torch.tensor(
        [response_len - (i % 2 if ragged else 0) for i in range(B)], dtype=torch.int64
    )
    terminated = torch.zeros(B, dtype=torch.bool)
    response_mask = torch.zeros(B, L, dtype=torch.bool)
    supports = []
    for t in range(prompt_len, L):
        logits = teacher(input_ids=tokens[:, :t]).logits[:, -1]  # [B, V]
        support = top_p_support(logits, p)
        probs = support.log_probs.exp().masked_fill(~support.mask, 0.0)
        choice = torch.multinomial(probs, 1, generator=g).squeeze(-1)
        token = support.ids.gather(-1, choice[:, None]).squeeze(-1)
        active = (t - prompt_len < lengths) & ~terminated
        tokens[:, t] = torch.where(active, token, torch.full_like(token, pad_id))
        response_mask[:, t] = active
        if eos_id is not None:
            terminated |= active & (token == eos_id)
        supports.append(support)
    K = max(s.ids.shape[-1] for s in supports)
    support_ids = torch.zeros(B, L, K, dtype=torch.int64)
    support_log_probs = torch.full((B, L, K), float("-inf"))
    support_mask = torch.zeros(B, L, K, dtype=torch.bool)
    teacher_log_prob = torch.zeros(B, L)
    covered_mass = torch.zeros(B, L)
    for j, s in enumerate(supports):
        t, k = prompt_len + j, s.ids.shape[-1]
        active = response_mask[:, t]
        support_ids[:, t, :k] = torch.where(active[:, None], s.ids, 0)
        support_mask[:, t, :k] = s.mask & active[:, None]
        support_log_probs[:, t, :k] = s.log_probs.masked_fill(~support_mask[:, t, :k], -math.inf)
        hit = (s.ids == tokens[:, t, None]) & s.mask
        teacher_log_prob[:, t] = torch.where(
            active, (s.log_probs.masked_fill(~hit, 0.0)).sum(-1), 0.0
        )
        covered_mass[:, t] = torch.where(active, s.covered_mass, 0.0)
    attention_mask = torch.zeros(B, L, dtype=torch.bool)
    attention_mask[:, :prompt_len] = True
    attention_mask |= response_mask
    return TensorDict(
        {
            "tokens": tokens,
            "attention_mask": attention_mask,
            "response_mask": response_mask,
            "support_ids": support_ids,
            "support_log_probs": support_log_probs,
            "support_mask": support_mask,
            "teacher_log_prob": teacher_log_prob,
            "covered_mass": covered_mass,
            "terminated": terminated,
        },
        batch_size=[B],
    )


class CrossEntropyLoss(LossModule):
    """Stand-in loss for trainer tests: mean NLL of the response tokens (SFT).

    With ``noise`` every token's weight is multiplied by U(0.5, 1.5) drawn from the global torch
    RNG, so a resumed run only matches when the RNG state was restored.
    """

    def __init__(self, student, *, noise: bool = False, nan_at_call: int | None = None):
        super().__init__()
        self.student = student
        self.noise = noise
        self.nan_at_call = nan_at_call
        self.calls = 0

    def forward(self, td):
        self.calls += 1
        logits = self.student(
            input_ids=td["tokens"], attention_mask=td["attention_mask"].long()
        ).logits
        steps = align_steps(logits, td["tokens"], td["response_mask"])
        log_probs = torch.log_softmax(steps.q, -1).gather(-1, steps.actions[..., None])[..., 0]
        weight = steps.mask.float()
        if self.noise:
            weight = weight * (0.5 + torch.rand(weight.shape))
        nll = -(log_probs * weight).sum() / steps.mask.sum()
        if self.nan_at_call is not None and self.calls >= self.nan_at_call:
            nll = nll * float("nan")
        return TensorDict({"loss_ce": nll, "nll": nll.detach()}, [])


def make_batches(n: int = 4, *, batch_size: int = 4, seed: int = 0, **kwargs) -> list[TensorDict]:
    teacher = tiny_model(seed=123)
    return [
        offline_batch(teacher, batch_size=batch_size, seed=seed + i, **kwargs) for i in range(n)
    ]


def make_trainer(out_dir, batches, *, student_seed: int = 0, loss_kwargs=None, **config):
    student = tiny_model(seed=student_seed)
    loss = CrossEntropyLoss(student, **(loss_kwargs or {}))
    defaults = dict(max_steps=4, lr=1e-2, tensorboard=False, checkpoint_every=2, debug_every=1)
    config = TrainConfig(**(defaults | config))
    trainer = OfflineTrainer(
        loss, student, ListBatchSource(batches, seed=1), config=config, out_dir=out_dir
    )
    return trainer, student


def read_metrics(out_dir) -> list[tuple[int, str, float]]:
    with open(Path(out_dir) / "metrics.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["step", "name", "value"]
    return [(int(s), n, float(v)) for s, n, v in rows[1:]]


# ------------------------------------------------------------------------------------------
# Pure helpers


@pytest.mark.parametrize("warmup,total,min_ratio", [(3, 10, 0.0), (2, 7, 0.1), (0, 5, 0.2)])
def test_warmup_cosine_matches_torch_schedulers(warmup, total, min_ratio):
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=1.0)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(
        opt, T_max=total - warmup, eta_min=min_ratio
    )
    if warmup:
        linear = torch.optim.lr_scheduler.LinearLR(
            opt, start_factor=1 / warmup, end_factor=1.0, total_iters=max(warmup - 1, 1)
        )
        sched = torch.optim.lr_scheduler.SequentialLR(opt, [linear, cosine], milestones=[warmup])
    else:
        sched = cosine
    expected = []
    for _ in range(total):
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    got = [
        warmup_cosine_factor(t, warmup_steps=warmup, max_steps=total, min_lr_ratio=min_ratio)
        for t in range(total)
    ]
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected))
    assert warmup_cosine_factor(total + 5, warmup_steps=warmup, max_steps=total) == 0.0


def _diagnostics_reference(logits, batch):
    """Loops over rows and response positions; the state before token i is logits[:, i-1]."""
    sums: dict[str, float] = {}
    count = 0
    B, L = batch["tokens"].shape
    for b in range(B):
        for i in range(1, L):
            if not batch["response_mask"][b, i]:
                continue
            count += 1
            q = logits[b, i - 1].double()
            keep = batch["support_mask"][b, i]
            ids = batch["support_ids"][b, i][keep]
            teacher = batch["support_log_probs"][b, i][keep].double()
            qs = q[ids]
            v_p, v = torch.logsumexp(qs, 0), torch.logsumexp(q, 0)
            ls, lt = qs - v_p, teacher - torch.logsumexp(teacher, 0)
            a = batch["tokens"][b, i]
            values = {
                "support_size": float(len(ids)),
                "covered_mass": float(batch["covered_mass"][b, i]),
                "q_action": float(q[a]),
                "q_max": float(q.max()),
                "v_p": float(v_p),
                "v_full": float(v),
                "student_nucleus_mass": float(torch.exp(v_p - v)),
                "kl_fwd_p": float((lt.exp() * (lt - ls)).sum()),
                "kl_rev_p": float((ls.exp() * (ls - lt)).sum()),
                "token_nll": float(v - q[a]),
            }
            for k, val in values.items():
                sums[k] = sums.get(k, 0.0) + val
    return {k: v / count for k, v in sums.items()}


@pytest.mark.parametrize("p", [1e-3, 0.7, 1.0])
@pytest.mark.parametrize("ragged", [False, True])
def test_support_diagnostics_matches_loop_reference(p, ragged):
    teacher = tiny_model(seed=5)
    batch = offline_batch(teacher, batch_size=3, p=p, ragged=ragged, seed=2)
    logits = torch.randn(*batch["tokens"].shape, VOCAB) * 3
    got = support_diagnostics(logits, batch)
    want = _diagnostics_reference(logits, batch)
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-5, msg=key)
    if p == 1e-3:  # single-token supports: the student's nucleus policy is the teacher's
        assert got["support_size"] == 1.0
        assert abs(got["kl_fwd_p"]) < 1e-6 and abs(got["kl_rev_p"]) < 1e-6


def test_support_diagnostics_kl_zero_at_teacher_and_positive_otherwise():
    teacher = tiny_model(seed=5)
    batch = offline_batch(teacher, batch_size=3, p=0.9, seed=4)
    with torch.no_grad():
        logits = teacher(input_ids=batch["tokens"]).logits
    at_teacher = support_diagnostics(logits, batch)
    assert abs(at_teacher["kl_fwd_p"]) < 1e-5 and abs(at_teacher["kl_rev_p"]) < 1e-5
    other = support_diagnostics(logits + torch.randn_like(logits), batch)
    assert other["kl_fwd_p"] > 1e-3 and other["kl_rev_p"] > 1e-3


def test_total_loss_sums_loss_entries_only():
    td = TensorDict({"loss_a": torch.tensor(1.5), "loss_b": torch.tensor(2.0), "x": 9.0}, [])
    assert float(total_loss(td)) == 3.5
    with pytest.raises(ValueError, match="no loss_"):
        total_loss(TensorDict({"x": torch.tensor(1.0)}, []))


# ------------------------------------------------------------------------------------------
# The trainer


def test_training_lowers_loss_logs_namespaced_metrics_and_exports(tmp_path):
    from transformers import AutoModelForCausalLM

    batches = make_batches(2)
    trainer, student = make_trainer(
        tmp_path, batches, max_steps=12, tensorboard=True, export="last", warmup_steps=2
    )
    result = trainer.train()
    assert result.step == 12
    assert result.losses[-1] < 0.9 * result.losses[0]
    names = {n for _, n, _ in read_metrics(tmp_path)}
    assert {"losses/total", "losses/loss_ce", "charts/lr", "charts/grad_norm"} <= names
    assert {"debug/nll", "debug/support_size", "debug/covered_mass", "debug/kl_fwd_p"} <= names
    assert {"debug/kl_rev_p", "debug/v_p", "debug/q_action", "charts/token_nll"} <= names
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "student")
    for (name, a), b in zip(
        student.state_dict().items(), loaded.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, msg=name)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]


def test_a_fresh_run_refuses_a_folder_that_holds_checkpoints(tmp_path):
    batches = make_batches(2)
    trainer, _ = make_trainer(tmp_path, batches, max_steps=2, export="last")
    trainer.train()
    again, _ = make_trainer(tmp_path, batches, max_steps=2, export="last")
    with pytest.raises(ValueError, match=r"already holds checkpoints \[2\].*resume=True"):
        again.train(resume=False)
    assert again.train(resume=True).step == 2  # resuming the same run is fine


def test_lr_follows_the_schedule(tmp_path):
    lrs = []
    trainer, _ = make_trainer(
        tmp_path, make_batches(1), max_steps=6, warmup_steps=2, min_lr_ratio=0.1, lr=0.5
    )
    trainer.train(on_step=lambda step, m: lrs.append(m["charts/lr"]))
    want = [
        0.5 * warmup_cosine_factor(t, warmup_steps=2, max_steps=6, min_lr_ratio=0.1)
        for t in range(6)
    ]
    torch.testing.assert_close(torch.tensor(lrs), torch.tensor(want))


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    b1, b2 = make_batches(2, batch_size=2)
    big = TensorDict.cat([b1, b2], dim=0)
    accum, student_a = make_trainer(tmp_path / "a", [b1, b2], max_steps=1, grad_accum=2)
    accum.data.shuffle = False
    accum.train()
    single, student_b = make_trainer(tmp_path / "b", [big], max_steps=1)
    single.train()
    for a, b in zip(student_a.parameters(), student_b.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_gradients_are_clipped(tmp_path):
    norms = []
    trainer, student = make_trainer(tmp_path, make_batches(1), max_steps=2, max_grad_norm=1e-3)

    def after(step, metrics):
        grad = torch.cat([p.grad.reshape(-1) for p in student.parameters() if p.grad is not None])
        norms.append((metrics["charts/grad_norm"], float(grad.norm())))

    trainer.train(on_step=after)
    for before, after_clip in norms:
        assert before > 1e-3  # the raw norm is reported
        assert after_clip <= 1e-3 * (1 + 1e-4)


def test_evaluation_keeps_the_best_checkpoint_and_exports_it(tmp_path):
    from transformers import AutoModelForCausalLM

    scores = iter([3.0, 1.0, 2.0])
    snapshots = {}
    trainer, student = make_trainer(
        tmp_path,
        make_batches(2),
        max_steps=6,
        eval_every=2,
        checkpoint_every=0,
        keep_last=1,
        log_every=5,  # evaluations are logged whatever log_every says
    )
    trainer.evaluator = lambda: {"eval/loss": next(scores)}
    trainer.train(
        on_step=lambda step, m: snapshots.__setitem__(
            step, {k: v.clone() for k, v in student.state_dict().items()}
        )
    )
    assert (trainer.best_step, trainer.best_value) == (4, 1.0)
    assert trainer.checkpoints.best().name == "step_00000004"
    assert trainer.checkpoints.steps() == [4, 6]  # keep_last=1 plus the best
    rows = [(s, v) for s, n, v in read_metrics(tmp_path) if n == "eval/loss"]
    assert rows == [(2, 3.0), (4, 1.0), (6, 2.0)]
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "student")
    for name, value in loaded.state_dict().items():
        torch.testing.assert_close(value, snapshots[4][name], msg=name)
    # the live student is left at the final state
    torch.testing.assert_close(student.state_dict(), snapshots[6])


def test_unknown_best_metric_is_a_clear_error(tmp_path):
    trainer, _ = make_trainer(tmp_path, make_batches(1), max_steps=2, eval_every=1)
    trainer.evaluator = lambda: {"eval/other": 1.0}
    with pytest.raises(ValueError, match="best_metric='eval/loss'"):
        trainer.train()


def test_nan_loss_stops_with_clear_error_and_keeps_last_good_checkpoint(tmp_path):
    trainer, _ = make_trainer(
        tmp_path, make_batches(2), max_steps=10, checkpoint_every=2, loss_kwargs={"nan_at_call": 4}
    )
    with pytest.raises(NonFiniteLossError, match=r"became nan at step 4.*step_00000002"):
        trainer.train()
    assert trainer.checkpoints.steps() == [2]
    assert not (tmp_path / "student").exists()


def test_bad_config_values_are_rejected():
    with pytest.raises(ValueError, match="grad_accum"):
        TrainConfig(grad_accum=0)
    with pytest.raises(ValueError, match="best_mode"):
        TrainConfig(best_mode="lowest")


# ------------------------------------------------------------------------------------------
# The online trainer


def test_collate_rows_pads_each_field_like_a_loop():
    from agents.online import collate_rows

    teacher = tiny_model(seed=3)
    short = offline_batch(teacher, batch_size=2, response_len=2, p=0.5, seed=1)
    long = offline_batch(teacher, batch_size=1, response_len=4, p=0.99, seed=2)
    rows = [*short.unbind(0), *long.unbind(0)]
    out = collate_rows(rows, pad_token_id=7)
    L = max(r["tokens"].shape[0] for r in rows)
    K = max(r["support_ids"].shape[-1] for r in rows)
    assert out.batch_size == torch.Size([3]) and out["support_ids"].shape == (3, L, K)
    fills = {"tokens": 7, "support_log_probs": -math.inf, "support_mask": False}
    for i, row in enumerate(rows):
        for key in row.keys():
            value = row[key]
            if value.dim() == 0:
                assert out[key][i] == value
                continue
            for pos in range(L):
                for k in range(K if value.dim() == 2 else 1):
                    inside = pos < value.shape[0] and (value.dim() == 1 or k < value.shape[1])
                    got = out[key][i, pos, k] if value.dim() == 2 else out[key][i, pos]
                    if inside:
                        want = value[pos, k] if value.dim() == 2 else value[pos]
                    else:
                        want = fills.get(key, 0)
                    assert float(got) == float(want), (key, i, pos, k)


def test_online_soft_q_trains_from_collected_episodes(tmp_path):
    import functools

    from transformers import AutoModelForCausalLM

    import agents
    from agents.config import OnlineConfig
    from agents.online import OnlineTrainer
    from envs import StudentPolicy, TopPTokenEnv, episodes_to_batch
    from tdkd.models import tiny_teacher_student

    teacher, student, _ = tiny_teacher_student(seed=0)
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    env = TopPTokenEnv(
        teacher, prompts, batch_size=2, p=0.9, max_new_tokens=4, max_support=None, seed=0
    )
    policy = StudentPolicy(student, seed=0, pad_token_id=env.pad_token_id)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    trainer = OnlineTrainer(
        agents.make("sqn", student),
        student,
        env,
        policy,
        to_batch=functools.partial(episodes_to_batch, pad_token_id=env.pad_token_id),
        config=TrainConfig(max_steps=3, lr=1e-2, tensorboard=False, debug_every=3, export="last"),
        online=OnlineConfig(frames_per_batch=16, batch_size=4, updates_per_collect=2),
        out_dir=tmp_path,
        pad_token_id=env.pad_token_id,
    )
    assert trainer.target_updater is not None  # soft Q has a target network
    result = trainer.train()
    assert result.step == 3 and all(math.isfinite(x) for x in result.losses)
    assert trainer.frames == 16 * 2 and trainer.episodes == len(trainer.buffer) > 0
    assert any(not torch.equal(before[k], v) for k, v in student.state_dict().items())
    names = {n for _, n, _ in read_metrics(tmp_path)}
    assert {"losses/loss_qvalue", "charts/frames", "charts/episodes", "debug/kl_fwd_p"} <= names
    AutoModelForCausalLM.from_pretrained(tmp_path / "student")
    assert trainer.checkpoints.load()["online"] == {"frames": 32, "episodes": trainer.episodes}
