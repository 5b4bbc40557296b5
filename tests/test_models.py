from __future__ import annotations

import json

import pytest
import torch

from tdkd import models
from tdkd.io import file_sha256
from tdkd.models import (
    check_vocab_compatible,
    layer_dropped_student,
    load_student,
    load_teacher,
    student_from_config,
    tiny_causal_lm,
    tiny_teacher_student,
    tiny_tokenizer,
    tokenizer_hash,
    weights_hash,
)


def test_tiny_tokenizer_ids_and_roundtrip():
    tok = tiny_tokenizer()
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    ids = tok("sort 12 and 7", add_special_tokens=False)["input_ids"]
    vocab = tok.get_vocab()
    assert ids == [vocab[t] for t in ["sort", "1", "2", "and", "7"]]
    assert tok.decode(ids) == "sort 1 2 and 7"
    assert tok("zebra")["input_ids"] == [tok.unk_token_id]


def test_tiny_tokenizer_chat_template():
    tok = tiny_tokenizer()
    text = tok.apply_chat_template(
        [{"role": "user", "content": "hello"}], tokenize=False, add_generation_prompt=True
    )
    ids = tok(text, add_special_tokens=False)["input_ids"]
    vocab = tok.get_vocab()
    assert ids == [vocab["<user>"], vocab["hello"], vocab["<assistant>"]]


def test_tiny_teacher_student_share_vocab():
    teacher, student, tok = tiny_teacher_student()
    assert teacher.config.vocab_size == student.config.vocab_size == len(tok)
    x = torch.tensor([[3, 4, 5]])
    assert teacher(x).logits.shape == student(x).logits.shape == (1, 3, len(tok))
    assert not any(p.requires_grad for p in teacher.parameters())
    assert all(p.requires_grad for p in student.parameters())


def test_check_vocab_compatible_accepts_same_and_rejects_size():
    check_vocab_compatible(tiny_tokenizer(), tiny_tokenizer())
    with pytest.raises(ValueError, match="must share a tokenizer"):
        check_vocab_compatible(tiny_tokenizer(), tiny_tokenizer(["a", "b"]))


def test_check_vocab_compatible_rejects_permuted_ids():
    words = list(models.TINY_WORDS)
    swapped = words[:]
    swapped[0], swapped[-1] = swapped[-1], swapped[0]
    with pytest.raises(ValueError, match="share a tokenizer"):
        check_vocab_compatible(tiny_tokenizer(words), tiny_tokenizer(swapped))


@pytest.mark.parametrize("num_layers,keep", [(30, 6), (4, 2), (5, 1), (3, 3)])
def test_evenly_spaced_layers(num_layers, keep):
    layers = models._evenly_spaced_layers(num_layers, keep)
    assert len(layers) == keep and layers == sorted(set(layers))
    assert layers[-1] == num_layers - 1 and (keep == 1 or layers[0] == 0)


def test_layer_dropped_student_copies_chosen_layers():
    teacher = tiny_causal_lm(vocab_size=20, num_layers=4)
    student = layer_dropped_student(teacher, [0, 3])
    assert student.config.num_hidden_layers == 2
    t_state, s_state = teacher.state_dict(), student.state_dict()
    for s_index, t_index in enumerate([0, 3]):
        for name, value in s_state.items():
            if name.startswith(f"model.layers.{s_index}."):
                t_name = name.replace(f"layers.{s_index}.", f"layers.{t_index}.", 1)
                assert torch.equal(value, t_state[t_name])
    assert torch.equal(s_state["lm_head.weight"], t_state["lm_head.weight"])
    assert student.training and all(p.requires_grad for p in student.parameters())


def test_layer_dropped_student_keeping_all_layers_equals_teacher():
    teacher = tiny_causal_lm(vocab_size=20, num_layers=3)
    student = layer_dropped_student(teacher, 3).eval()
    x = torch.randint(0, 20, (2, 5))
    torch.testing.assert_close(student(x).logits, teacher(x).logits)


def test_layer_dropped_student_bad_layers():
    teacher = tiny_causal_lm(vocab_size=20, num_layers=3)
    with pytest.raises(ValueError, match="layers"):
        layer_dropped_student(teacher, [0, 7])
    with pytest.raises(ValueError, match="layers"):
        layer_dropped_student(teacher, 4)


def test_student_from_config_and_specs():
    teacher, _, tok = tiny_teacher_student()
    student = student_from_config(teacher, hidden_size=16, num_layers=1, num_heads=2)
    assert student.config.vocab_size == teacher.config.vocab_size
    model, student_tok = load_student(
        "config:hidden=16,layers=1,heads=2", teacher=teacher, tokenizer=tok
    )
    assert model.config.num_hidden_layers == 1 and student_tok is tok
    model, _ = load_student("layers:1", teacher=teacher, tokenizer=tok)
    assert model.config.num_hidden_layers == 1
    with pytest.raises(ValueError, match="unknown key"):
        load_student("config:width=3", teacher=teacher, tokenizer=tok)
    with pytest.raises(ValueError, match="needs the teacher"):
        load_student("layers:1")


def test_load_teacher_and_student_from_local_folder(tmp_path):
    teacher, _, tok = tiny_teacher_student()
    teacher.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    model, loaded_tok = load_teacher(tmp_path)
    x = torch.tensor([[3, 4, 5]])
    torch.testing.assert_close(model(x).logits, teacher(x).logits)
    assert weights_hash(model) == weights_hash(teacher)
    assert tokenizer_hash(loaded_tok) == tokenizer_hash(tok)
    student, _ = load_student(tmp_path, tokenizer=tok)
    assert student.training


def test_load_student_folder_with_other_vocab_is_refused(tmp_path):
    tok = tiny_tokenizer(["a", "b", "c"])
    tiny_causal_lm(vocab_size=len(tok)).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="must share a tokenizer"):
        load_student(tmp_path, tokenizer=tiny_tokenizer())


def test_load_teacher_bad_names(tmp_path):
    with pytest.raises(ValueError, match="smollm2-135m-instruct"):
        load_teacher("no-such-teacher")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_teacher(tmp_path)


def test_hashes_change_with_content():
    a, b = tiny_causal_lm(vocab_size=20), tiny_causal_lm(vocab_size=20)
    assert weights_hash(a) == weights_hash(b)
    with torch.no_grad():
        b.lm_head.weight[0, 0] += 1e-3
    assert weights_hash(a) != weights_hash(b)
    assert tokenizer_hash(tiny_tokenizer()) != tokenizer_hash(tiny_tokenizer(["x"]))


def test_manifest_verification_detects_damage(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    files = {"model.safetensors": file_sha256(tmp_path / "model.safetensors")}
    (tmp_path / models.MANIFEST).write_text(json.dumps({"files": files}))
    models._verify_manifest(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"weightz")
    with pytest.raises(ValueError, match="does not match"):
        models._verify_manifest(tmp_path)


def test_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("TDKD_CACHE_DIR", str(tmp_path))
    assert models.cache_dir() == tmp_path


@pytest.mark.slow
def test_embedded_teacher_loads():
    model, tok = load_teacher()
    assert model.config.vocab_size == len(tok) == 49152
    assert tok.chat_template and tok.eos_token == "<|im_end|>"
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    with torch.inference_mode():
        logits = model(torch.tensor([tok("Hello")["input_ids"]])).logits
    assert torch.isfinite(logits).all()
    manifest = json.loads(
        (models.cache_dir() / "models" / "smollm2-135m-instruct" / models.MANIFEST).read_text()
    )
    assert manifest["weights_hash"] == weights_hash(model)
