"""``tdkd bench env``: rollout throughput of ``TopPTokenEnv`` + ``StudentPolicy`` (one JSON line).

Measures, in one process and one run (the CPU is shared, so only ratios are meaningful):

- ``tokens_per_s``: B * new_tokens / wall time of ``env.rollout`` with both KV caches;
- ``naive_tokens_per_s``: the same env and policy with ``kv_cache=False`` (every step re-runs
  the whole prefix through teacher and student), over its first ``--naive-steps`` steps. Later
  steps have longer prefixes and cost more, so ``speedup_vs_naive`` is a lower bound unless
  ``--naive-steps`` equals ``--new-tokens``;
- ``overhead_vs_raw``: share of the cached rollout's wall time spent outside the teacher's and
  the student's forward calls (nucleus ranking, masks, tensordict plumbing, cache splicing).

Models: ``--teacher`` (default the embedded SmolLM2-135M-Instruct via ``tdkd.models.load_teacher``)
and ``--student`` (a ``load_student`` spec, default ``layers:6``). ``--teacher config`` builds a
random Llama of the same shape from a config instead (no weights needed).
"""

from __future__ import annotations

import argparse
import json
import logging
import time

logger = logging.getLogger(__name__)

BENCH_PROMPTS = (
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain why the sky is blue in two sentences.",
    "Give three tips for learning a new language.",
    "What does a compiler do?",
    "Summarise the plot of Romeo and Juliet.",
    "How do vaccines work?",
    "Name a few uses of a paperclip.",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--teacher", default="smollm2-135m-instruct", help="teacher name/folder, or 'config'"
    )
    parser.add_argument(
        "--student", default="layers:6", help="student spec for tdkd.models.load_student"
    )
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument(
        "--naive-steps", type=int, default=16, help="steps of the naive rollout timed"
    )
    parser.add_argument("--p", type=float, default=0.8)
    parser.add_argument("--max-support", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (default: torch's)"
    )
    parser.add_argument("--json", action="store_true", help="print only the JSON line")


def _models(args):
    import torch

    from tdkd import models

    if args.teacher == "config":
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
            num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
            eos_token_id=2, pad_token_id=2, tie_word_embeddings=True,
        )  # fmt: skip
        torch.manual_seed(args.seed)
        teacher = LlamaForCausalLM(config).eval()
        student = models.student_from_config(teacher, hidden_size=576, num_layers=6, num_heads=9)
        gen = torch.Generator().manual_seed(args.seed)
        prompts = [
            torch.randint(3, 49152, (int(n),), generator=gen).tolist() for n in range(12, 36, 3)
        ]
        return (
            teacher,
            student.eval(),
            prompts,
            "config:smollm2-135m-shape(random)",
            "config:6-layer",
        )
    teacher, tokenizer = models.load_teacher(args.teacher)
    student, _ = models.load_student(args.student, teacher=teacher, tokenizer=tokenizer)
    prompts = []
    for text in BENCH_PROMPTS:
        messages = [{"role": "user", "content": text}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        prompts.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    return teacher, student.eval(), prompts, args.teacher, args.student


def _rollout(teacher, student, prompts, args, steps: int, kv_cache: bool):
    import torch

    from envs.policy import StudentPolicy
    from envs.token_env import TopPTokenEnv

    env = TopPTokenEnv(
        teacher, prompts, batch_size=args.batch, p=args.p, max_new_tokens=args.new_tokens,
        max_support=args.max_support, kv_cache=kv_cache, seed=args.seed,
    )  # fmt: skip
    policy = StudentPolicy(
        student, kv_cache=kv_cache, pad_token_id=env.pad_token_id, seed=args.seed
    )
    with torch.no_grad():
        env.rollout(2, policy, break_when_any_done=False)  # warm-up (allocator, threads)
        env.lm.forward_seconds = policy.lm.forward_seconds = 0.0
        policy.reset_cache()
        start = time.perf_counter()
        td = env.rollout(steps, policy, break_when_any_done=False)
        wall = time.perf_counter() - start
    raw = env.lm.forward_seconds + policy.lm.forward_seconds
    return td, wall, raw


def run(args: argparse.Namespace) -> int:
    import torch

    if args.batch < 1 or args.new_tokens < 1 or not 1 <= args.naive_steps <= args.new_tokens:
        raise ValueError(
            f"need --batch >= 1, --new-tokens >= 1 and 1 <= --naive-steps <= --new-tokens, got "
            f"{args.batch}, {args.new_tokens}, {args.naive_steps}"
        )
    if args.threads is not None:
        torch.set_num_threads(int(args.threads))  # the CLI's choice, asked for on the command line
    teacher, student, prompts, teacher_name, student_name = _models(args)
    logger.info("cached rollout: batch %d x %d new tokens", args.batch, args.new_tokens)
    td, wall, raw = _rollout(teacher, student, prompts, args, args.new_tokens, kv_cache=True)
    logger.info("cached rollout took %.1f s; naive rollout: %d steps", wall, args.naive_steps)
    _, naive_wall, _ = _rollout(teacher, student, prompts, args, args.naive_steps, kv_cache=False)
    tokens_per_s = args.batch * args.new_tokens / wall
    naive_tokens_per_s = args.batch * args.naive_steps / naive_wall
    result = {
        "bench": "env",
        "teacher": teacher_name,
        "student": student_name,
        "batch": args.batch,
        "new_tokens": args.new_tokens,
        "naive_steps": args.naive_steps,
        "p": args.p,
        "tokens_per_s": round(tokens_per_s, 2),
        "naive_tokens_per_s": round(naive_tokens_per_s, 2),
        "speedup_vs_naive": round(tokens_per_s / naive_tokens_per_s, 2),
        "overhead_vs_raw": round((wall - raw) / wall, 4),
        "rollout_s": round(wall, 2),
        "episodes_finished": int(td.get(("next", "done")).sum()),
        "mean_nucleus_size": round(float(td.get("nucleus_size").float().mean()), 1),
        "torch_threads": torch.get_num_threads(),
    }
    if not args.json:
        print(f"env bench: teacher {teacher_name}, student {student_name}, batch {args.batch}")
    print(json.dumps(result))
    return 0
