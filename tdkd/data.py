"""Prompt sources, chat formatting, teacher response generation and padding.

Prompt rows are plain dicts ``{"prompt_id", "source", "prompt", "answer"}`` (``answer`` is the
gold answer where the source has one, else ""). Sources, all offline:

- ``chatterbot_prompts``: the chatterbot-corpus English question/answer pairs (first answer of a
  repeated question is the gold one);
- ``synthetic_prompts``: seeded tasks with exact answers, families ``SYNTHETIC_FAMILIES``
  (arithmetic, copy, reverse, sort, count, lookup in a small table);
- ``read_jsonl_prompts``: user JSONL in the Dolly (instruction, context, response) or MiniLLM
  (prompt, output) format.

Splits (``assign_splits``) are a hash of the normalised prompt text, so one prompt lands in one
split whatever its source or order: train/validation/test never share a prompt.

Generation (``generate_responses``) samples K responses per prompt from the teacher with a KV
cache, in batches, each batch written atomically as an Arrow shard. The work list and each
batch's random seed are fixed by the settings, so an interrupted run resumes where it stopped and
produces exactly the rows an uninterrupted run would: none lost, none duplicated. The settings
are recorded in ``generation.json`` and a resume with different settings is refused.

Length policy: a prompt longer than ``max_prompt_tokens`` (after chat formatting) is skipped
with a logged count (``on_long="skip"``, default) or is an error (``on_long="error"``); it is
never truncated, since a cut prompt is a different question. An empty prompt set is an error.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from tdkd.io import atomic_path, write_json_atomic

__all__ = [
    "SPLITS",
    "SYNTHETIC_FAMILIES",
    "assign_splits",
    "chatterbot_prompts",
    "encode_prompts",
    "format_prompt",
    "generate_responses",
    "load_responses",
    "pad_sequences",
    "prompt_id",
    "read_jsonl_prompts",
    "sample_responses",
    "synthetic_prompts",
]

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
GENERATION_FILE = "generation.json"
RESPONSES_FILE = "responses.arrow"


def _normalise(text: str) -> str:
    return " ".join(text.lower().split())


def prompt_id(prompt: str) -> str:
    """Stable 16-hex id of a prompt's normalised text (case and whitespace folded)."""
    return hashlib.sha256(_normalise(prompt).encode()).hexdigest()[:16]


def _row(source: str, prompt: str, answer: str = "") -> dict:
    return {"prompt_id": prompt_id(prompt), "source": source, "prompt": prompt, "answer": answer}


def _dedup(rows: Iterable[dict]) -> list[dict]:
    seen: set[str] = set()
    out = []
    for row in rows:
        if row["prompt"].strip() and row["prompt_id"] not in seen:
            seen.add(row["prompt_id"])
            out.append(row)
    return out


# ----------------------------------------------------------------------------- sources


def chatterbot_prompts(categories: Sequence[str] | None = None) -> list[dict]:
    """The chatterbot-corpus English (question, first answer) pairs, deduplicated.

    Args:
        categories: file stems to read (e.g. ["ai", "science"]); default all.
    """
    import importlib.util

    import yaml

    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "chatterbot-corpus is not installed; `pip install --no-deps chatterbot-corpus==1.3.3`"
        )
    folder = Path(list(spec.submodule_search_locations)[0]) / "data" / "english"
    files = sorted(folder.glob("*.yml"))
    if categories is not None:
        known = {f.stem for f in files}
        unknown = sorted(set(categories) - known)
        if unknown:
            raise ValueError(f"unknown chatterbot categories {unknown}; known: {sorted(known)}")
        files = [f for f in files if f.stem in set(categories)]
    rows = []
    for path in files:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for conversation in data.get("conversations") or []:
            if isinstance(conversation, list) and len(conversation) >= 2:
                question, answer = str(conversation[0]).strip(), str(conversation[1]).strip()
                rows.append(_row(f"chatterbot/{path.stem}", question, answer))
    return _dedup(rows)


_WORDS = (
    "apple river stone cloud tiger lamp violin garden rocket mirror candle forest pepper "
    "silver harbor pencil window dragon orange planet"
).split()
_TABLE_KEYS = "red blue green yellow purple white black pink brown gray".split()
_TABLE_VALUES = "cat owl fox bee cow ant elk yak emu ram".split()


def _arithmetic(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    op = rng.choice("+-*")
    value = a + b if op == "+" else a - b if op == "-" else a * b
    return f"Compute {a} {op} {b}. Reply with the number only.", str(value)


def _copy(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(_WORDS, rng.randint(3, 5))
    return f"Copy these words exactly: {' '.join(words)}", " ".join(words)


def _reverse(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(_WORDS, rng.randint(3, 5))
    return f"Write these words in reverse order: {' '.join(words)}", " ".join(words[::-1])


def _sort(rng: random.Random) -> tuple[str, str]:
    numbers = [rng.randint(0, 99) for _ in range(rng.randint(4, 6))]
    return (
        f"Sort these numbers from smallest to largest: {', '.join(map(str, numbers))}",
        ", ".join(map(str, sorted(numbers))),
    )


def _count(rng: random.Random) -> tuple[str, str]:
    word = rng.choice(_WORDS)
    letter = rng.choice(sorted(set(word)))
    return f"How many times does the letter '{letter}' appear in '{word}'?", str(word.count(letter))


def _lookup(rng: random.Random) -> tuple[str, str]:
    keys = rng.sample(_TABLE_KEYS, 4)
    values = rng.sample(_TABLE_VALUES, 4)
    table = "; ".join(f"{k} = {v}" for k, v in zip(keys, values, strict=True))
    i = rng.randrange(4)
    return f"Table: {table}. What is the value of {keys[i]}?", values[i]


SYNTHETIC_FAMILIES = {
    "arithmetic": _arithmetic,
    "copy": _copy,
    "reverse": _reverse,
    "sort": _sort,
    "count": _count,
    "lookup": _lookup,
}


def synthetic_prompts(
    n: int, *, seed: int = 0, families: Sequence[str] | None = None
) -> list[dict]:
    """``n`` distinct seeded synthetic prompts with exact answers, cycling over ``families``."""
    families = list(SYNTHETIC_FAMILIES if families is None else families)
    unknown = sorted(set(families) - set(SYNTHETIC_FAMILIES))
    if unknown:
        raise ValueError(
            f"unknown synthetic families {unknown}; known: {sorted(SYNTHETIC_FAMILIES)}"
        )
    if n < 0:
        raise ValueError(f"n must be >= 0, got n={n}")
    rng = random.Random(seed)
    rows: list[dict] = []
    seen: set[str] = set()
    attempts = 0
    while len(rows) < n:
        attempts += 1
        if attempts > 100 * (n + 10):
            raise ValueError(f"could not draw {n} distinct synthetic prompts; ask for fewer")
        family = families[len(rows) % len(families)]
        prompt, answer = SYNTHETIC_FAMILIES[family](rng)
        row = _row(f"synthetic/{family}", prompt, answer)
        if row["prompt_id"] not in seen:
            seen.add(row["prompt_id"])
            rows.append(row)
    return rows


def read_jsonl_prompts(path: str | os.PathLike) -> list[dict]:
    """Prompts from a JSONL file in the Dolly or the MiniLLM format (detected per line).

    Dolly: ``{"instruction", "context", "response"}`` -> prompt = instruction (+ blank line +
    context when non-empty), answer = response. MiniLLM: ``{"prompt", "output"}``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    rows = []
    with open(path, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{line_no} is not valid JSON ({err})") from None
            if "instruction" in record:
                prompt = str(record["instruction"]).strip()
                context = str(record.get("context") or "").strip()
                if context:
                    prompt = f"{prompt}\n\n{context}"
                rows.append(_row(f"jsonl/{path.stem}", prompt, str(record.get("response") or "")))
            elif "prompt" in record:
                rows.append(
                    _row(
                        f"jsonl/{path.stem}",
                        str(record["prompt"]).strip(),
                        str(record.get("output") or ""),
                    )
                )
            else:
                raise ValueError(
                    f"{path}:{line_no} has keys {sorted(record)}; expected Dolly "
                    "(instruction, context, response) or MiniLLM (prompt, output)"
                )
    return _dedup(rows)


def assign_splits(
    rows: Sequence[dict], *, val_fraction: float = 0.1, test_fraction: float = 0.1, seed: int = 0
) -> list[dict]:
    """Copies of ``rows`` with a "split" key; the split is a function of the prompt text only.

    u = sha256(seed, normalised prompt) / 2^64;  test if u < f_test, validation if
    u < f_test + f_val, else train.
    """
    if not (0 <= val_fraction and 0 <= test_fraction and val_fraction + test_fraction < 1):
        raise ValueError(
            f"val_fraction and test_fraction must be >= 0 with a sum < 1, got {val_fraction} "
            f"and {test_fraction}"
        )
    out = []
    for row in rows:
        digest = hashlib.sha256(f"{seed}:{_normalise(row['prompt'])}".encode()).digest()
        u = int.from_bytes(digest[:8], "big") / 2**64
        split = (
            "test"
            if u < test_fraction
            else "validation"
            if u < test_fraction + val_fraction
            else "train"
        )
        out.append({**row, "split": split})
    return out


# ----------------------------------------------------------------------------- formatting


def format_prompt(tokenizer, prompt: str, *, system: str | None = None) -> list[int]:
    """Token ids of a user prompt ready for the assistant's answer.

    Uses the tokenizer's chat template (with the generation prompt) when it has one, else the
    plain text followed by a newline.
    """
    if getattr(tokenizer, "chat_template", None):
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": prompt}
        ]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(prompt + "\n")["input_ids"])


def encode_prompts(
    tokenizer,
    rows: Sequence[dict],
    *,
    max_prompt_tokens: int = 128,
    on_long: str = "skip",
    system: str | None = None,
) -> list[dict]:
    """Rows with "prompt_ids" added; see the module docstring for the length policy."""
    if on_long not in ("skip", "error"):
        raise ValueError(f"on_long must be 'skip' or 'error', got {on_long!r}")
    out, skipped = [], 0
    for row in rows:
        ids = format_prompt(tokenizer, row["prompt"], system=system)
        if len(ids) > max_prompt_tokens:
            if on_long == "error":
                raise ValueError(
                    f"prompt {row['prompt_id']} has {len(ids)} tokens > max_prompt_tokens="
                    f"{max_prompt_tokens}; raise the budget or use on_long='skip'"
                )
            skipped += 1
            continue
        out.append({**row, "prompt_ids": ids})
    if skipped:
        log.warning("skipped %d prompts longer than %d tokens", skipped, max_prompt_tokens)
    if not out:
        raise ValueError(
            f"the prompt set is empty (got {len(rows)} prompts, {skipped} over "
            f"max_prompt_tokens={max_prompt_tokens}); add prompts or raise the budget"
        )
    return out


def pad_sequences(
    prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]], pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded prompt+response batch.

    Returns:
        tokens int64 [B, L], attention_mask bool [B, L], response_mask bool [B, L] (True at
        response tokens), L = the longest prompt+response of the batch.
    """
    if len(prompt_ids) != len(response_ids):
        raise ValueError(f"got {len(prompt_ids)} prompts but {len(response_ids)} responses")
    lengths = [len(p) + len(r) for p, r in zip(prompt_ids, response_ids, strict=True)]
    width = max(lengths, default=0)
    tokens = torch.full((len(lengths), width), int(pad_token_id), dtype=torch.int64)
    attention = torch.zeros((len(lengths), width), dtype=torch.bool)
    response = torch.zeros((len(lengths), width), dtype=torch.bool)
    for b, (p, r) in enumerate(zip(prompt_ids, response_ids, strict=True)):
        tokens[b, : len(p) + len(r)] = torch.as_tensor(list(p) + list(r), dtype=torch.int64)
        attention[b, : len(p) + len(r)] = True
        response[b, len(p) : len(p) + len(r)] = True
    return tokens, attention, response


# ----------------------------------------------------------------------------- generation


@torch.inference_mode()
def sample_responses(
    model,
    prompt_ids: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    eos_token_id: int,
    pad_token_id: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> tuple[list[list[int]], list[bool]]:
    """Sample one response per prompt with a KV cache (prompts left-padded internally).

    Each step draws a_t ~ softmax(logits_t / temperature) restricted to the nucleus
    ``top_p_mask(logits_t / temperature, top_p)`` (top_p=1: the full distribution).

    Returns:
        (responses, terminated): token ids per prompt (EOS included when emitted) and whether
        the response ended with EOS (else it stopped at ``max_new_tokens``).
    """
    from transformers import DynamicCache

    from tdkd.topp import check_p, top_p_mask

    check_p(top_p, "top_p")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got temperature={temperature}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    batch = len(prompt_ids)
    width = max(len(p) for p in prompt_ids)
    device = next(model.parameters()).device
    input_ids = torch.full((batch, width), int(pad_token_id), dtype=torch.int64)
    attention = torch.zeros((batch, width), dtype=torch.int64)
    for b, p in enumerate(prompt_ids):
        input_ids[b, width - len(p) :] = torch.as_tensor(list(p))
        attention[b, width - len(p) :] = 1
    input_ids, attention = input_ids.to(device), attention.to(device)
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache()
    out = model(
        input_ids=input_ids,
        attention_mask=attention,
        position_ids=positions,
        cache=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    steps = []
    for _ in range(max_new_tokens):
        logits = out.logits[:, -1].float() / temperature
        if top_p < 1.0:
            logits = logits.masked_fill(~top_p_mask(logits, top_p), float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        token = torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(device)
        token = torch.where(done, torch.full_like(token, int(pad_token_id)), token)
        steps.append(torch.where(done, -1, token))
        done = done | (token == eos_token_id)
        if bool(done.all()):
            break
        attention = torch.cat([attention, torch.ones_like(attention[:, :1])], dim=-1)
        positions = positions[:, -1:] + 1
        out = model(
            input_ids=token.unsqueeze(-1),
            attention_mask=attention,
            position_ids=positions,
            cache=cache,
            use_cache=True,
        )
    table = torch.stack(steps, dim=-1).cpu()
    responses = [[t for t in row if t >= 0] for row in table.tolist()]
    terminated = [bool(r) and r[-1] == eos_token_id for r in responses]
    return responses, terminated


def _write_arrow_atomic(table, path: Path) -> None:
    import pyarrow as pa

    with (
        atomic_path(path) as tmp,
        pa.OSFile(str(tmp), "wb") as sink,
        pa.ipc.new_stream(sink, table.schema) as writer,
    ):
        writer.write_table(table)


def _write_json_atomic(data: dict, path: Path) -> None:
    write_json_atomic(path, data)


def _read_arrow(path: Path):
    import pyarrow as pa

    with pa.memory_map(str(path)) as source:
        return pa.ipc.open_stream(source).read_all()


def generate_responses(
    model,
    tokenizer,
    prompts: Sequence[dict],
    out_dir: str | os.PathLike,
    *,
    samples_per_prompt: int = 2,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 32,
    seed: int = 0,
    model_info: dict | None = None,
    progress: bool = False,
):
    """Sample ``samples_per_prompt`` teacher responses per encoded prompt; resumable.

    Args:
        prompts: rows from ``encode_prompts`` (with "prompt_ids" and "split").
        out_dir: folder for ``generation.json``, per-batch shards and the final
            ``responses.arrow`` (an Arrow stream file, read by ``load_responses``).
        model_info: recorded with the decoding settings (e.g. teacher id and weights hash).

    Returns:
        A ``datasets.Dataset`` with one row per response: row_id, prompt_id, split, source,
        prompt, answer, sample_index, prompt_ids, response_ids, terminated.
    """
    import pyarrow as pa

    if not prompts:
        raise ValueError("the prompt set is empty; give at least one prompt")
    if samples_per_prompt < 1 or batch_size < 1:
        raise ValueError(
            f"samples_per_prompt and batch_size must be >= 1, got {samples_per_prompt}, {batch_size}"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prompt_hash = hashlib.sha256(
        json.dumps([(r["prompt_id"], r["prompt_ids"], r["split"]) for r in prompts]).encode()
    ).hexdigest()[:16]
    settings = {
        "samples_per_prompt": samples_per_prompt,
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "top_p": top_p,
        "batch_size": batch_size,
        "seed": seed,
        "num_prompts": len(prompts),
        "prompts_hash": prompt_hash,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "model": model_info or {},
    }
    settings_path = out / GENERATION_FILE
    if settings_path.is_file():
        recorded = json.loads(settings_path.read_text())
        if recorded.get("settings") != json.loads(json.dumps(settings)):
            raise ValueError(
                f"{out} holds a generation run with other settings ({recorded.get('settings')}); "
                "use a new output folder or delete this one"
            )
    else:
        _write_json_atomic({"settings": settings, "complete": False}, settings_path)
    final = out / RESPONSES_FILE
    if final.is_file() and json.loads(settings_path.read_text()).get("complete"):
        return load_responses(out)

    # Work list: (prompt index, sample index), shortest prompts first so batches pad little.
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]["prompt_ids"]), i))
    work = [(i, k) for i in order for k in range(samples_per_prompt)]
    batches = [work[s : s + batch_size] for s in range(0, len(work), batch_size)]
    shard_paths = [out / f"shard-{b:05d}.arrow" for b in range(len(batches))]
    todo = []
    for b, items in enumerate(batches):
        expected = [i * samples_per_prompt + k for i, k in items]
        if shard_paths[b].is_file():
            try:
                if _read_arrow(shard_paths[b]).column("row_id").to_pylist() == expected:
                    continue
            except (OSError, pa.ArrowInvalid, KeyError):
                pass
            log.warning("shard %s is incomplete or corrupted; regenerating it", shard_paths[b])
        todo.append(b)
    if len(todo) < len(batches):
        log.info(
            "resuming generation: %d of %d batches already done",
            len(batches) - len(todo),
            len(batches),
        )
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=len(work),
            initial=len(work) - sum(len(batches[b]) for b in todo),
            desc="generate",
            unit="resp",
        )
    for b in todo:
        items = batches[b]
        generator = torch.Generator().manual_seed(seed * 1_000_003 + b)
        responses, terminated = sample_responses(
            model,
            [prompts[i]["prompt_ids"] for i, _ in items],
            max_new_tokens=max_new_tokens,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            temperature=temperature,
            top_p=top_p,
            generator=generator,
        )
        columns = {
            "row_id": [i * samples_per_prompt + k for i, k in items],
            "prompt_id": [prompts[i]["prompt_id"] for i, _ in items],
            "split": [prompts[i]["split"] for i, _ in items],
            "source": [prompts[i]["source"] for i, _ in items],
            "prompt": [prompts[i]["prompt"] for i, _ in items],
            "answer": [prompts[i].get("answer", "") for i, _ in items],
            "sample_index": [k for _, k in items],
            "prompt_ids": [list(prompts[i]["prompt_ids"]) for i, _ in items],
            "response_ids": responses,
            "terminated": terminated,
        }
        _write_arrow_atomic(pa.table(columns, schema=_response_schema()), shard_paths[b])
        if bar is not None:
            bar.update(len(items))
    if bar is not None:
        bar.close()
    table = pa.concat_tables([_read_arrow(p) for p in shard_paths])
    table = table.sort_by("row_id")
    row_ids = table.column("row_id").to_pylist()
    if row_ids != list(range(len(work))):
        raise ValueError(
            f"generation in {out} produced rows {row_ids[:5]}...; delete the folder and rerun"
        )
    _write_arrow_atomic(table, final)
    _write_json_atomic(
        {"settings": settings, "complete": True, "rows": len(row_ids)}, settings_path
    )
    for path in shard_paths:
        path.unlink(missing_ok=True)
    return load_responses(out)


def _response_schema():
    import pyarrow as pa

    return pa.schema(
        [
            ("row_id", pa.int64()),
            ("prompt_id", pa.string()),
            ("split", pa.string()),
            ("source", pa.string()),
            ("prompt", pa.string()),
            ("answer", pa.string()),
            ("sample_index", pa.int32()),
            ("prompt_ids", pa.list_(pa.int32())),
            ("response_ids", pa.list_(pa.int32())),
            ("terminated", pa.bool_()),
        ]
    )


def load_responses(out_dir: str | os.PathLike):
    """The finished responses of ``generate_responses`` as a memory-mapped ``datasets.Dataset``."""
    from datasets import Dataset

    out = Path(out_dir)
    settings_path, final = out / GENERATION_FILE, out / RESPONSES_FILE
    if not settings_path.is_file():
        raise FileNotFoundError(f"{out} holds no generation run ({GENERATION_FILE} missing)")
    record = json.loads(settings_path.read_text())
    if not record.get("complete") or not final.is_file():
        raise ValueError(f"generation in {out} is incomplete; rerun the same command to resume it")
    dataset = Dataset.from_file(str(final))
    if len(dataset) != record.get("rows"):
        raise ValueError(
            f"{final} has {len(dataset)} rows but {record.get('rows')} were written; it is "
            "damaged: delete it and rerun to regenerate"
        )
    return dataset
