"""Teachers and students: HF causal LMs, the embedded default teacher, vocabulary checks."""

from __future__ import annotations

import torch

__all__ = ["tiny_causal_lm"]


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
    from transformers import LlamaConfig, LlamaForCausalLM

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
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = LlamaForCausalLM(config)
    finally:
        torch.random.set_rng_state(generator_state)
    return model.eval()
