"""Small random transformers models for the integration tests (built offline, no downloads)."""
import copy

import pytest

transformers = pytest.importorskip("transformers")

from flash_attn_t.integrations.transformers import ATTN_IMPLEMENTATION, register  # noqa: E402

VOCAB = 256


def llama_config():
    """Llama with GQA (8 query heads over 2 kv heads), head dim 64."""
    return transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                    num_attention_heads=8, num_key_value_heads=2, head_dim=64,
                                    max_position_embeddings=256)


def mistral_config(sliding_window):
    return transformers.MistralConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                      max_position_embeddings=256, sliding_window=sliding_window)


def gemma2_config():
    """Gemma2: attention logit softcapping and alternating sliding-window layers."""
    return transformers.Gemma2Config(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                     max_position_embeddings=256, sliding_window=16, attn_logit_softcapping=50.0)


def qwen2_config():
    """Qwen2: biased q/k/v projections; MQA (2 query heads over 1 kv head), head dim 64."""
    return transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                    num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256)


def gpt_oss_config():
    """gpt-oss: attention sinks (a learnable logit per head), alternating sliding-window layers, a
    small mixture of experts; GQA 4 over 2, head dim 64. Every token routes to every expert: with
    top-2 of 4 a bf16 rounding difference can flip a token's experts, and the logits then differ
    by far more than any attention error (seen: 5% where the attention alone gives 0.7%)."""
    return transformers.GptOssConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_local_experts=4,
                                     num_experts_per_tok=4, sliding_window=16, max_position_embeddings=256,
                                     layer_types=["sliding_attention", "full_attention"])


MODEL_CLASSES = {"llama": transformers.LlamaForCausalLM, "mistral": transformers.MistralForCausalLM,
                 "gemma2": transformers.Gemma2ForCausalLM, "qwen2": transformers.Qwen2ForCausalLM,
                 "gpt_oss": transformers.GptOssForCausalLM}


def build(kind, config, attn_implementation, state_dict=None, seed=0):
    """A fresh model of `kind` from a copy of `config` (models share no config object), with the
    given weights or seeded random ones."""
    import torch

    if attn_implementation == ATTN_IMPLEMENTATION:
        register()
    torch.manual_seed(seed)
    model = MODEL_CLASSES[kind]._from_config(copy.deepcopy(config), attn_implementation=attn_implementation)
    if state_dict is not None:
        model.load_state_dict(state_dict)
    return model


def pair(kind, config, **to):
    """(eager model, flash-attn-t model) with the same weights, moved with .to(**to)."""
    eager = build(kind, config, "eager").to(**to)
    ours = build(kind, config, ATTN_IMPLEMENTATION, state_dict=eager.state_dict()).to(**to)
    return eager, ours
