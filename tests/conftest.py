from __future__ import annotations

import os

import pytest
import torch

from tdkd.models import tiny_causal_lm, tiny_teacher_student

# Tests never reach a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _seed_and_threads(request):
    """Seed every test; run tiny-model tests on one thread.

    Fast tests work on tiny tensors, where torch's intra-op threads cost far more than they
    bring (measured 10-30x slower with 2 threads on a busy 2-core machine). Tests marked
    ``slow`` run the real teacher and keep torch's default thread count.
    """
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    if request.node.get_closest_marker("slow") is None:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a whole test module (restored afterwards).

    Tiny models: one thread is much faster on a loaded shared CPU. Module-scoped, so the
    module's own model-building fixtures run on it too; a module opts in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def teacher(one_thread):
    """A tiny random Llama (V = 64, seed 1) with concentrated next-token distributions (small
    nuclei): its output head scaled by 30."""
    model = tiny_causal_lm(vocab_size=64, seed=1)
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
    return model


@pytest.fixture(scope="module")
def student(one_thread):
    """A tiny random Llama (V = 64, seed 2), the student next to ``teacher``."""
    return tiny_causal_lm(vocab_size=64, seed=2)


@pytest.fixture(scope="module")
def tiny_teacher_dir(tmp_path_factory):
    """A tiny 2-layer teacher and its tokenizer saved as an HF folder (demo / benchmark tests)."""
    teacher, _, tokenizer = tiny_teacher_student(teacher_layers=2)
    folder = tmp_path_factory.mktemp("teacher")
    teacher.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
