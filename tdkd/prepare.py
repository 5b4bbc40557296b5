"""`tdkd prepare`: prompts -> teacher responses -> sparse top-p teacher cache, in one command.

Output folder (``--out``)::

    config.json      the resolved PrepareConfig
    responses/       teacher responses (Arrow, resumable: rerun the same command after a crash)
    cache/           the sparse teacher cache (tdkd.cache.TeacherCache)
    summary.json     rows, tokens, support sizes at p in {0.5, 0.8, 0.95}, bytes, stage times

The default size (64 prompts x 2 samples x <= 64 new tokens, half chatterbot, half synthetic)
is sized for ~5-10 minutes on 2 CPU cores with the embedded teacher.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

from tdkd.io import write_json_atomic


@dataclass
class PrepareConfig:
    """Everything that decides what `tdkd prepare` produces."""

    out: str = "runs/prepare"
    teacher: str = "smollm2-135m-instruct"
    prompts: int = 64
    sources: tuple[str, ...] = ("chatterbot", "synthetic")
    jsonl: tuple[str, ...] = ()
    samples: int = 2
    max_new_tokens: int = 64
    max_prompt_tokens: int = 96
    temperature: float = 1.0
    top_p: float | None = None  # sampling nucleus; None = p_store (every action in the cache)
    p_store: float = 0.95
    max_support: int | None = None
    gen_batch_size: int = 32
    score_batch_size: int = 8
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    seed: int = 0
    stats_p: tuple[float, ...] = field(default=(0.5, 0.8, 0.95))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = PrepareConfig()
    parser.add_argument("--out", default=d.out, help="output folder (default %(default)s)")
    parser.add_argument("--teacher", default=d.teacher, help="embedded teacher name or HF folder")
    parser.add_argument("--prompts", type=int, default=d.prompts, help="number of prompts")
    parser.add_argument(
        "--sources",
        default=",".join(d.sources),
        help="comma list of chatterbot, synthetic (default %(default)s)",
    )
    parser.add_argument(
        "--jsonl", action="append", default=[], help="Dolly/MiniLLM JSONL prompt file (repeatable)"
    )
    parser.add_argument("--samples", type=int, default=d.samples, help="responses per prompt (K)")
    parser.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    parser.add_argument(
        "--max-prompt-tokens",
        type=int,
        default=d.max_prompt_tokens,
        help="longer prompts (after chat formatting) are skipped",
    )
    parser.add_argument("--temperature", type=float, default=d.temperature)
    parser.add_argument(
        "--top-p", type=float, default=None, help="sampling nucleus (default p_store)"
    )
    parser.add_argument(
        "--p-store", type=float, default=d.p_store, help="largest p the cache serves"
    )
    parser.add_argument("--max-support", type=int, default=None, help="cap on stored supports")
    parser.add_argument("--gen-batch-size", type=int, default=d.gen_batch_size)
    parser.add_argument("--score-batch-size", type=int, default=d.score_batch_size)
    parser.add_argument("--val-fraction", type=float, default=d.val_fraction)
    parser.add_argument("--test-fraction", type=float, default=d.test_fraction)
    parser.add_argument("--seed", type=int, default=d.seed)


def config_from_args(args: argparse.Namespace) -> PrepareConfig:
    sources = tuple(s.strip() for s in args.sources.split(",") if s.strip())
    unknown = sorted(set(sources) - {"chatterbot", "synthetic"})
    if unknown:
        raise ValueError(f"--sources: unknown {unknown}; use chatterbot and/or synthetic")
    if args.prompts < 1 or args.samples < 1 or args.max_new_tokens < 1:
        raise ValueError(
            f"--prompts, --samples and --max-new-tokens must be >= 1, got {args.prompts}, "
            f"{args.samples}, {args.max_new_tokens}"
        )
    return PrepareConfig(
        out=args.out,
        teacher=args.teacher,
        prompts=args.prompts,
        sources=sources,
        jsonl=tuple(args.jsonl),
        samples=args.samples,
        max_new_tokens=args.max_new_tokens,
        max_prompt_tokens=args.max_prompt_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        p_store=args.p_store,
        max_support=args.max_support,
        gen_batch_size=args.gen_batch_size,
        score_batch_size=args.score_batch_size,
        val_fraction=args.val_fraction,
        test_fraction=args.test_fraction,
        seed=args.seed,
    )


def select_prompts(config: PrepareConfig) -> list[dict]:
    """``config.prompts`` prompts taken round-robin from the sources (deduplicated), with splits."""
    import random

    from tdkd.data import assign_splits, chatterbot_prompts, read_jsonl_prompts, synthetic_prompts

    pools: list[list[dict]] = []
    for source in config.sources:
        if source == "chatterbot":
            pool = chatterbot_prompts()
            random.Random(config.seed).shuffle(pool)
        else:
            pool = synthetic_prompts(config.prompts, seed=config.seed)
        pools.append(pool)
    pools += [read_jsonl_prompts(path) for path in config.jsonl]
    chosen, seen = [], set()
    position = [0] * len(pools)
    while len(chosen) < config.prompts and any(
        position[i] < len(pool) for i, pool in enumerate(pools)
    ):
        for i, pool in enumerate(pools):
            while position[i] < len(pool) and pool[position[i]]["prompt_id"] in seen:
                position[i] += 1
            if position[i] < len(pool) and len(chosen) < config.prompts:
                chosen.append(pool[position[i]])
                seen.add(pool[position[i]]["prompt_id"])
                position[i] += 1
    if not chosen:
        raise ValueError("the prompt set is empty: give --sources and/or --jsonl with prompts")
    return assign_splits(
        chosen,
        val_fraction=config.val_fraction,
        test_fraction=config.test_fraction,
        seed=config.seed,
    )


def prepare(config: PrepareConfig, *, progress: bool = True) -> dict:
    """Run the whole pipeline; returns the summary (also written to ``out/summary.json``)."""
    from tdkd.cache import TeacherCache, build_cache, data_hash, support_stats, teacher_fingerprint
    from tdkd.data import encode_prompts, generate_responses
    from tdkd.models import load_teacher, model_id, weights_hash
    from tdkd.topp import check_p

    p_store = check_p(config.p_store, "p_store")
    top_p = check_p(config.top_p if config.top_p is not None else p_store, "top_p")
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "config.json", dataclasses.asdict(config))
    times: dict[str, float] = {}

    start = time.perf_counter()
    model, tokenizer = load_teacher(config.teacher)
    times["load_teacher_s"] = time.perf_counter() - start

    start = time.perf_counter()
    prompts = encode_prompts(
        tokenizer, select_prompts(config), max_prompt_tokens=config.max_prompt_tokens
    )
    responses = generate_responses(
        model,
        tokenizer,
        prompts,
        out / "responses",
        samples_per_prompt=config.samples,
        max_new_tokens=config.max_new_tokens,
        temperature=config.temperature,
        top_p=top_p,
        batch_size=config.gen_batch_size,
        seed=config.seed,
        model_info={"teacher_id": model_id(model), "weights_hash": weights_hash(model)},
        progress=progress,
    )
    times["generate_s"] = time.perf_counter() - start

    start = time.perf_counter()
    cache_path = out / "cache"
    rows_hash = data_hash([(r["row_id"], r["prompt_ids"], r["response_ids"]) for r in responses])
    expect = {
        **teacher_fingerprint(model, tokenizer),
        "p_store": p_store,
        "max_support": config.max_support,
        "data_hash": rows_hash,
    }
    try:
        cache = TeacherCache(cache_path, expect=expect)  # an up-to-date cache is reused
    except (FileNotFoundError, ValueError):
        build_cache(
            model,
            tokenizer,
            responses,
            cache_path,
            p_store=p_store,
            max_support=config.max_support,
            batch_size=config.score_batch_size,
            overwrite=True,
            progress=progress,
        )
        cache = TeacherCache(cache_path, expect=expect)
    times["cache_s"] = time.perf_counter() - start

    supports = cache.supports()
    splits = {split: int(len(cache.indices(split))) for split in ("train", "validation", "test")}
    response_tokens = int(sum(len(r) for r in responses["response_ids"]))
    summary = {
        "rows": len(cache),
        "prompts": len(prompts),
        "splits": splits,
        "response_tokens": response_tokens,
        "terminated_fraction": round(sum(responses["terminated"]) / max(len(responses), 1), 3),
        "p_store": p_store,
        "sampling_top_p": top_p,
        "support": {
            str(p): support_stats(supports.restrict(p)) for p in config.stats_p if p <= p_store
        },
        "cache_bytes": cache.bytes_on_disk,
        "responses_bytes": sum(f.stat().st_size for f in (out / "responses").iterdir()),
        "bytes_per_response_token": round(cache.bytes_on_disk / max(response_tokens, 1), 1),
        "fingerprint": cache.fingerprint,
        **{k: round(v, 1) for k, v in times.items()},
    }
    _write_json(out / "summary.json", summary)
    return summary


def _write_json(path: Path, data: dict) -> None:
    write_json_atomic(path, data, default=str)


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    start = time.perf_counter()
    summary = prepare(config)
    total = time.perf_counter() - start
    print(f"tdkd prepare: done in {total:.0f} s -> {config.out}")
    print(
        f"  rows {summary['rows']} ({summary['splits']}), response tokens "
        f"{summary['response_tokens']}, terminated {summary['terminated_fraction']:.0%}"
    )
    for p, stats in summary["support"].items():
        print(
            f"  support at p={p}: mean {stats['mean']:.1f}  median {stats['median']:.0f}  "
            f"p95 {stats['p95']:.0f}  max {stats['max']}"
        )
    print(
        f"  bytes on disk: cache {summary['cache_bytes']:,} "
        f"({summary['bytes_per_response_token']} per response token), responses "
        f"{summary['responses_bytes']:,}"
    )
    print(
        "  times: "
        + ", ".join(
            f"{k[:-2]} {summary[k]:.0f} s" for k in ("load_teacher_s", "generate_s", "cache_s")
        )
    )
    return 0
