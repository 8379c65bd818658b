"""Tiny random transformers models for the integration tests (test_hf, test_peft_tools): 2 layers, 4 heads,
hidden 32, vocabulary V. Imported by the tests, which skip first when transformers is missing."""
from __future__ import annotations

import torch
import transformers

V = 60


def tiny(family: str, attn: str = "sdpa", seed: int = 0, **kw):
    """A BertModel, LlamaModel (grouped-query), Qwen2Model (biased q/k/v, one key/value head) or T5Model."""
    torch.manual_seed(seed)
    if family == "bert":
        cfg = transformers.BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=48, max_position_embeddings=64, hidden_dropout_prob=0.0,
                                      attention_probs_dropout_prob=kw.pop("dropout", 0.0), **kw)
        model = transformers.BertModel(cfg, add_pooling_layer=False)
    elif family == "llama":
        cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, intermediate_size=48, max_position_embeddings=64)
        model = transformers.LlamaModel(cfg)
    elif family == "qwen2":
        cfg = transformers.Qwen2Config(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=1, intermediate_size=48, max_position_embeddings=64)
        model = transformers.Qwen2Model(cfg)
    else:
        cfg = transformers.T5Config(vocab_size=V, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2,
                                    num_heads=4, dropout_rate=0.0)
        model = transformers.T5Model(cfg)
    model.set_attn_implementation(attn)
    return model
