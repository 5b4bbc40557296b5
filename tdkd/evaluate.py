"""Evaluate saved students on a prepared prompt split: sampled generation, teacher as judge.

Protocol (MiniLLM / DistiLLM): for each seed s in 0..n-1, the student samples one response per
prompt of the split (temperature 1, top-p 1 by default, KV cache, batched; the draws of batch b
come from ``torch.Generator().manual_seed(s * 1_000_003 + b)``, so a seed fixes the
generations). Each metric is computed per seed, then reported as mean and sample std over
seeds (``tdkd.metrics.mean_std``). Per seed:

    rougeL          Rouge-L F1 (points) against the reference of each prompt: the dataset's gold
                    answer where one exists, else the teacher's responses (max over them)
    rougeL_teacher  Rouge-L F1 (points) against the teacher's responses (max over the K samples)
    exact_match     exact match (points) against the gold answer, on the synthetic tasks only
                    (``source`` starting with "synthetic/"); None when the split has none
    teacher_nll     mean over prompts of NLL_T(y | x) = -(1/|y|) sum_t log pi_T(y_t | x, y_<t)
    coverage        share of all generated tokens inside the teacher's nucleus A_p
    gen_length      mean number of generated tokens, the final EOS not counted
    win_rate        (with a second student) mean over prompts of 1[NLL_T(a) < NLL_T(b)], ties 1/2

Generated tokens include the EOS when the student emitted it (it is an action the teacher
judges), so NLL and coverage count it; the texts are decoded without special tokens.

Prepared folder (``tdkd prepare --out DIR``): ``DIR/responses`` holds one row per teacher
response with the prompt's chat-formatted ``prompt_ids``, ``answer``, ``source`` and ``split``;
the prompts of one split are the distinct ``prompt_id`` of its rows, in row order.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = [
    "METRICS",
    "TeacherScores",
    "evaluate_students",
    "exact_match_rows",
    "generate_for_prompts",
    "load_eval_model",
    "load_eval_prompts",
    "references",
    "score_with_teacher",
    "seed_metrics",
    "summarize",
]

log = logging.getLogger(__name__)

# The per-seed metrics, in table order.
METRICS = ("rougeL", "rougeL_teacher", "exact_match", "teacher_nll", "coverage", "gen_length")
EXACT_SOURCES = "synthetic/"
_SEED_STRIDE = 1_000_003


# ----------------------------------------------------------------------------- inputs


def _responses_dir(data_dir: str | os.PathLike) -> Path:
    folder = Path(data_dir)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"prepared folder {folder} does not exist; pass the output folder of `tdkd prepare`"
        )
    for candidate in (folder / "responses", folder):
        if (candidate / "generation.json").is_file():
            return candidate
    raise FileNotFoundError(
        f"{folder} is not a prepared folder (no responses/generation.json); pass the "
        "output folder of `tdkd prepare`"
    )


def load_eval_prompts(data_dir: str | os.PathLike, split: str, *, tokenizer) -> list[dict]:
    """The distinct prompts of one split of a prepared folder, with the teacher's responses.

    Returns:
        One dict per prompt, in row order: prompt_id, source, prompt, answer (gold, "" if none),
        prompt_ids (chat-formatted, teacher tokenizer), teacher_responses (decoded texts of the
        K teacher samples).
    """
    from tdkd.data import SPLITS, load_responses

    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got split={split!r}")
    dataset = load_responses(_responses_dir(data_dir))
    columns = ["prompt_id", "source", "prompt", "answer", "prompt_ids", "response_ids", "split"]
    prompts: dict[str, dict] = {}
    counts = {name: 0 for name in SPLITS}
    for row in dataset.select_columns(columns):
        counts[row["split"]] = counts.get(row["split"], 0) + 1
        if row["split"] != split:
            continue
        entry = prompts.setdefault(
            row["prompt_id"],
            {
                "prompt_id": row["prompt_id"],
                "source": row["source"],
                "prompt": row["prompt"],
                "answer": row["answer"] or "",
                "prompt_ids": list(row["prompt_ids"]),
                "teacher_responses": [],
            },
        )
        text = tokenizer.decode(row["response_ids"], skip_special_tokens=True).strip()
        entry["teacher_responses"].append(text)
    if not prompts:
        raise ValueError(
            f"split {split!r} of {data_dir} is empty (responses per split: {counts}); choose "
            "another --split or prepare more prompts (--prompts, --test-fraction)"
        )
    return list(prompts.values())


def references(prompt: dict) -> list[str]:
    """Rouge-L references of a prompt: its gold answer where one exists, else the teacher's
    responses (an empty teacher response counts as the empty string)."""
    return [prompt["answer"]] if prompt["answer"].strip() else list(prompt["teacher_responses"])


def exact_match_rows(prompts: Sequence[dict]) -> list[int]:
    """Indices of the prompts with an exact answer (synthetic tasks with a gold answer)."""
    return [
        i
        for i, p in enumerate(prompts)
        if p["source"].startswith(EXACT_SOURCES) and p["answer"].strip()
    ]


def _has_tokenizer_files(folder: Path) -> bool:
    return (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file()


def load_eval_model(
    spec: str | os.PathLike,
    *,
    teacher_tokenizer,
    vocab_size: int,
    dtype: torch.dtype = torch.float32,
):
    """Load a saved model to evaluate (eval mode, gradients off).

    Args:
        spec: an HF folder (``save_pretrained``; a ``tdkd distill`` run folder, whose model is in
            ``student/``, works too) or an embedded teacher name.
        teacher_tokenizer: the judge's tokenizer; a folder that has its own tokenizer must share
            its vocabulary (``check_vocab_compatible``).
        vocab_size: the teacher's output size; the model's must match.

    Returns:
        (model, source): the model and the resolved folder or name it came from.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tdkd.models import EMBEDDED_TEACHERS, check_vocab_compatible, load_teacher

    text = str(spec)
    if text in EMBEDDED_TEACHERS:
        model, tokenizer = load_teacher(text, dtype=dtype)
        check_vocab_compatible(teacher_tokenizer, tokenizer)
        source = text
    else:
        folder = Path(text).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(
                f"student {folder} does not exist; pass a saved HF model folder or an embedded "
                f"teacher name ({sorted(EMBEDDED_TEACHERS)})"
            )
        if (
            not (folder / "config.json").is_file()
            and (folder / "student" / "config.json").is_file()
        ):
            folder = folder / "student"
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(
                f"student {folder} is not an HF model folder (it has no config.json); pass a "
                "folder written by save_pretrained or a `tdkd distill` run folder"
            )
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
        if _has_tokenizer_files(folder):
            check_vocab_compatible(teacher_tokenizer, AutoTokenizer.from_pretrained(folder))
        source = str(folder.resolve())
    size = model.get_output_embeddings().weight.shape[0]
    if size != vocab_size:
        raise ValueError(
            f"student {text} has {size} output tokens but the teacher has {vocab_size}: teacher "
            "and student must share a tokenizer"
        )
    model.eval().requires_grad_(False)
    return model, source


# ----------------------------------------------------------------------------- generation


def generate_for_prompts(
    model,
    prompt_ids: Sequence[Sequence[int]],
    *,
    seed: int,
    max_new_tokens: int,
    eos_token_id: int,
    pad_token_id: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 16,
) -> list[list[int]]:
    """One sampled response per prompt (token ids, EOS included when emitted), in input order.

    Prompts are batched shortest first (less padding); batch b draws from
    ``torch.Generator().manual_seed(seed * 1_000_003 + b)``, so (seed, prompts, settings) fix
    the result. Sampling: ``tdkd.data.sample_responses`` (KV cache; softmax(logits / temperature)
    restricted to its top-p nucleus).
    """
    from tdkd.data import sample_responses

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got batch_size={batch_size}")
    if any(len(p) == 0 for p in prompt_ids):
        raise ValueError("every prompt needs at least one token")
    order = sorted(range(len(prompt_ids)), key=lambda i: (len(prompt_ids[i]), i))
    out: list[list[int]] = [[] for _ in prompt_ids]
    for b, start in enumerate(range(0, len(order), batch_size)):
        items = order[start : start + batch_size]
        responses, _ = sample_responses(
            model,
            [prompt_ids[i] for i in items],
            max_new_tokens=max_new_tokens,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            temperature=temperature,
            top_p=top_p,
            generator=torch.Generator().manual_seed(seed * _SEED_STRIDE + b),
        )
        for i, response in zip(items, responses, strict=True):
            out[i] = response
    return out


# ----------------------------------------------------------------------------- teacher judge


@dataclass(frozen=True)
class TeacherScores:
    """The teacher's view of N responses, right-padded to the longest (T tokens).

    Attributes:
        token_log_probs: float32 [N, T] log pi_T(y_t | x, y_<t) (0 at padding).
        in_nucleus: bool [N, T] y_t in A_p(x, y_<t) (False at padding).
        mask: bool [N, T] True at response tokens.

    >>> from tdkd.models import tiny_causal_lm
    >>> teacher = tiny_causal_lm(vocab_size=16, hidden_size=8, num_layers=1, num_heads=2)
    >>> scores = score_with_teacher(teacher, [[3, 4], [5]], [[6, 1], [7]], p=1.0, pad_token_id=0)
    >>> scores.mask.tolist(), scores.in_nucleus.tolist()
    ([[True, True], [True, False]], [[True, True], [True, False]])
    """

    token_log_probs: torch.Tensor
    in_nucleus: torch.Tensor
    mask: torch.Tensor


@torch.inference_mode()
def score_with_teacher(
    teacher,
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    *,
    p: float,
    pad_token_id: int,
    batch_size: int = 8,
) -> TeacherScores:
    """Teacher log-prob and nucleus membership of every response token, one forward per batch.

    With the right-padded prompt+response sequence z, response token t at position j has the
    state z_<j, whose teacher logits are logits[:, j - 1]:

        log pi_T(z_j | z_<j) = log_softmax(logits[:, j - 1])[z_j]
        in_nucleus_j         = top_p_mask(logits[:, j - 1], p)[z_j]
    """
    from tdkd.data import pad_sequences
    from tdkd.topp import check_p, top_p_mask

    p = check_p(p)
    if len(prompt_ids) != len(response_ids):
        raise ValueError(f"got {len(prompt_ids)} prompts but {len(response_ids)} responses")
    if any(len(x) == 0 for x in prompt_ids):
        raise ValueError("every row needs a non-empty prompt (the first state needs a context)")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got batch_size={batch_size}")
    n, width = len(response_ids), max((len(r) for r in response_ids), default=0)
    log_probs = torch.zeros((n, width), dtype=torch.float32)
    in_nucleus = torch.zeros((n, width), dtype=torch.bool)
    mask = torch.zeros((n, width), dtype=torch.bool)
    device = next(teacher.parameters()).device
    for start in range(0, n, batch_size):
        rows = range(start, min(start + batch_size, n))
        tokens, attention, response = pad_sequences(
            [prompt_ids[i] for i in rows], [response_ids[i] for i in rows], pad_token_id
        )
        logits = teacher(
            input_ids=tokens.to(device), attention_mask=attention.long().to(device)
        ).logits
        states = response[:, 1:].to(device)
        state_logits = logits[:, :-1][states].float()  # [S, V], response tokens in row order
        actions = tokens[:, 1:].to(device)[states].unsqueeze(-1)  # [S, 1]
        token_lp = torch.log_softmax(state_logits, -1).gather(-1, actions).squeeze(-1)
        inside = top_p_mask(state_logits, p).gather(-1, actions).squeeze(-1)
        lengths = response.sum(-1)
        local = torch.arange(width) < lengths.unsqueeze(-1)  # [b, width]
        log_probs[start : start + len(rows)][local] = token_lp.cpu()
        in_nucleus[start : start + len(rows)][local] = inside.cpu()
        mask[start : start + len(rows)] = local
    return TeacherScores(log_probs, in_nucleus, mask)


# ----------------------------------------------------------------------------- metrics


def seed_metrics(
    prompts: Sequence[dict],
    texts: Sequence[str],
    response_ids: Sequence[Sequence[int]],
    scores: TeacherScores,
    *,
    eos_token_id: int,
) -> tuple[dict, torch.Tensor]:
    """The metrics of one seed (see the module docstring) and the per-prompt teacher NLL [N]."""
    from tdkd.metrics import exact_match, nucleus_coverage, rouge_l, teacher_nll_per_token

    nll = teacher_nll_per_token(scores.token_log_probs, scores.mask)
    exact = exact_match_rows(prompts)
    lengths = [len(r) - (1 if r and r[-1] == eos_token_id else 0) for r in response_ids]
    metrics = {
        "rougeL": rouge_l(texts, [references(p) for p in prompts]),
        "rougeL_teacher": rouge_l(texts, [list(p["teacher_responses"]) for p in prompts]),
        "exact_match": (
            exact_match([texts[i] for i in exact], [prompts[i]["answer"] for i in exact])
            if exact
            else None
        ),
        "teacher_nll": float(nll.double().mean()),
        "coverage": nucleus_coverage(scores.in_nucleus, scores.mask),
        "gen_length": sum(lengths) / len(lengths),
    }
    return metrics, nll


def summarize(per_seed: Sequence[dict], names: Sequence[str]) -> dict:
    """{name}_mean / {name}_std over seeds (``mean_std``; None when a metric is None)."""
    from tdkd.metrics import mean_std

    out: dict = {"seeds": len(per_seed)}
    for name in names:
        values = [row[name] for row in per_seed]
        if any(v is None for v in values):
            out[f"{name}_mean"], out[f"{name}_std"] = None, None
        else:
            out[f"{name}_mean"], out[f"{name}_std"] = mean_std(values)
    return out


def evaluate_students(
    students: Sequence,
    teacher,
    tokenizer,
    prompts: Sequence[dict],
    *,
    seeds: int = 5,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_p: float = 1.0,
    p: float = 0.8,
    batch_size: int = 16,
    score_batch_size: int = 8,
    progress: bool = False,
) -> list[dict]:
    """Evaluate one or two students over seeds 0..seeds-1 on the same prompts.

    Args:
        students: one or two causal LMs sharing the teacher's tokenizer.
        teacher: the judge (scores every generation; its nucleus at ``p`` gives coverage).
        prompts: rows from ``load_eval_prompts``.

    Returns:
        One dict per student: ``per_seed`` (list of {"seed", metrics...}) and the
        ``summarize`` means and stds; with two students, student 0 also gets ``win_rate``
        (teacher-judged, over student 1) per seed and its mean/std.
    """
    from tdkd.metrics import win_rate
    from tdkd.topp import check_p

    check_p(p, "p")
    if not 1 <= len(students) <= 2:
        raise ValueError(f"give one or two students, got {len(students)}")
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got seeds={seeds}")
    if not prompts:
        raise ValueError("no prompts to evaluate on")
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    prompt_ids = [p_["prompt_ids"] for p_ in prompts]
    per_seed: list[list[dict]] = [[] for _ in students]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=seeds * len(students), desc="eval", unit="run")
    for seed in range(seeds):
        nlls = []
        for k, student in enumerate(students):
            responses = generate_for_prompts(
                student,
                prompt_ids,
                seed=seed,
                max_new_tokens=max_new_tokens,
                eos_token_id=eos,
                pad_token_id=pad,
                temperature=temperature,
                top_p=top_p,
                batch_size=batch_size,
            )
            texts = [tokenizer.decode(r, skip_special_tokens=True).strip() for r in responses]
            scores = score_with_teacher(
                teacher, prompt_ids, responses, p=p, pad_token_id=pad, batch_size=score_batch_size
            )
            metrics, nll = seed_metrics(prompts, texts, responses, scores, eos_token_id=eos)
            per_seed[k].append({"seed": seed, **metrics})
            nlls.append(nll)
            log.info("seed %d student %d: %s", seed, k, json.dumps(metrics))
            if bar is not None:
                bar.update(1)
        if len(students) == 2:
            per_seed[0][-1]["win_rate"] = win_rate(nlls[0], nlls[1])
    if bar is not None:
        bar.close()
    results = []
    for k, rows in enumerate(per_seed):
        names = METRICS + (("win_rate",) if k == 0 and len(students) == 2 else ())
        results.append({"per_seed": rows, **summarize(rows, names)})
    return results
