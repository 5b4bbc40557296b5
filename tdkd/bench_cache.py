"""`tdkd bench cache`: size and cost of the sparse teacher cache on the embedded teacher.

Generates ``--responses`` teacher responses (or reuses a ``tdkd prepare`` output folder), scores
them once, writes a cache at ``--p`` and prints one JSON line:

- dense_fp16_bytes_per_token: V * 2, what a dense fp16 logit cache stores per response token;
- sparse_bytes_per_token: the cache's bytes on disk (everything: tokens, supports, manifest)
  per response token;
- compression: their ratio;
- extract_overhead: (support extraction + writing seconds) / teacher scoring-forward seconds;
- support statistics at p.

Timings are wall-clock on a shared machine: indicative only.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--teacher", default="smollm2-135m-instruct", help="teacher name or folder")
    parser.add_argument("--responses", type=int, default=32, help="responses to generate (>= 32)")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--p", type=float, default=0.8, help="nucleus mass of the cache")
    parser.add_argument("--batch-size", type=int, default=8, help="scoring batch size")
    parser.add_argument(
        "--from",
        dest="from_dir",
        default=None,
        help="reuse the first --responses responses of a `tdkd prepare` folder",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print only the JSON line")


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from tdkd.cache import ScoreTimings, TeacherCache, build_cache, support_stats
    from tdkd.data import (
        assign_splits,
        chatterbot_prompts,
        encode_prompts,
        generate_responses,
        load_responses,
        synthetic_prompts,
    )
    from tdkd.models import load_teacher

    model, tokenizer = load_teacher(args.teacher)
    with tempfile.TemporaryDirectory(prefix="tdkd-bench-cache-") as tmp:
        if args.from_dir:
            responses = load_responses(Path(args.from_dir) / "responses")
            responses = responses.select(range(min(args.responses, len(responses))))
        else:
            half = args.responses // 2
            chat = chatterbot_prompts()
            random.Random(args.seed).shuffle(chat)
            rows = assign_splits(
                chat[:half] + synthetic_prompts(args.responses - half, seed=args.seed)
            )
            prompts = encode_prompts(tokenizer, rows, max_prompt_tokens=96)
            responses = generate_responses(
                model,
                tokenizer,
                prompts,
                Path(tmp) / "responses",
                samples_per_prompt=1,
                max_new_tokens=args.max_new_tokens,
                top_p=args.p,
                batch_size=32,
                seed=args.seed,
                progress=not args.json,
            )
        timings = ScoreTimings()
        build_cache(
            model,
            tokenizer,
            responses,
            Path(tmp) / "cache",
            p_store=args.p,
            batch_size=args.batch_size,
            timings=timings,
            progress=not args.json,
        )
        cache = TeacherCache(Path(tmp) / "cache")
        stats = support_stats(cache.supports())
        bytes_on_disk = cache.bytes_on_disk
        num_responses = len(responses)
        support_bytes = sum(
            np.dtype(dtype).itemsize * count
            for shard in cache.manifest["shards"]
            for name, (dtype, _, count) in shard["arrays"].items()
            if name.startswith("support_") or name in ("dropped_mass", "teacher_log_prob")
        )

    vocab = model.config.vocab_size
    dense = 2 * vocab
    sparse = bytes_on_disk / max(timings.tokens, 1)
    result = {
        "teacher": args.teacher,
        "responses": num_responses,
        "response_tokens": timings.tokens,
        "p": args.p,
        "vocab_size": vocab,
        "dense_fp16_bytes_per_token": dense,
        "sparse_bytes_per_token": round(sparse, 2),
        "compression": round(dense / sparse, 1),
        "support_only_bytes_per_token": round(support_bytes / max(timings.tokens, 1), 2),
        "extract_overhead": round((timings.extract_s + timings.write_s) / timings.forward_s, 4),
        "forward_s": round(timings.forward_s, 3),
        "extract_s": round(timings.extract_s, 3),
        "write_s": round(timings.write_s, 3),
        "support_mean": stats["mean"],
        "support_median": stats["median"],
        "support_p95": stats["p95"],
        "support_max": stats["max"],
        "cache_bytes": bytes_on_disk,
        "note": "wall-clock on a shared 2-core CPU; indicative",
    }
    print(json.dumps(result))
    return 0
