"""run(cfg): every arm of the experiment on one split and seed, then the table, JSON and PNG."""
from __future__ import annotations

import platform
import time
from pathlib import Path

import torch

from . import report
from .arms import make_arm
from .config import RunConfig
from .engine import prepare, run_arm


def run(cfg: RunConfig) -> dict:
    """Returns {"summaries", "rounds", "table", "json", "png", "markdown"} (paths as strings)."""
    cfg.validate()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    fed = prepare(cfg)
    setup_s = time.perf_counter() - t0
    summaries, rounds, by_arm = [], [], {}
    for name in cfg.arms:
        res = run_arm(fed, make_arm(name, cfg), progress=cfg.progress)
        summaries.append(res.summary)
        rounds += res.rounds
        by_arm[name] = res.rounds
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg_dict = cfg.to_dict()
    table = report.render(summaries, cfg_dict)
    extra = {"setup_s": setup_s, "total_s": time.perf_counter() - t0, "torch_threads": torch.get_num_threads(),
             "machine": platform.platform(), "split_sizes": {"test": len(fed.split.test),
                                                            "clients": [len(c) for c in fed.split.clients]},
             "label_histogram": fed.split.label_histogram(fed.data.labels.numpy(), fed.n_classes).tolist(),
             "classes": fed.data.classes}
    json_path, png_path, md_path = out / "rounds.json", out / "accuracy.png", out / "report.md"
    report.write_json(json_path, cfg_dict, summaries, rounds, extra)
    has_png = report.write_plot(png_path, by_arm)
    md_path.write_text(table + f"\n\nsetup {setup_s:.0f} s, total {extra['total_s']:.0f} s, "
                       f"{extra['torch_threads']} torch threads\n")
    return {"summaries": summaries, "rounds": rounds, "table": table, "json": str(json_path),
            "png": str(png_path) if has_png else None, "markdown": str(md_path)}
