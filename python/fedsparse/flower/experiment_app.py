"""`fedsparse run --engine flower`: the main job of fedsparse.experiment on Flower's deployment engine.

The in-process engine (fedsparse.experiment.engine) is the spec: its ArmRunner does the client's round
(client_round) and the server's steps (select, download_payload, server_round, evaluate). Here the same
calls run on the two sides of a real Flower deployment, and everything between them crosses Flower:

  ServerApp (one `flwr run` per arm)         ClientApp (one process per message, on the SuperNodes)
  ExperimentStrategy, a FedSparse:
    configure_train: runner.select(rnd),
      runner.download_payload(b, rnd)  ---->  ArmRunner(...).client_round(cid, rnd, download)
    aggregate_train: runner.server_round  <----  payload + info (ops, losses) + num-examples
      (replies in selection order), runner.evaluate(b)

The experiment's clients are virtual clients on the SuperNodes: client c runs on node c mod N (sorted node
ids); a client's data is found by its id, so which node runs it does not change any number. Clients of a
round train in parallel on different nodes, each seeded exactly as in-process, so with the same settings
(seed, threads) the accuracy and the payload bytes equal the in-process engine's.
"""
from __future__ import annotations

import json
import math
import platform
import time
from logging import INFO
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log

from .client import CLIENT_ID_KEY, global_payload, train_reply
from .strategy import FedSparse

ARM_KEY = "fedsparse.arm"
CONFIG_KEY = "fedsparse.config"
INFO_KEY = "fedsparse.info"
DEFAULTS = {"config-path": "", "result-path": "", "arm": "", "supernodes": 1, "round-timeout": 3600.0}


def _run_config(cfg_dict: dict):
    from ..experiment.config import RunConfig

    return RunConfig(**cfg_dict).validate()


def _set_threads(cfg) -> None:
    if cfg.threads > 0:
        import torch

        torch.set_num_threads(cfg.threads)


# -- server --------------------------------------------------------------------------------------------------

class ExperimentStrategy(FedSparse):
    """FedSparse whose selection, broadcast and aggregation are the experiment engine's (an ArmRunner), so
    every number matches the in-process engine; `rows` and `summary()` mirror fedsparse.experiment.engine.run_arm.
    """

    def __init__(self, runner, fed, arm, cfg_json: str, n_nodes: int):
        super().__init__(clients_per_round=fed.cfg.clients_per_round, min_available_nodes=n_nodes,
                         min_train_nodes=1, fraction_evaluate=0.0, selection=arm.selection,
                         seed=fed.cfg.seed, method="multibranch" if fed.cfg.hetero else arm.aggregation,
                         bits=arm.bits, group_size=fed.cfg.group_size)
        self.runner, self.fed, self.arm, self.cfg_json = runner, fed, arm, cfg_json
        self.branch_index = {br.name: b for b, br in enumerate(fed.branches)}
        self.rows: list[dict] = []
        self.t0 = time.perf_counter()
        self.cum_up = self.cum_down = 0
        self._selected: list = []

    def client_nodes(self, grid: Grid) -> dict:
        nodes = sorted(self.wait_for_nodes(grid, self.min_available_nodes))
        return {c: nodes[c % len(nodes)] for c in range(self.fed.cfg.n_clients)}

    def select(self, server_round: int, clients: list) -> list:
        self._selected = [int(c) for c in self.runner.select(server_round)]
        self._t_round = time.perf_counter()
        return self._selected

    def branches_for(self, cid) -> list:
        return [self.fed.branches[self.fed.client_branch[cid]].name]

    def downlink_payload(self, branch: str, server_round: int) -> bytes:
        return self.runner.download_payload(self.branch_index[branch], server_round)

    def message_config(self, cid, server_round: int) -> dict:
        return {CLIENT_ID_KEY: int(cid), ARM_KEY: self.arm.name, CONFIG_KEY: self.cfg_json}

    def reply_client(self, msg: Message):
        return int(msg.content.metric_records["metrics"]["client-id"])

    def record_stats(self, server_round: int, cids: list, metrics: list) -> None:
        pass  # the runner's server_round records the loss statistics from the payloads, as in-process

    def global_arrays(self, server_round: int):
        from ._records import global_record

        return global_record({br.name: self._downlink(br.name, server_round + 1) for br in self.fed.branches})

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        self._infos = {}
        for m in replies:
            if not m.has_error():
                info = json.loads(m.content.config_records[INFO_KEY]["json"])
                self._infos[int(info["client"])] = info
        bad = [m.error.reason for m in replies if m.has_error()]
        if bad:  # the in-process engine has no partial rounds: a failed client fails the run
            raise RuntimeError(f"round {server_round}: {len(bad)} client(s) failed: {bad[0]}")
        return super().aggregate_train(server_round, replies)

    def fold(self, server_round: int, cids: list, payloads: list, metrics: list, **_) -> None:
        from ..experiment.engine import account_client

        fed, runner = self.fed, self.runner
        by_cid = dict(zip(cids, payloads))
        missing = [c for c in self._selected if c not in by_cid]
        if missing:
            raise RuntimeError(f"round {server_round}: no reply from clients {missing}")
        by_branch: dict = {}
        clients, up, down, round_ops = [], [], [], {}
        downloads = {b: self._downlink(fed.branches[b].name, server_round)
                     for b in set(fed.client_branch[c] for c in self._selected)}
        for cid in self._selected:  # the in-process engine's order: aggregation sums in this order
            b = fed.client_branch[cid]
            payload = by_cid[cid]
            by_branch.setdefault(b, []).append(payload)
            clients.append(account_client(dict(self._infos[cid]), payload, downloads[b], round_ops))
            up.append(len(payload))
            down.append(len(downloads[b]))
        server_info = runner.server_round(server_round, by_branch)
        evals = {fed.branches[b].name: runner.evaluate(b) for b in range(len(fed.branches))}
        acc = sum(a for a, _ in evals.values()) / len(evals)
        self.cum_up += sum(up)
        self.cum_down += sum(down)
        self.rows.append({
            "arm": self.arm.name, "round": server_round, "selected": list(self._selected),
            "upload_bytes": int(sum(up)), "download_bytes": int(sum(down)),
            "cum_upload_bytes": int(self.cum_up), "cum_download_bytes": int(self.cum_down),
            "test_acc": float(acc), "test_loss": float(sum(l for _, l in evals.values()) / len(evals)),
            "test_by_branch": {k: {"acc": a, "loss": l} for k, (a, l) in evals.items()},
            "train_ops": round_ops.get("total", 0.0), "train_ops_breakdown": round_ops,
            "round_s": time.perf_counter() - self._t_round, "elapsed_s": time.perf_counter() - self.t0,
            "server": server_info, "clients": clients, "engine": "flower"})
        log(INFO, "arm %s round %d: acc %.4f, up %d B, down %d B", self.arm.name, server_round, acc, sum(up),
            sum(down))

    def arm_summary(self) -> dict:
        from ..experiment.engine import summarize

        return summarize(self.arm, self.rows, wall_s=time.perf_counter() - self.t0)


server_app = ServerApp()


@server_app.main()
def server_main(grid: Grid, context: Context) -> None:
    from ..experiment.arms import make_arm
    from ..experiment.engine import ArmRunner, prepare

    rc = {**DEFAULTS, **dict(context.run_config)}
    cfg_dict = json.loads(Path(str(rc["config-path"])).read_text())
    cfg = _run_config(cfg_dict)
    _set_threads(cfg)
    t0 = time.perf_counter()
    fed = prepare(cfg)
    setup_s = time.perf_counter() - t0
    arm = make_arm(str(rc["arm"]), cfg)
    runner = ArmRunner(fed, arm)
    strategy = ExperimentStrategy(runner, fed, arm, json.dumps(cfg_dict), int(rc["supernodes"]))
    strategy.start(grid=grid, initial_arrays=strategy.global_arrays(0), num_rounds=cfg.rounds,
                   timeout=float(rc["round-timeout"]), train_config=ConfigRecord())
    if len(strategy.rows) != cfg.rounds:
        raise RuntimeError(f"arm {arm.name}: {len(strategy.rows)} of {cfg.rounds} rounds completed")
    import torch

    extra = {"setup_s": setup_s, "torch_threads": torch.get_num_threads(), "machine": platform.platform(),
             "split_sizes": {"test": len(fed.split.test), "clients": [len(c) for c in fed.split.clients]},
             "label_histogram": fed.split.label_histogram(fed.data.labels.numpy(), fed.n_classes).tolist(),
             "classes": fed.data.classes}
    out = {"summary": strategy.arm_summary(), "rounds": strategy.rows, "extra": extra}
    Path(str(rc["result-path"])).write_text(json.dumps(out, default=_json_default))


def _json_default(x):
    import numpy as np

    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.floating):
        return float(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"{type(x).__name__} is not JSON serializable")


# -- client --------------------------------------------------------------------------------------------------

client_app = ClientApp()
_RUNNERS: dict = {}


def _runner(cfg_json: str, arm_name: str):
    """The ArmRunner of this (settings, arm): built once per process (a ClientApp process serves one message
    under Flower's subprocess isolation, more under other isolation modes)."""
    key = (cfg_json, arm_name)
    if key not in _RUNNERS:
        from ..experiment.arms import make_arm
        from ..experiment.engine import ArmRunner, prepare

        cfg = _run_config(json.loads(cfg_json))
        _set_threads(cfg)
        fed = prepare(cfg)
        _RUNNERS.clear()
        _RUNNERS[key] = (fed, ArmRunner(fed, make_arm(arm_name, cfg)))
    return _RUNNERS[key]


@client_app.train()
def client_train(msg: Message, context: Context) -> Message:
    config = msg.content.config_records["config"]
    cid, rnd = int(config[CLIENT_ID_KEY]), int(config["server-round"])
    fed, runner = _runner(str(config[CONFIG_KEY]), str(config[ARM_KEY]))
    branch = fed.branches[fed.client_branch[cid]].name
    payload, info = runner.client_round(cid, rnd, global_payload(msg, branch=branch))
    info = json.loads(json.dumps(info, default=_json_default))
    return train_reply(msg, payload, num_examples=int(fed.num_examples(cid)), metrics={"client-id": cid},
                       extra={INFO_KEY: ConfigRecord({"json": json.dumps(info)})})


# -- the caller's side ---------------------------------------------------------------------------------------

def run_with_deployment(cfg, *, n_supernodes: int | None = None, timeout: float | None = None,
                        keep_workdir: bool = False) -> dict:
    """See fedsparse.flower.deploy.run_experiment."""
    import torch

    from ..experiment import report
    from .deploy import LocalDeployment, write_app

    cfg.validate()
    n = n_supernodes or min(cfg.n_clients, 3)
    per_arm = timeout or max(900.0, 90.0 * cfg.rounds * math.ceil(cfg.clients_per_round / n))
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    summaries, rounds, by_arm, runs, extra = [], [], {}, [], {}
    with LocalDeployment(n, keep_workdir=keep_workdir) as dep:
        app = write_app(dep.workdir / "app", __name__, config=DEFAULTS, name="fedsparse-experiment")
        cfg_path = dep.workdir / "run-config.json"
        cfg_path.write_text(json.dumps(cfg.to_dict()))
        for name in cfg.arms:
            result_path = dep.workdir / f"result-{name}.json"
            run = dep.run(app, {"config-path": str(cfg_path), "result-path": str(result_path), "arm": name,
                                "supernodes": n, "round-timeout": float(per_arm)}, timeout=per_arm)
            if not run.ok or not result_path.exists():
                from .deploy import DeploymentError

                raise DeploymentError(f"arm {name}: run {run.run_id} ended {run.status} ({run.details})\n"
                                      f"{run.output[-4000:]}\n{dep.log_tails()}")
            res = json.loads(result_path.read_text())
            summaries.append(res["summary"])
            rounds += res["rounds"]
            by_arm[name] = res["rounds"]
            extra = res["extra"]
            runs.append({"arm": name, "run_id": run.run_id, "status": run.status, "traffic": run.traffic,
                         "seconds": run.elapsed_s})
            if cfg.progress:
                s = res["summary"]
                print(f"{name}: final acc {s['final_acc']:.4f}, up {s['upload_bytes']} B, down {s['download_bytes']} B"
                      f" (Flower counted {run.traffic['total']} B), {run.elapsed_s:.0f} s", flush=True)
    cfg_dict = cfg.to_dict()
    table = report.render(summaries, cfg_dict)
    extra = {**extra, "total_s": time.perf_counter() - t0, "engine": "flower",
             "flower": {"supernodes": n, "runs": runs}}
    extra.setdefault("torch_threads", torch.get_num_threads())
    json_path, png_path, md_path = out / "rounds.json", out / "accuracy.png", out / "report.md"
    report.write_json(json_path, cfg_dict, summaries, rounds, extra)
    has_png = report.write_plot(png_path, by_arm)
    md_path.write_text(table + f"\n\nengine flower ({n} SuperNodes on 127.0.0.1), "
                       f"setup {extra.get('setup_s', 0):.0f} s, total {extra['total_s']:.0f} s, "
                       f"{extra['torch_threads']} torch threads\n")
    return {"summaries": summaries, "rounds": rounds, "table": table, "json": str(json_path),
            "png": str(png_path) if has_png else None, "markdown": str(md_path),
            "flower": {"supernodes": n, "runs": runs}}
