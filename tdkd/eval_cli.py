"""`tdkd eval`: evaluate saved students on a prepared split, with the teacher as judge.

    tdkd eval --student DIR [--student-b DIR] --data PREPARED_DIR --split test --seeds 5 \\
        --top-p 1.0 --temperature 1.0 --max-new-tokens 64 --teacher NAME_OR_PATH --p 0.8 \\
        --out FILE.json

Writes ``FILE.json`` (the resolved config, per-seed values and mean/std of every metric, see
``tdkd.evaluate``) and the resolved config alone beside it as ``FILE.config.json``, both
atomically, and prints a table of mean +- std over seeds. ``--teacher`` defaults to the teacher
recorded in the prepared folder. Give the teacher's own name or folder as ``--student`` for the
upper reference.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from tdkd.io import write_json_atomic

log = logging.getLogger(__name__)


@dataclass
class EvalConfig:
    """Everything that decides what `tdkd eval` measures (saved beside every result).

    >>> EvalConfig(student="runs/bd/student", data="runs/prepare").seeds
    5
    """

    student: str = ""
    student_b: str | None = None
    data: str = ""
    split: str = "test"
    seeds: int = 5
    top_p: float = 1.0
    temperature: float = 1.0
    max_new_tokens: int = 64
    teacher: str | None = None  # None: the teacher recorded in the prepared folder
    p: float = 0.8
    batch_size: int = 16
    score_batch_size: int = 8
    max_prompts: int | None = None
    device: str = "cpu"
    out: str = "eval.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = EvalConfig()
    parser.add_argument("--student", required=True, help="saved HF folder (or embedded name)")
    parser.add_argument("--student-b", default=None, help="second student, for a win rate")
    parser.add_argument("--data", required=True, help="output folder of `tdkd prepare`")
    parser.add_argument("--split", default=d.split, choices=("train", "validation", "test"))
    parser.add_argument("--seeds", type=int, default=d.seeds, help="sampling seeds 0..n-1")
    parser.add_argument("--top-p", type=float, default=d.top_p, help="sampling nucleus")
    parser.add_argument("--temperature", type=float, default=d.temperature)
    parser.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    parser.add_argument(
        "--teacher", default=None, help="judge: embedded name or folder (default: the prepared one)"
    )
    parser.add_argument("--p", type=float, default=d.p, help="teacher nucleus for coverage")
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help="generation batch")
    parser.add_argument("--score-batch-size", type=int, default=d.score_batch_size)
    parser.add_argument(
        "--max-prompts", type=int, default=None, help="use only the first N prompts of the split"
    )
    parser.add_argument("--device", default=d.device, help="cpu, cuda, ... (default cpu)")
    parser.add_argument("--out", default=d.out, help="result JSON (default %(default)s)")


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    from tdkd.topp import check_p

    check_p(args.top_p, "--top-p")
    check_p(args.p, "--p")
    for name in ("seeds", "max_new_tokens", "batch_size", "score_batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.temperature <= 0:
        raise ValueError(f"--temperature must be > 0, got {args.temperature}")
    if args.max_prompts is not None and args.max_prompts < 1:
        raise ValueError(f"--max-prompts must be >= 1, got {args.max_prompts}")
    return EvalConfig(
        student=args.student,
        student_b=args.student_b,
        data=args.data,
        split=args.split,
        seeds=args.seeds,
        top_p=args.top_p,
        temperature=args.temperature,
        max_new_tokens=args.max_new_tokens,
        teacher=args.teacher,
        p=args.p,
        batch_size=args.batch_size,
        score_batch_size=args.score_batch_size,
        max_prompts=args.max_prompts,
        device=args.device,
        out=args.out,
    )


def _write_json(path: Path, data: dict) -> None:
    write_json_atomic(path, data)


def config_path(out: str | os.PathLike) -> Path:
    """Where the resolved config of a result file goes: ``FILE.json`` -> ``FILE.config.json``."""
    out = Path(out)
    return out.with_name(out.stem + ".config.json")


def _recorded_teacher(data: str) -> tuple[str | None, str | None]:
    """(teacher name/path from config.json, weights hash from generation.json) of a prepared
    folder; None where not recorded."""
    folder = Path(data)
    teacher = weights = None
    if (folder / "config.json").is_file():
        teacher = json.loads((folder / "config.json").read_text()).get("teacher")
    generation = folder / "responses" / "generation.json"
    if generation.is_file():
        settings = json.loads(generation.read_text()).get("settings", {})
        weights = settings.get("model", {}).get("weights_hash")
    return teacher, weights


def evaluate(config: EvalConfig, *, progress: bool = True) -> dict:
    """Run the evaluation of ``config``; returns the result (also written to ``config.out``)."""
    import torch

    from tdkd.evaluate import (
        evaluate_students,
        exact_match_rows,
        load_eval_model,
        load_eval_prompts,
    )
    from tdkd.models import load_teacher, weights_hash

    if not Path(config.data).is_dir():
        raise FileNotFoundError(
            f"--data {config.data} does not exist; pass the output folder of `tdkd prepare`"
        )
    recorded_teacher, recorded_weights = _recorded_teacher(config.data)
    teacher_spec = config.teacher or recorded_teacher
    if not teacher_spec:
        raise ValueError(
            f"--data {config.data} records no teacher (config.json missing); pass --teacher"
        )
    resolved = dataclasses.replace(config, teacher=teacher_spec)
    teacher, tokenizer = load_teacher(teacher_spec)
    teacher_weights = weights_hash(teacher)
    if recorded_weights is not None and recorded_weights != teacher_weights:
        log.warning(
            "the judge %s (weights %s) is not the teacher that wrote %s (weights %s)",
            teacher_spec,
            teacher_weights,
            config.data,
            recorded_weights,
        )
    prompts = load_eval_prompts(config.data, config.split, tokenizer=tokenizer)
    if config.max_prompts is not None:
        prompts = prompts[: config.max_prompts]
    vocab = teacher.get_output_embeddings().weight.shape[0]
    students, sources = [], []
    for spec in filter(None, (config.student, config.student_b)):
        if spec == teacher_spec:
            model, source = teacher, teacher_spec
        else:
            model, source = load_eval_model(spec, teacher_tokenizer=tokenizer, vocab_size=vocab)
        students.append(model)
        sources.append(source)
    device = torch.device(config.device)
    teacher.to(device)
    for model in students:
        model.to(device)
    results = evaluate_students(
        students,
        teacher,
        tokenizer,
        prompts,
        seeds=config.seeds,
        max_new_tokens=config.max_new_tokens,
        temperature=config.temperature,
        top_p=config.top_p,
        p=config.p,
        batch_size=config.batch_size,
        score_batch_size=config.score_batch_size,
        progress=progress,
    )
    config_dict = dataclasses.asdict(resolved)
    output = {
        "config": config_dict,
        "student": sources[0],
        "teacher": {"spec": teacher_spec, "weights_hash": teacher_weights},
        "teacher_matches_data": recorded_weights is None or recorded_weights == teacher_weights,
        "split": config.split,
        "prompts": len(prompts),
        "exact_match_prompts": len(exact_match_rows(prompts)),
        **results[0],
    }
    if len(results) == 2:
        output["student_b"] = {"student": sources[1], **results[1]}
    out = Path(config.out)
    _write_json(config_path(out), config_dict)
    _write_json(out, output)
    return output


def _cell(result: dict, name: str) -> str:
    mean, std = result.get(f"{name}_mean"), result.get(f"{name}_std")
    return "-" if mean is None else f"{mean:.2f} +- {std:.2f}"


def format_table(output: dict) -> str:
    """Mean +- std over seeds of every metric, one column per student."""
    from tdkd.evaluate import METRICS

    columns = [("A", output)] + ([("B", output["student_b"])] if "student_b" in output else [])
    names = list(METRICS) + (["win_rate"] if "win_rate_mean" in output else [])
    lines = [f"{'metric':<16}" + "".join(f"{label:>22}" for label, _ in columns)]
    for name in names:
        lines.append(f"{name:<16}" + "".join(f"{_cell(r, name):>22}" for _, r in columns))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    output = evaluate(config)
    print(
        f"tdkd eval: {output['prompts']} {config.split} prompts x {config.seeds} seeds "
        f"(top-p {config.top_p}, temperature {config.temperature}), judge {output['teacher']['spec']}"
        f", coverage at p={config.p}"
    )
    print(f"  A = {output['student']}")
    if "student_b" in output:
        print(f"  B = {output['student_b']['student']}  (win_rate: A over B, teacher-judged)")
    print(format_table(output))
    print(f"  -> {config.out} (config: {config_path(config.out)})")
    return 0
