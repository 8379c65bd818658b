"""The in-process federated loop: rounds, k clients a round, local LoRA training, payloads on the wire.

Bytes are measured, not estimated: every upload and download is a real payload (fedsparse.pack) and the
accounting adds up len(payload). Updates travel as deltas against the state the client started from
(quantization error then scales with the delta, not with the weights); downloads are the global adapter's
delta from the shared-seed init, which every client can rebuild, so round 1 downloads (almost) nothing.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .. import pack, unpack
from . import lib
from .arms import ArmSpec
from .config import RunConfig
from .data import Split, Tokenized, load_bbc_news, split_dataset, tokenize
from .model import adapter_state, build_model, load_adapter_state, load_backbone, load_tokenizer


@dataclass(frozen=True)
class Branch:
    """One client architecture: a depth and a LoRA rank (one branch unless --hetero)."""

    name: str
    n_layers: int
    rank: int


@dataclass
class Federation:
    """What every arm shares: data, split, backbone, branches, client -> branch."""

    cfg: RunConfig
    data: Tokenized
    split: Split
    backbone: torch.nn.Module
    branches: list[Branch]
    client_branch: list[int]

    @property
    def n_classes(self) -> int:
        return len(self.data.classes)

    def num_examples(self, cid: int) -> int:
        return len(self.split.clients[cid])

    def client_batches(self, cid: int, rnd: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """(training batches, scoring batches) of dataset indices for client cid in round rnd.

        Drawn from a generator seeded by (seed, round, client), so every arm trains on the same batches.
        """
        cfg = self.cfg
        rng = np.random.default_rng([cfg.seed, 1 + rnd, 7919 + cid])
        idx = self.split.clients[cid]
        need = cfg.local_steps * cfg.batch_size
        order = np.concatenate([rng.permutation(idx) for _ in range(math.ceil(need / len(idx)))])[:need]
        train = [order[i:i + cfg.batch_size] for i in range(0, need, cfg.batch_size)]
        n_score = min(len(idx), cfg.score_batches * cfg.batch_size)
        sidx = rng.choice(idx, size=n_score, replace=False)
        score = [sidx[i:i + cfg.batch_size] for i in range(0, n_score, cfg.batch_size)]
        return train, score

    def test_indices(self) -> np.ndarray:
        """The test split, or a seeded random subset of eval_examples of it (the split is sorted by class)."""
        n = self.cfg.eval_examples
        if n <= 0 or n >= len(self.split.test):
            return self.split.test
        return np.sort(np.random.default_rng([self.cfg.seed, 17]).choice(self.split.test, n, replace=False))


def prepare(cfg: RunConfig) -> Federation:
    texts, labels, classes = load_bbc_news()
    data = tokenize(texts, labels, classes, load_tokenizer(), cfg.max_len)
    split = split_dataset(labels, n_clients=cfg.n_clients, alpha=cfg.alpha, test_fraction=cfg.test_fraction,
                          seed=cfg.seed)
    backbone = load_backbone()
    if cfg.hetero:
        branches = [Branch(f"L{n}r{r}", n, r) for n, r in zip(cfg.hetero_layers, cfg.hetero_ranks)]
    else:
        branches = [Branch(f"L{backbone.config.num_hidden_layers}r{cfg.rank}", backbone.config.num_hidden_layers,
                           cfg.rank)]
    client_branch = [c % len(branches) for c in range(cfg.n_clients)]
    return Federation(cfg, data, split, backbone, branches, client_branch)


# ---- per-arm state ---------------------------------------------------------------------------------------

@dataclass
class ArmResult:
    arm: ArmSpec
    rounds: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)


def _lora_module(name: str) -> str | None:
    """'...attention.self.query.lora_B.default.weight' -> '...attention.self.query' (None if not LoRA)."""
    for tag in (".lora_A.", ".lora_B."):
        if tag in name:
            return name.split(tag)[0]
    return None


def _touched_heads(delta: dict[str, np.ndarray], n_heads: int) -> tuple[dict, dict]:
    """(tensors that are not all zero, module -> bool[H] of heads whose lora_B rows are not all zero).

    What a download needs: tensors and heads that never moved from the shared-seed init stay home.
    """
    out, masks = {}, {}
    for name, x in delta.items():
        if not np.any(x):
            continue
        out[name] = x
        module = _lora_module(name)
        if module is not None and ".lora_B." in name:
            masks[module] = np.any(x.reshape(n_heads, -1) != 0, axis=1)
    for module, m in list(masks.items()):
        if not m.any():  # possible only when lora_B is all zero, which was dropped above
            del masks[module]
    return out, masks


class ArmRunner:
    """Runs one arm over all rounds. Holds one model per branch (clients of a branch take turns on it)."""

    def __init__(self, fed: Federation, arm: ArmSpec):
        self.fed, self.arm, self.cfg = fed, arm, fed.cfg
        self.models, self.scorers, self.init, self.global_ = {}, {}, {}, {}
        for b, branch in enumerate(fed.branches):
            model = build_model(fed.n_classes, rank=branch.rank, n_layers=branch.n_layers, seed=self.cfg.seed,
                                backbone=fed.backbone)
            if arm.freeze_lora_a:
                # FFA-LoRA: lora_A stays at the shared-seed init every client builds alike; it never travels.
                for name, p in model.named_parameters():
                    if ".lora_A." in name:
                        p.requires_grad_(False)
            if arm.prune:
                scorer = lib.patch(model)
                scorer.enabled = False  # on only for the scoring pass
                self.scorers[b] = scorer
            self.models[b] = model
            self.init[b] = adapter_state(model)
            self.global_[b] = {n: v.copy() for n, v in self.init[b].items()}
        self.n_heads = fed.backbone.config.num_attention_heads
        self.stats: dict[int, dict] = {}
        self.client_scores: dict[int, tuple] = {}  # client -> (its last head scores [L, H], num_examples)
        self.ops_cache: dict = {}

    # -- wire ----------------------------------------------------------------------------------------------

    def download_payload(self, b: int, rnd: int) -> bytes:
        """The global adapter as its delta from the shared-seed init. Sparse arms send only the tensors and
        heads that ever moved, at their bit width; the dense arm sends everything in fp32."""
        delta = {n: self.global_[b][n] - self.init[b][n] for n in self.global_[b]}
        head_mask = None
        if self.arm.prune:
            delta, head_mask = _touched_heads(delta, self.n_heads)
        return pack(delta, head_mask=head_mask or None, bits=self.arm.bits, group_size=self.cfg.group_size,
                    metadata={"round": rnd, "branch": self.fed.branches[b].name})

    def start_state(self, b: int, payload: bytes) -> dict[str, np.ndarray]:
        got = unpack(payload)
        state = {n: v.copy() for n, v in self.init[b].items()}
        for name in got:
            state[name] += got[name]
        return state

    # -- client --------------------------------------------------------------------------------------------

    @torch.no_grad()
    def _mean_loss(self, model, batches, feats: list | None = None) -> float:
        """Mean loss over batches; given a list feats, appends each batch's pooled features (the head's input)."""
        model.eval()
        hook = None
        if feats is not None:
            hook = _head(model).register_forward_hook(lambda mod, args, out: feats.append(args[0].detach().clone()))
        total, n = 0.0, 0
        try:
            for idx in batches:
                out = model(**self.fed.data.batch(idx))
                total += out.loss.item() * len(idx)
                n += len(idx)
        finally:
            if hook is not None:
                hook.remove()
        return total / max(n, 1)

    def client_round(self, cid: int, rnd: int, download: bytes) -> tuple[bytes, dict]:
        fed, arm, cfg = self.fed, self.arm, self.cfg
        b = fed.client_branch[cid]
        branch = fed.branches[b]
        model = self.models[b]
        start = self.start_state(b, download)
        load_adapter_state(model, start)
        train_batches, score_batches = fed.client_batches(cid, rnd)
        info: dict = {"client": cid, "branch": branch.name}
        meta: dict = {"client_id": cid, "round": rnd, "num_examples": fed.num_examples(cid),
                      "branch": branch.name, "num_layers": branch.n_layers}
        # head_fit "full": in drop mode the pruned network's pooled features are far from the full network's
        # (cosine ~0.5 at 90% sparsity), so a head trained on them is wrong for the model the server keeps.
        # The head is then fitted on the full network's features of the scoring batches instead.
        fit_full = arm.prune and arm.mode == "drop" and cfg.head_fit == "full"

        head_mask, pruning = None, None
        if arm.prune:
            scorer = self.scorers[b]
            scorer.reset()
            scorer.enabled = True
            global_loss = self._mean_loss(model, score_batches)  # the scoring pass doubles as the global loss
            scorer.enabled = False
            scores = scorer.scores()
            head_mask = lib.choose_heads(scores, arm.sparsity, scope=arm.head_scope)
            pruning = lib.prune(model, head_mask, arm.mode)
            info["kept_heads"] = int(np.asarray(head_mask).sum())
            info["kept"] = [[int(h) for h in row] for row in head_mask.kept()]
            meta["head_scores"] = np.asarray(scores, dtype=np.float32)  # [L, H]: headwise weights s_kh
        elif arm.needs_loss_stats:
            global_loss = self._mean_loss(model, score_batches)

        try:
            ops = self.measure_ops(b, model, head_mask, train_batches)
            torch.manual_seed((cfg.seed * 1_000_003 + rnd * 1009 + cid) & 0x7FFFFFFF)  # hidden dropout
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=0.0)
            if pruning is not None:
                pruning.attach(opt)
            model.train()
            losses = []
            t_train = time.perf_counter()
            for idx in train_batches:
                loss = model(**fed.data.batch(idx)).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                losses.append(loss.item())
            info["train_s"] = time.perf_counter() - t_train
            info["train_loss"] = float(np.mean(losses))
            if arm.needs_loss_stats and not fit_full:
                local_loss = self._mean_loss(model, score_batches)
            if arm.prune:
                update, hm = lib.extract_update(model, head_mask)
                update = {n: v.detach().float().cpu().numpy() for n, v in update.items()}
            else:
                update, hm = adapter_state(model), None
        finally:
            if pruning is not None:
                pruning.restore()
        if fit_full:
            # Every head back: the scoring batches through the full network with the locally trained LoRA (the
            # model the server will hold), the head refitted from its start on those features, and the local
            # loss taken from the refitted head, on the same network and data as the global loss.
            feats: list = []
            self._mean_loss(model, score_batches, feats)
            head_update, local_loss = self._fit_head(model, start, feats, score_batches)
            update.update(head_update)
        if arm.needs_loss_stats:
            meta.update(global_loss=global_loss, local_loss=local_loss)
            info.update(global_loss=global_loss, local_loss=local_loss)
        if arm.freeze_lora_a:
            update = {n: v for n, v in update.items() if ".lora_A." not in n}
        delta = {n: v - start[n] for n, v in update.items()}
        if hm:
            hm = {m: v for m, v in hm.items() if any(n.startswith(m + ".") for n in delta)}
        payload = pack(delta, head_mask=hm or None, bits=arm.bits, group_size=cfg.group_size,
                       topk=arm.topk if arm.topk < 1 else None, metadata=meta)
        info["ops"] = ops
        return payload, info

    def _fit_head(self, model, start, feats, batches) -> tuple[dict, float]:
        """The classification head trained alone from its start state on pooled features feats (labels of
        batches): local_steps full-batch AdamW steps at the arm's lr. Returns (its adapter tensors, the loss
        after). The model's head is left at the fitted value."""
        cfg = self.cfg
        names = [n for n in start if _is_head(n)]
        load_adapter_state(model, {n: start[n] for n in names})
        head = _head(model)
        x = torch.cat(feats)
        y = torch.cat([self.fed.data.batch(idx)["labels"] for idx in batches])
        params = [p for p in head.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
        for _ in range(cfg.local_steps):
            loss = torch.nn.functional.cross_entropy(head(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            local_loss = float(torch.nn.functional.cross_entropy(head(x), y))
        state = adapter_state(model)
        return {n: state[n] for n in names}, local_loss

    def measure_ops(self, b, model, head_mask, train_batches) -> dict:
        """Training OPs of this client's local steps: count_ops (forward + backward) measured once per
        (branch, head mask) on a batch of one, times the examples trained. Every counted op is linear in the
        batch size and all rows are full (no padding), so this equals counting every step."""
        key = (b, None if head_mask is None else np.asarray(head_mask).tobytes())
        if key not in self.ops_cache:
            model.train()
            self.ops_cache[key] = _ops_dict(lib.count_ops(model, self.fed.data.batch(train_batches[0][:1])))
        n = sum(len(i) for i in train_batches)
        return {k: v * n for k, v in self.ops_cache[key].items()}

    # -- server --------------------------------------------------------------------------------------------

    def select(self, rnd: int) -> list[int]:
        cfg, arm = self.cfg, self.arm
        k = cfg.clients_per_round
        if arm.selection == "random":
            stats = {c: {} for c in range(cfg.n_clients)}
            return [int(c) for c in lib.select_clients(stats, k, strategy="random", seed=cfg.seed * 1000 + rnd)]
        # The server knows a client's losses from its last upload. A client never seen gets an optimistic gap
        # (the untrained loss, log C, against 0), so every client is tried before the gaps take over.
        prior = math.log(self.fed.n_classes)
        stats = {}
        for c in range(cfg.n_clients):
            s = self.stats.get(c)
            stats[c] = dict(s) if s else {"global_loss": prior, "local_loss": 0.0,
                                          "num_examples": self.fed.num_examples(c)}
        max_skip = 2 * math.ceil(cfg.n_clients / k)  # fairness: nobody waits more than this many rounds
        return [int(c) for c in lib.select_clients(stats, k, strategy="loss_gap", explore=cfg.explore,
                                                   seed=cfg.seed * 1000 + rnd, round=rnd, max_skip=max_skip)]

    def server_round(self, rnd: int, payloads_by_branch: dict[int, list[bytes]]) -> dict:
        for payloads in payloads_by_branch.values():
            for p in payloads:
                m = unpack(p).metadata
                if "global_loss" in m:
                    self.stats[int(m["client_id"])] = {"global_loss": float(m["global_loss"]),
                                                       "local_loss": float(m["local_loss"]),
                                                       "num_examples": int(m["num_examples"]), "last_round": rnd}
                if "head_scores" in m:
                    self.client_scores[int(m["client_id"])] = (np.asarray(m["head_scores"], np.float64),
                                                               float(m["num_examples"]))
        method = self.arm.aggregation
        if not self.arm.hetero:
            (b, payloads), = payloads_by_branch.items()
            # Updates are deltas: what no client sent (a head nobody kept) gets 0, i.e. keeps its global value.
            agg = lib.aggregate(payloads, method=method)
            for name in agg:
                self.global_[b][name] = self.global_[b][name] + agg[name]
            return {"heads_updated": _heads_updated(agg)}
        # --hetero: branch-local tensors within their branch, the shared head across branches. A truncated
        # branch's layer l is layer l of the full model (the same pretrained weights), hence the identity map.
        fed = self.fed
        payloads = [p for ps in payloads_by_branch.values() for p in ps]
        agg = lib.aggregate(payloads, method="multibranch", inner=method, shared=SHARED_HETERO,
                            layer_map={br.name: {l: l for l in range(br.n_layers)} for br in fed.branches},
                            depths={br.name: br.n_layers for br in fed.branches},
                            target_depth=max(br.n_layers for br in fed.branches))
        for b, br in enumerate(fed.branches):
            part = agg.branches.get(br.name) if agg.branches else None
            for name in self.global_[b]:
                if name in agg:            # shared: every branch gets it, present this round or not
                    self.global_[b][name] = self.global_[b][name] + agg[name]
                elif part is not None and name in part:
                    self.global_[b][name] = self.global_[b][name] + part[name]
        return {"branches": sorted(agg.branches or {}), "shared": sorted(agg)}

    # -- evaluation ----------------------------------------------------------------------------------------

    def consensus_mask(self, b: int):
        """The heads the server would keep for pruned inference: choose_heads over the example-weighted mean
        of the head scores its clients of branch b last sent (None before any)."""
        n_layers = self.fed.branches[b].n_layers
        got = [(s, n) for s, n in self.client_scores.values() if s.shape[0] == n_layers]
        if not got:
            return None
        mean = sum(s * n for s, n in got) / sum(n for _, n in got)
        return lib.choose_heads(mean, self.arm.sparsity, scope=self.arm.head_scope)

    @torch.no_grad()
    def evaluate(self, b: int, head_mask=None) -> tuple[float, float]:
        """(accuracy, mean loss) of branch b's global model on the held-out test split: with every head, or,
        given head_mask, with the other heads dropped (what the clients trained)."""
        model = self.models[b]
        load_adapter_state(model, self.global_[b])
        model.eval()
        pruning = lib.prune(model, head_mask, "drop") if head_mask is not None else None
        try:
            return self._evaluate(model)
        finally:
            if pruning is not None:
                pruning.restore()

    def _evaluate(self, model) -> tuple[float, float]:
        idx_all = self.fed.test_indices()
        correct, loss, n = 0, 0.0, 0
        for i in range(0, len(idx_all), 64):
            batch = self.fed.data.batch(idx_all[i:i + 64])
            out = model(**batch)
            correct += int((out.logits.argmax(-1) == batch["labels"]).sum())
            loss += out.loss.item() * len(batch["labels"])
            n += len(batch["labels"])
        return correct / n, loss / n


# Under --hetero the classification head is the part every architecture shares: both depths learn to map
# their pooled features into the space it reads. The LoRA factors differ in depth and rank, so stay local.
SHARED_HETERO = r"(^|\.)classifier(\.|$)"


def _head(model) -> torch.nn.Module:
    """The classification head of a build_model model (peft's trainable copy wrapper)."""
    return model.base_model.model.classifier


def _is_head(name: str) -> bool:
    return ".classifier." in name or name.endswith(".classifier")


def _heads_updated(agg) -> int:
    """How many (module, head) slices some client sent this round."""
    return int(sum(int(np.count_nonzero(c)) for c in getattr(agg, "head_counts", {}).values()))


def _ops_dict(counted) -> dict[str, float]:
    """OpCount -> {"total": ..., <category>: forward + backward, "forward": ..., "backward": ...}."""
    d = {"total": float(counted.total), "forward": float(counted.forward_total),
         "backward": float(counted.backward_total)}
    d.update({str(k): float(v) for k, v in counted.breakdown.items()})
    return d


def run_arm(fed: Federation, arm: ArmSpec, *, progress: bool = True) -> ArmResult:
    from tqdm.auto import tqdm

    cfg = fed.cfg
    t0 = time.perf_counter()
    runner = ArmRunner(fed, arm)
    result = ArmResult(arm)
    cum_up = cum_down = 0
    bar = tqdm(total=cfg.rounds * cfg.clients_per_round, desc=arm.name, unit="client", disable=not progress,
               leave=True, dynamic_ncols=True)
    try:
        for rnd in range(1, cfg.rounds + 1):
            t_round = time.perf_counter()
            selected = runner.select(rnd)
            downloads = {b: runner.download_payload(b, rnd) for b in set(fed.client_branch[c] for c in selected)}
            by_branch: dict[int, list[bytes]] = {}
            clients, up, down = [], [], []
            round_ops: dict[str, float] = {}
            for cid in selected:
                b = fed.client_branch[cid]
                payload, info = runner.client_round(cid, rnd, downloads[b])
                by_branch.setdefault(b, []).append(payload)
                clients.append(account_client(info, payload, downloads[b], round_ops))
                up.append(len(payload))
                down.append(len(downloads[b]))
                bar.update(1)
            server_info = runner.server_round(rnd, by_branch)
            evals = {fed.branches[b].name: runner.evaluate(b) for b in range(len(fed.branches))}
            acc = float(np.mean([a for a, _ in evals.values()]))
            pruned = {}
            if arm.prune:
                for b in range(len(fed.branches)):
                    mask = runner.consensus_mask(b)
                    if mask is not None:
                        pruned[fed.branches[b].name] = runner.evaluate(b, mask)[0]
            cum_up += sum(up)
            cum_down += sum(down)
            row = {"arm": arm.name, "round": rnd, "selected": [int(c) for c in selected],
                   "upload_bytes": int(sum(up)), "download_bytes": int(sum(down)),
                   "cum_upload_bytes": int(cum_up), "cum_download_bytes": int(cum_down),
                   "test_acc": acc, "test_loss": float(np.mean([l for _, l in evals.values()])),
                   "test_by_branch": {k: {"acc": a, "loss": l, **({"acc_pruned": pruned[k]} if k in pruned else {})}
                                      for k, (a, l) in evals.items()},
                   "test_acc_pruned": float(np.mean(list(pruned.values()))) if pruned else None,
                   "train_ops": round_ops.get("total", 0.0), "train_ops_breakdown": round_ops,
                   "round_s": time.perf_counter() - t_round, "elapsed_s": time.perf_counter() - t0,
                   "server": server_info, "clients": clients}
            result.rounds.append(row)
            bar.set_postfix(acc=f"{acc:.3f}", up=_human_bytes(cum_up))
    finally:
        bar.close()
    result.summary = summarize(arm, result.rounds, wall_s=time.perf_counter() - t0)
    return result


def account_client(info: dict, payload: bytes, download: bytes, round_ops: dict[str, float]) -> dict:
    """A client's row of a round (both engines): its measured bytes, its OPs folded into round_ops."""
    info["upload_bytes"] = len(payload)
    info["download_bytes"] = len(download)
    for k, v in info.pop("ops").items():
        round_ops[k] = round_ops.get(k, 0.0) + v
    return info


LAST_ROUNDS = 5  # the steady-state accuracy: mean over this many last rounds


def summarize(arm: ArmSpec, rounds: list[dict], *, wall_s: float) -> dict:
    """An arm's summary from its rows of rounds (the same for both engines)."""
    accs = [r["test_acc"] for r in rounds]
    cum_ops: dict[str, float] = {}
    for r in rounds:
        for k, v in r["train_ops_breakdown"].items():
            cum_ops[k] = cum_ops.get(k, 0.0) + v
    summary = {"arm": arm.name, "label": arm.label, "best_acc": max(accs), "final_acc": accs[-1],
               "last_acc": float(np.mean(accs[-LAST_ROUNDS:])), "last_rounds": min(LAST_ROUNDS, len(accs)),
               "upload_bytes": int(rounds[-1]["cum_upload_bytes"]), "download_bytes": int(rounds[-1]["cum_download_bytes"]),
               "train_ops": cum_ops.get("total", 0.0), "train_ops_breakdown": cum_ops, "wall_s": wall_s,
               "train_s": float(sum(c.get("train_s", 0.0) for r in rounds for c in r["clients"]))}
    pruned_accs = [r["test_acc_pruned"] for r in rounds if r.get("test_acc_pruned") is not None]
    if pruned_accs:
        summary.update(best_acc_pruned=max(pruned_accs), final_acc_pruned=pruned_accs[-1])
    summary["final_by_branch"] = rounds[-1]["test_by_branch"]
    return summary


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1000
    return f"{n}"
