"""`tdkd bench step`: seconds per training step of BD vs KD from the cache, and of KD from the
cache vs KD running the teacher live each step (as TRL and DistiLLM train).

On the same cached batches and the same student, three modes: ``kd_cached`` (forward KL on the
cached nucleus), ``bd_cached`` (Bellman Distill on the cached nucleus) and ``kd_live``
(full-vocabulary forward KL with the teacher's logits computed every step). One step = read the
batch from the cache, student forward, loss, backward, AdamW step. Seconds per step are medians
over ``--steps`` rounds timed in one process, one step of each mode per round on the same
batch, so that load from other processes hits the modes alike; each mode's peak RSS comes from
its own fresh process running ``--warmup`` + 1 steps alone. Prints one JSON line::

    {"bd_over_kd": ..., "cached_over_live": ..., "sec_per_step": {...}, "peak_rss_mb": {...}, ...}

Goals (issue 5): bd_over_kd <= 1.15, cached_over_live <= 0.6. Without ``--cache`` a small cache
is built first from the teacher (synthetic prompts, sampled responses; kept when ``--cache``
names a folder that does not exist yet, so a second run reuses it). Each mode's peak RSS
includes importing torch/transformers and loading the student (and, live, the teacher).
"""

from __future__ import annotations

import argparse
import json
import logging

log = logging.getLogger(__name__)

MODES = ("kd_cached", "bd_cached", "kd_live")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cache",
        help="a teacher cache; when the folder does not exist a small one is built there first "
        "(default: built in a temp folder)",
    )
    parser.add_argument("--teacher", default="smollm2-135m-instruct", help="the cache's teacher")
    parser.add_argument("--student", default="layers:2", help="student spec (load_student)")
    parser.add_argument("--p", type=float, default=None, help="nucleus mass (<= p_store)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5, help="timed rounds (median)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per mode")
    parser.add_argument(
        "--rows", type=int, default=8, help="rows of the cache built without --cache"
    )
    parser.add_argument(
        "--max-new-tokens", type=int, default=48, help="response length (built cache)"
    )
    parser.add_argument("--json", action="store_true", help="print only the JSON line")


def _build_cache(teacher, tokenizer, path, rows: int, max_new_tokens: int):
    import torch

    from tdkd.cache import build_cache
    from tdkd.data import format_prompt, sample_responses, synthetic_prompts

    prompts = [format_prompt(tokenizer, r["prompt"]) for r in synthetic_prompts(rows, seed=0)]
    responses, terminated = sample_responses(
        teacher,
        prompts,
        max_new_tokens=max_new_tokens,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        generator=torch.Generator().manual_seed(0),
    )
    records = [
        dict(row_id=i, split="train", prompt_ids=p, response_ids=r, terminated=t)
        for i, (p, r, t) in enumerate(zip(prompts, responses, terminated, strict=True))
    ]
    return build_cache(teacher, tokenizer, records, path, p_store=0.95)


def _setup(modes: tuple[str, ...], spec: dict):
    """(cache, student, optimizer, {mode: loss module}) in this process."""
    import torch
    from transformers import AutoModelForCausalLM

    import agents
    from tdkd.cache import TeacherCache

    cache = TeacherCache(spec["cache"], verify=False)
    student = AutoModelForCausalLM.from_pretrained(spec["student_dir"]).train()
    losses = {}
    for mode in modes:
        if mode == "kd_live":
            from tdkd.models import load_teacher

            teacher, _ = load_teacher(spec["teacher"])
            losses[mode] = agents.make("kd", student, vocab="full", teacher=teacher)
        else:
            name = "bd" if mode == "bd_cached" else "kd"
            losses[mode] = agents.make(name, student, p=spec["p"])
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-6)
    return cache, optimizer, losses


def _step(cache, optimizer, loss_module, rows, p) -> float:
    """One training step (cache read, forward, loss, backward, AdamW); its seconds."""
    import time

    start = time.perf_counter()
    batch = cache.batch(rows, p=p)
    optimizer.zero_grad(set_to_none=True)
    out = loss_module(batch)
    loss = sum(out.get(k).mean() for k in out.keys() if k.startswith("loss_"))
    loss.backward()
    optimizer.step()
    return time.perf_counter() - start


def peak_rss(mode: str, spec: dict) -> float:
    """Peak RSS (MiB) of a process that runs ``warmup + 1`` steps of ``mode`` alone."""
    import resource

    cache, optimizer, losses = _setup((mode,), spec)
    for i in range(spec["warmup"] + 1):
        _step(cache, optimizer, losses[mode], spec["batches"][i % len(spec["batches"])], spec["p"])
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def interleaved_seconds(spec: dict) -> dict[str, float]:
    """Median seconds per step of every mode, timed in rounds (one step of each mode per
    round, same batch) so that load from other processes hits all modes alike."""
    import statistics

    cache, optimizer, losses = _setup(MODES, spec)
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    for i in range(spec["warmup"] + spec["steps"]):
        rows = spec["batches"][i % len(spec["batches"])]
        for mode in MODES:
            seconds = _step(cache, optimizer, losses[mode], rows, spec["p"])
            if i >= spec["warmup"]:
                times[mode].append(seconds)
    return {mode: statistics.median(values) for mode, values in times.items()}


def _child(task: str, spec: dict, queue) -> None:
    try:
        value = interleaved_seconds(spec) if task == "time" else peak_rss(task, spec)
        queue.put(("ok", value))
    except BaseException as err:  # reported to the parent, which raises
        queue.put(("error", f"{type(err).__name__}: {err}"))


def _in_child(context, task: str, spec: dict):
    queue = context.Queue()
    process = context.Process(target=_child, args=(task, spec, queue))
    process.start()
    status, value = queue.get()
    process.join()
    if status != "ok":
        raise RuntimeError(f"bench step {task} failed: {value}")
    log.info("%s: %s", task, value)
    return value


def run(args: argparse.Namespace) -> int:
    import multiprocessing as mp
    import tempfile
    from pathlib import Path

    from tdkd.cache import TeacherCache, teacher_fingerprint
    from tdkd.models import load_student, load_teacher

    for name in ("batch_size", "steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    with tempfile.TemporaryDirectory(prefix="tdkd-bench-step-") as tmp:
        teacher, tokenizer = load_teacher(args.teacher)
        cache_path = Path(args.cache) if args.cache else Path(tmp) / "cache"
        if not cache_path.exists():
            _build_cache(teacher, tokenizer, cache_path, args.rows, args.max_new_tokens)
        cache = TeacherCache(cache_path, expect=teacher_fingerprint(teacher, tokenizer))
        if args.p is not None and args.p > cache.p_store:
            raise ValueError(f"--p {args.p} is above the cache's p_store={cache.p_store}")
        student, _ = load_student(args.student, teacher=teacher, tokenizer=tokenizer)
        student.save_pretrained(Path(tmp) / "student")
        del teacher, student
        rows = cache.indices(None).tolist()
        if len(rows) < args.batch_size:
            raise ValueError(f"the cache has {len(rows)} rows, fewer than --batch-size")
        batches = [
            rows[i : i + args.batch_size]
            for i in range(0, len(rows) - args.batch_size + 1, args.batch_size)
        ]
        probe = cache.batch(batches[0], p=args.p)
        spec = {
            "cache": str(cache_path),
            "student_dir": str(Path(tmp) / "student"),
            "teacher": args.teacher,
            "p": args.p,
            "batches": batches,
            "steps": args.steps,
            "warmup": args.warmup,
        }
        context = mp.get_context("spawn")
        seconds = _in_child(context, "time", spec)
        peak = {mode: _in_child(context, mode, spec) for mode in MODES}
    sec = {m: round(v, 4) for m, v in seconds.items()}
    line = {
        "bd_over_kd": round(sec["bd_cached"] / sec["kd_cached"], 3),
        "cached_over_live": round(sec["kd_cached"] / sec["kd_live"], 3),
        "sec_per_step": sec,
        "peak_rss_mb": peak,
        "batch_size": args.batch_size,
        "seq_len": int(probe["tokens"].shape[1]),
        "support_width": int(probe["support_ids"].shape[-1]),
        "p": args.p if args.p is not None else cache.p_store,
        "student": args.student,
        "goals": {"bd_over_kd": 1.15, "cached_over_live": 0.6},
    }
    print(json.dumps(line))
    return 0
