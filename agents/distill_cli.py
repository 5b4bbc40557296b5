"""`tdkd distill`: train a student with any registered algorithm on a prepared teacher cache.

Every algorithm (``agents.make`` names: bd, sqn, sac, iql, sft, kd, rkl, jsd, skl, tvd, seqkd)
runs on the same cached batches, budget, evaluation and logging, so swapping the algorithm is
one flag::

    tdkd distill --algo bd --cache runs/cache --out runs/bd --steps 300 --p 0.8
    tdkd distill --config runs/bd/config.yaml          # re-run a resolved config
    torchrun --nproc-per-node 2 -m tdkd.cli distill --algo kd --cache ... --out ...

Outputs in ``--out``: ``config.yaml`` (the resolved ``DistillConfig``), ``metrics.csv``,
``tb/`` (TensorBoard), ``ckpt/`` (atomic checkpoints; a re-run with the same ``--out``
resumes from the latest), ``student/`` (``save_pretrained`` + tokenizer; the best checkpoint
by ``train.best_metric``), ``summary.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# CLI flag -> (config path, type)
_OVERRIDES: dict[str, tuple[str, type]] = {
    "algo": ("algo", str),
    "cache": ("cache", str),
    "out": ("out", str),
    "teacher": ("teacher", str),
    "student": ("student", str),
    "p": ("p", float),
    "max_support": ("max_support", int),
    "batch_size": ("batch_size", int),
    "eval_batches": ("eval_batches", int),
    "device": ("device", str),
    "steps": ("train.max_steps", int),
    "lr": ("train.lr", float),
    "warmup_steps": ("train.warmup_steps", int),
    "grad_accum": ("train.grad_accum", int),
    "max_grad_norm": ("train.max_grad_norm", float),
    "eval_every": ("train.eval_every", int),
    "checkpoint_every": ("train.checkpoint_every", int),
    "log_every": ("train.log_every", int),
    "seed": ("train.seed", int),
}

# fields whose change makes an existing --out folder a different run (what changes the
# optimisation trajectory; --steps may grow to train longer, and logging/checkpoint cadence may
# change on resume)
_RUN_IDENTITY = (
    "algo",
    "cache",
    "teacher",
    "student",
    "p",
    "max_support",
    "batch_size",
    "loss_kwargs",
)
_TRAIN_IDENTITY = (
    "lr",
    "betas",
    "weight_decay",
    "eps",
    "warmup_steps",
    "min_lr_ratio",
    "grad_accum",
    "max_grad_norm",
    "seed",
    "best_metric",
    "best_mode",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="a DistillConfig YAML/JSON file; flags override it")
    parser.add_argument("--algo", help="algorithm name (bd, sqn, sac, iql, sft, kd, rkl, ...)")
    parser.add_argument("--cache", help="teacher cache folder made by `tdkd prepare`")
    parser.add_argument("--out", help="output folder (resumed when it holds checkpoints)")
    parser.add_argument("--teacher", help="the teacher the cache was made with")
    parser.add_argument("--student", help="student spec: layers:6, config:..., or a folder")
    parser.add_argument("--p", type=float, help="nucleus mass (<= the cache's p_store)")
    parser.add_argument("--max-support", type=int, help="cap on the padded support size K")
    parser.add_argument("--batch-size", type=int, help="rows per global batch")
    parser.add_argument("--eval-batches", type=int, help="validation batches per evaluation")
    parser.add_argument("--device", help="auto, cpu or cuda[:i]")
    parser.add_argument("--steps", type=int, help="optimizer steps")
    parser.add_argument("--lr", type=float, help="peak learning rate")
    parser.add_argument("--warmup-steps", type=int, help="linear warm-up steps")
    parser.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step")
    parser.add_argument("--max-grad-norm", type=float, help="gradient clipping norm")
    parser.add_argument("--eval-every", type=int, help="evaluate every N steps (0: never)")
    parser.add_argument("--checkpoint-every", type=int, help="checkpoint every N steps")
    parser.add_argument("--log-every", type=int, help="log every N steps")
    parser.add_argument("--seed", type=int, help="random seed")
    parser.add_argument(
        "--loss-kwarg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="loss hyperparameter (repeatable), e.g. --loss-kwarg alpha_chi=0.1",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def resolve_config(args: argparse.Namespace) -> Any:
    """The ``DistillConfig`` of ``--config`` (if any) with the given flags applied."""
    from agents.config import DistillConfig, load_config

    config = load_config(DistillConfig, args.config) if args.config else DistillConfig()
    data = config.to_dict()
    for flag, (path, _) in _OVERRIDES.items():
        value = getattr(args, flag, None)
        if value is None:
            continue
        node = data
        *parents, leaf = path.split(".")
        for key in parents:
            node = node[key]
        node[leaf] = value
    data["loss_kwargs"] = {**data["loss_kwargs"], **parse_loss_kwargs(args.loss_kwarg)}
    config = DistillConfig.from_dict(data)
    for name in ("cache", "out"):
        if not getattr(config, name):
            raise ValueError(f"--{name} is required (or set {name!r} in --config)")
    return config


def parse_loss_kwargs(items: list[str]) -> dict[str, Any]:
    """``["alpha_chi=0.1", "expert_action=nucleus"]`` -> typed dict (values parsed as YAML)."""
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--loss-kwarg expects KEY=VALUE, got {item!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out


def check_algo(algo: str) -> None:
    """ValueError listing the valid names unless ``algo`` is registered (before any loading)."""
    import agents

    names = getattr(agents, "ALGORITHMS", None)
    if names is not None and algo not in names:
        raise ValueError(f"unknown algorithm {algo!r}; choose one of {sorted(names)}")


def make_loss(algo: str, student: Any, loss_kwargs: dict[str, Any]) -> Any:
    """``agents.make(algo, student, **loss_kwargs)``: the algorithm registry."""
    import agents

    return agents.make(algo, student, **loss_kwargs)


def _device(name: str, local_rank: int) -> Any:
    import torch

    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _check_same_run(out: Path, config: Any) -> None:
    """Refuse to resume checkpoints of a different run in the same folder."""
    from agents.config import DistillConfig, load_config

    previous_path = out / "config.yaml"
    if not previous_path.is_file() or not (out / "ckpt").is_dir():
        return
    previous = load_config(DistillConfig, previous_path)
    pairs = [(k, getattr(previous, k), getattr(config, k)) for k in _RUN_IDENTITY]
    pairs += [
        (f"train.{k}", getattr(previous.train, k), getattr(config.train, k))
        for k in _TRAIN_IDENTITY
    ]
    changed = [(k, old, new) for k, old, new in pairs if old != new]
    if changed:
        diff = ", ".join(f"{k}: {old!r} -> {new!r}" for k, old, new in changed)
        raise ValueError(
            f"--out {str(out)!r} holds checkpoints of a different run ({diff}); "
            "choose a new --out folder"
        )


def run(args: argparse.Namespace) -> int:
    import torch

    from agents import distributed
    from agents.config import save_config, write_atomic
    from agents.trainer import (
        CacheBatchSource,
        NonFiniteLossError,
        OfflineTrainer,
        loss_evaluator,
    )
    from tdkd.cache import TeacherCache, teacher_fingerprint
    from tdkd.models import load_student, load_teacher

    config = resolve_config(args)
    check_algo(config.algo)
    out = Path(config.out)
    info = distributed.init_from_env()
    try:
        device = _device(config.device, info.local_rank)
        teacher, tokenizer = load_teacher(config.teacher)
        cache = TeacherCache(config.cache, expect=teacher_fingerprint(teacher, tokenizer))
        if config.p is not None and config.p > cache.p_store:
            raise ValueError(
                f"--p {config.p} is above the cache's p_store={cache.p_store}; use p <= "
                f"{cache.p_store} or rebuild the cache with a larger p_store"
            )
        student, tokenizer = load_student(config.student, teacher=teacher, tokenizer=tokenizer)
        del teacher
        vocab = student.get_output_embeddings().weight.shape[0]
        if vocab != cache.vocab_size:
            raise ValueError(
                f"student vocab {vocab} vs cache (teacher) vocab {cache.vocab_size}: teacher and "
                "student must share a tokenizer"
            )
        student.to(device)
        loss_module = make_loss(config.algo, student, dict(config.loss_kwargs)).to(device)
        seed = config.train.seed
        train_data = CacheBatchSource(
            cache,
            config.batch_size,
            split="train",
            p=config.p,
            max_support=config.max_support,
            seed=seed,
        )
        evaluator = None
        n_eval = len(cache.indices(config.eval_split))
        if n_eval and config.train.eval_every:
            eval_data = CacheBatchSource(
                cache,
                min(config.batch_size, n_eval),
                split=config.eval_split,
                p=config.p,
                max_support=config.max_support,
                shuffle=False,
            )
            evaluator = loss_evaluator(
                loss_module, student, eval_data, max_batches=config.eval_batches, device=device
            )
        train_config = config.train
        if evaluator is None and train_config.eval_every:
            log.warning("the cache has no %r rows: evaluation is off", config.eval_split)
            train_config = train_config.replace(eval_every=0)
        if info.is_main:
            _check_same_run(out, config)
            save_config(config, out / "config.yaml")
        trainer = OfflineTrainer(
            loss_module,
            student,
            train_data,
            config=train_config,
            out_dir=out,
            evaluator=evaluator,
            dist_info=info,
            tokenizer=tokenizer,
            device=device,
        )
        bar = None
        if info.is_main and not args.no_progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=train_config.max_steps, desc=f"distill {config.algo}", unit="step")

        def on_step(step: int, metrics: dict[str, float]) -> None:
            if bar is not None:
                bar.n = step
                bar.set_postfix(loss=f"{metrics['losses/total']:.4g}", refresh=False)
                bar.refresh()

        try:
            result = trainer.train(on_step=on_step)
        except NonFiniteLossError as err:
            print(f"tdkd distill: error: {err}")
            return 3
        finally:
            if bar is not None:
                bar.close()
        if info.is_main:
            summary = {
                "algo": config.algo,
                "steps": result.step,
                "final_loss": result.losses[-1] if result.losses else None,
                "best_step": result.best_step,
                "best_metric": train_config.best_metric if result.best_step else None,
                "best_value": result.best_value,
                "student": str(result.student_dir),
                "world_size": info.world_size,
                "device": str(device),
                "torch_threads": torch.get_num_threads(),
            }
            write_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
            print(json.dumps(summary))
    finally:
        distributed.shutdown()
    return 0
