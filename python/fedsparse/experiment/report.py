"""Outputs of `fedsparse run`: the table per arm, a JSON file of every round, a PNG of accuracy against
cumulative uploaded bytes and against rounds."""
from __future__ import annotations

import json
import math
from pathlib import Path


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def fmt_ops(n: float) -> str:
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f}"


def _ratio(base: float, x: float) -> str:
    if not base or not x:
        return "-"
    return f"{base / x:.1f}x"


def summary_table(summaries: list[dict]) -> str:
    """A Markdown table, one row per arm; ratios are the dense baseline's figure over the arm's."""
    base = next((s for s in summaries if s["arm"] == "dense"), None)
    last = max((s.get("last_rounds", 1) for s in summaries), default=1)
    head = (f"| arm | best acc | final acc | mean acc, last {last} rounds | final acc, pruned inference | uploaded | up vs dense | downloaded "
            "| down vs dense | train OPs | OPs vs dense | wall s | local training s |")
    rows = [head, "|" + "---|" * 13]
    for s in summaries:
        b = base or {}
        pruned = f"{100 * s['final_acc_pruned']:.1f}%" if s.get("final_acc_pruned") is not None else "-"
        rows.append(
            f"| {s['arm']} | {100 * s['best_acc']:.1f}% | {100 * s['final_acc']:.1f}% "
            f"| {100 * s.get('last_acc', s['final_acc']):.1f}% | {pruned} "
            f"| {fmt_bytes(s['upload_bytes'])} | {_ratio(b.get('upload_bytes', 0), s['upload_bytes'])} "
            f"| {fmt_bytes(s['download_bytes'])} | {_ratio(b.get('download_bytes', 0), s['download_bytes'])} "
            f"| {fmt_ops(s['train_ops'])} | {_ratio(b.get('train_ops', 0), s['train_ops'])} "
            f"| {s['wall_s']:.0f} | {s.get('train_s', float('nan')):.0f} |")
    return "\n".join(rows)


def ops_table(summaries: list[dict]) -> str:
    """Training OPs by part (as count_ops breaks them down), per arm, with the share of the dense figure."""
    parts = []
    for s in summaries:
        for k in s.get("train_ops_breakdown", {}):
            if k != "total" and k not in parts:
                parts.append(k)
    if not parts:
        return ""
    base = next((s for s in summaries if s["arm"] == "dense"), None)
    rows = ["| part | " + " | ".join(s["arm"] for s in summaries) + " |", "|" + "---|" * (len(summaries) + 1)]
    for part in parts + ["total"]:
        cells = []
        for s in summaries:
            v = s.get("train_ops_breakdown", {}).get(part, s["train_ops"] if part == "total" else 0.0)
            cell = fmt_ops(v)
            if base is not None and s is not base:
                bv = base.get("train_ops_breakdown", {}).get(part, base["train_ops"] if part == "total" else 0)
                cell += f" ({_ratio(bv, v)})" if bv and v else ""
            cells.append(cell)
        rows.append(f"| {part} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def labels_table(summaries: list[dict]) -> str:
    return "\n".join(f"- {s['arm']}: {s['label']}" for s in summaries)


def render(summaries: list[dict], cfg_dict: dict) -> str:
    lines = [f"fedsparse run: {cfg_dict['n_clients']} clients (Dirichlet alpha {cfg_dict['alpha']}), "
             f"{cfg_dict['rounds']} rounds x {cfg_dict['clients_per_round']} clients, {cfg_dict['local_steps']} "
             f"local steps of {cfg_dict['batch_size']} x {cfg_dict['max_len']} tokens, seed {cfg_dict['seed']}"
             + (", hetero " + str(list(zip(cfg_dict["hetero_layers"], cfg_dict["hetero_ranks"])))
                if cfg_dict.get("hetero") else ""),
             "", labels_table(summaries), "", summary_table(summaries), "",
             "Accuracy: the global model on the held-out test split with every head. Pruned inference: the same "
             "model with only the heads the server would keep (choose_heads over the clients' mean head scores), "
             "the sub-network the clients trained in drop mode."]
    if cfg_dict.get("hetero"):
        lines += ["", "Final accuracy by branch:", ""]
        for s in summaries:
            parts = [f"{br} {100 * v['acc']:.1f}%" + (f" (pruned {100 * v['acc_pruned']:.1f}%)" if "acc_pruned" in v
                                                       else "") for br, v in s.get("final_by_branch", {}).items()]
            lines.append(f"- {s['arm']}: " + ", ".join(parts))
    ops = ops_table(summaries)
    if ops:
        lines += ["", "Training OPs by part (forward + backward, measured; ratio: dense / arm):", "", ops]
        note = ops_note(summaries)
        if note:
            lines += ["", note]
    return "\n".join(lines)


ATTENTION_PARTS = ("attention", "projections", "lora")


def ops_note(summaries: list[dict]) -> str:
    """Why the whole-step OPs ratio is what it is: head pruning removes attention-side work only, so the
    share of the step it cannot touch (feed-forward, embeddings, head) bounds the ratio (Amdahl)."""
    base = next((s for s in summaries if s["arm"] == "dense"), None)
    if base is None or not base.get("train_ops"):
        return ""
    b = base["train_ops_breakdown"]
    if not all(k in b for k in ATTENTION_PARTS):
        return ""
    att = sum(b[k] for k in ATTENTION_PARTS)
    rest = base["train_ops"] - att
    out = [f"In the dense step, the attention block (attention core, q/k/v/o projections, LoRA) is "
           f"{100 * att / base['train_ops']:.0f}% of the OPs; the rest ({100 * rest / base['train_ops']:.0f}%, mostly "
           f"the feed-forward) does not depend on the heads. Even removing the whole attention block would give at "
           f"most {base['train_ops'] / rest:.2f}x over the step."]
    for s in summaries:
        d = s.get("train_ops_breakdown", {})
        if s is base or not all(k in d for k in ATTENTION_PARTS):
            continue
        a = sum(d[k] for k in ATTENTION_PARTS)
        out.append(f"{s['arm']}: attention block {_ratio(att, a)} fewer OPs, whole step {_ratio(base['train_ops'], s['train_ops'])}.")
    return " ".join(out)


def write_json(path: Path, cfg_dict: dict, summaries: list[dict], rounds: list[dict], extra: dict | None = None) -> None:
    doc = {"config": cfg_dict, "summary": summaries, "rounds": rounds, **(extra or {})}
    path.write_text(json.dumps(doc, indent=1, sort_keys=False, default=_jsonable))


def _jsonable(x):
    if hasattr(x, "tolist"):
        return x.tolist()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    raise TypeError(f"not JSON serializable: {type(x).__name__}")


def write_plot(path: Path, rounds_by_arm: dict[str, list[dict]]) -> bool:
    """Accuracy vs cumulative uploaded bytes (log scale) and vs rounds. False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for arm, rows in rounds_by_arm.items():
        acc = [100 * r["test_acc"] for r in rows]
        ax1.plot([r["cum_upload_bytes"] for r in rows], acc, marker="o", ms=3, label=arm)
        ax2.plot([r["round"] for r in rows], acc, marker="o", ms=3, label=arm)
    ax1.set_xscale("log")
    ax1.set_xlabel("cumulative uploaded bytes (measured payload lengths)")
    ax2.set_xlabel("round")
    for ax in (ax1, ax2):
        ax.set_ylabel("test accuracy (%)")
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle("all-MiniLM-L6-v2 + LoRA on BBC News, federated")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
