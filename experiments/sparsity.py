"""The teacher's sparsity (issue item 2c): mass covered by its top-k tokens, nucleus size vs p.

    python experiments/sparsity.py                                   # the benchmark's cache
    python experiments/sparsity.py --cache runs/demo/data/cache      # the demo's cache

By default it reads the benchmark's full-distribution cache (``data/full_cache``, p_store = 1.0,
made for the p = 1.0 ablation) when it exists, so every top-k mass is exact, else its sparse
cache.

Reads a prepared sparse teacher cache (``tdkd prepare``), i.e. the teacher's next-token
distribution at every state of its own sampled responses, and writes
``experiments/results/sparsity.json``:

- ``topk``: for each k, the mean over states of the teacher mass on its top-k tokens, and the
  share of states where that mass is >= 0.9. The cache keeps each state's nucleus at p_store,
  so for k beyond a state's stored nucleus the mass is the nucleus mass, a lower bound (>=
  p_store) of the true top-k mass; ``exact_share`` is the share of states where the value is
  exact (k <= the stored nucleus). The paper reports ~96% for the top-50, >= 90% for the top-7.
- ``support``: nucleus size statistics (mean, median, p95, max) at each p <= p_store.

Deviation from the paper: its curve is measured over dataset prompts with teacher-forced
responses; ours over the teacher's own samples on chatterbot + synthetic prompts.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.common import CONFIGS, RESULTS, load_bench_config  # noqa: E402
from tdkd.demo import write_json_atomic  # noqa: E402

KS = (1, 2, 3, 5, 7, 10, 20, 50, 100, 200, 500, 1000)
PS = (0.1, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)


def topk_mass(offsets: torch.Tensor, log_probs: torch.Tensor, ks: Sequence[int]) -> torch.Tensor:
    """Teacher mass of each state's top-min(k, K_s) stored tokens.

    Args:
        offsets: int64 [S + 1] ragged offsets (state s owns entries offsets[s]:offsets[s+1]).
        log_probs: float [nnz] teacher log-probs in ranking order (largest first) per state.
        ks: the k's.

    Returns:
        float64 [S, len(ks)]: m[s, j] = sum_{i < min(k_j, K_s)} exp(log_probs[offsets[s] + i]),
        K_s = offsets[s+1] - offsets[s].

    >>> topk_mass(torch.tensor([0, 2, 3]), torch.tensor([0.6, 0.3, 1.0]).log(), [1, 5])
    tensor([[0.6000, 0.9000],
            [1.0000, 1.0000]], dtype=torch.float64)
    """
    if offsets.dim() != 1 or offsets.numel() < 1 or int(offsets[-1]) != log_probs.numel():
        raise ValueError(
            f"offsets [S+1] must end at log_probs' length, got offsets {tuple(offsets.shape)} "
            f"ending at {int(offsets[-1]) if offsets.numel() else None} and {log_probs.numel()} "
            "log-probs"
        )
    if any(int(k) < 1 for k in ks):
        raise ValueError(f"every k must be >= 1, got {list(ks)}")
    cumulative = torch.cat(
        [torch.zeros(1, dtype=torch.float64), log_probs.double().exp().cumsum(0)]
    )
    starts, lengths = offsets[:-1], offsets[1:] - offsets[:-1]  # [S]
    k = torch.tensor([int(k) for k in ks], dtype=torch.int64)  # [J]
    ends = starts.unsqueeze(-1) + torch.minimum(lengths.unsqueeze(-1), k)  # [S, J]
    return cumulative[ends] - cumulative[starts].unsqueeze(-1)


def sparsity_report(cache, ks: Sequence[int] = KS, ps: Sequence[float] = PS) -> dict:
    """The JSON of this script for an open ``tdkd.cache.TeacherCache``."""
    from tdkd.cache import support_stats

    support = cache.supports()  # every response state, at p_store
    lengths = support.lengths
    mass = topk_mass(support.offsets, support.log_probs, ks)  # [S, J]
    topk = []
    for j, k in enumerate(ks):
        topk.append(
            {
                "k": int(k),
                "mean_mass": float(mass[:, j].mean()),
                "share_at_least_0.9": float((mass[:, j] >= 0.9).double().mean()),
                "exact_share": float((lengths >= k).double().mean()),
            }
        )
    sizes = [{"p": p, **support_stats(support.restrict(p))} for p in ps if p <= cache.p_store]
    return {
        "cache": str(cache.path),
        "teacher": cache.fingerprint.get("teacher_id"),
        "p_store": cache.p_store,
        "states": int(lengths.numel()),
        "vocab_size": cache.vocab_size,
        "topk": topk,
        "support": sizes,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", default=None, help="cache folder (default: the benchmark's)")
    parser.add_argument("--ks", default=",".join(map(str, KS)), help="comma list of k")
    parser.add_argument("--ps", default=",".join(map(str, PS)), help="comma list of p")
    parser.add_argument("--results-dir", default=str(RESULTS))
    args = parser.parse_args(argv)
    from tdkd.cache import TeacherCache

    data_dir = load_bench_config(CONFIGS / "main.yaml").setup.data_dir
    full = data_dir / "full_cache"
    cache_path = args.cache or (full if (full / "manifest.json").is_file() else data_dir / "cache")
    if not Path(cache_path).is_dir():
        raise FileNotFoundError(
            f"no cache at {cache_path}; run experiments/run_benchmark.py (or `tdkd prepare`) "
            "first, or pass --cache runs/demo/data/cache"
        )
    report = sparsity_report(
        TeacherCache(cache_path),
        ks=[int(k) for k in args.ks.split(",")],
        ps=[float(p) for p in args.ps.split(",")],
    )
    out = Path(args.results_dir) / "sparsity.json"
    write_json_atomic(out, report)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
