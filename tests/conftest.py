from __future__ import annotations

import os

import pytest
import torch

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
