"""Flower's deployment engine on 127.0.0.1: one SuperLink, N SuperNodes, `flwr run`, and everything stopped.

    with LocalDeployment(n_supernodes=3) as dep:          # starts flower-superlink and 3 flower-supernode
        run = dep.run(write_app(dir, "fedsparse.flower.demo_app"), {"num-rounds": 2}, timeout=300)
    print(run.status, run.traffic)                        # "finished:completed", bytes Flower counted

Loopback only and insecure (no TLS, no node authentication: docs/flower.md says how to deploy on real
machines). Runtime dependency installation is disabled on every component: apps run in the current Python
environment, which must have fedsparse (and torch etc. for the ClientApp) installed.

Stopping is not best effort. Every process is started in its own process group, with a marker variable in
its environment that the processes Flower spawns (SuperExec, flwr-serverapp, flwr-clientapp, some in new
sessions) inherit, and on Linux with a parent-death signal. stop() (also on exceptions, timeouts and
KeyboardInterrupt, via the context manager) sends SIGTERM to the groups and to every marked process, waits,
then SIGKILLs whatever is left, and checks again. It only ever signals processes that carry this
deployment's marker or that it started itself.

`run_experiment(cfg)` is what `fedsparse run --engine flower` calls: the main job of fedsparse.experiment,
run through such a deployment, with the same result structure as fedsparse.experiment.run(cfg).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

MARKER_ENV = "FEDSPARSE_FLOWER_DEPLOYMENT"
CONNECTION = "fedsparse-local"


class DeploymentError(RuntimeError):
    """A component failed to start, died, or a run did not finish in time; the message has the log tails."""


@dataclass
class RunResult:
    """One `flwr run` on a LocalDeployment.

    run_id; status ("finished:completed" when all went well); details (Flower's status details);
    traffic: bytes Flower counted on its Fleet API for this run (inbound, outbound, total: messages and
    object pushes/pulls between SuperLink and SuperNodes); elapsed_s (wall clock of the run); output (what
    `flwr run --stream` printed: the ServerApp's log); info (the rest of `flwr ls --run-id` JSON).
    """

    run_id: int
    status: str
    details: str
    traffic: dict
    elapsed_s: float
    output: str
    info: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "finished:completed"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _executable(name: str) -> str:
    """A console script of the running Python environment (Flower's components spawn each other by name)."""
    here = Path(sys.executable).parent / name
    if here.exists():
        return str(here)
    found = shutil.which(name)
    if found is None:
        raise DeploymentError(f"{name} not found next to {sys.executable} or on PATH: "
                              "install Flower (`pip install 'fedsparse[flower]'`)")
    return found


def _preexec_die_with_parent():  # pragma: no cover - runs in the child
    """Linux: SIGKILL this child when the process that started it dies (even by SIGKILL)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def marked_pids(token: str) -> list[int]:
    """PIDs of the live processes whose environment carries this deployment's marker (never our own)."""
    needle = f"{MARKER_ENV}={token}".encode()
    pids = []
    if sys.platform.startswith("linux") and os.path.isdir("/proc"):
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    env = f.read()
            except OSError:  # gone, or not ours
                continue
            if needle in env.split(b"\0"):
                pids.append(int(entry))
        return pids
    try:  # elsewhere: psutil when it is there
        import psutil
    except ImportError:
        return pids
    for p in psutil.process_iter():
        try:
            if p.pid != os.getpid() and p.environ().get(MARKER_ENV) == token:
                pids.append(p.pid)
        except (psutil.Error, OSError):
            continue
    return pids


def _signal(pid: int, sig: int, group: bool = False) -> None:
    try:
        (os.killpg if group else os.kill)(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class LocalDeployment:
    """One flower-superlink and n_supernodes flower-supernode on 127.0.0.1; see the module docstring.

    node_config: per SuperNode i, a dict (or a callable i -> dict) of its node config; default
        {"partition-id": i, "num-partitions": n_supernodes}.
    workdir: where logs, FLWR_HOME and app files go (default: a new temporary folder, removed by stop()
        unless keep_workdir).
    env: extra environment variables for every component (e.g. {"OMP_NUM_THREADS": "1"}).
    startup_timeout: seconds for the SuperLink to listen and the SuperNodes to come up.
    stop_timeout: seconds between SIGTERM and SIGKILL.
    """

    def __init__(self, n_supernodes: int = 3, *, node_config=None, workdir: str | os.PathLike | None = None,
                 env: dict | None = None, startup_timeout: float = 60.0, stop_timeout: float = 5.0,
                 keep_workdir: bool = False):
        if n_supernodes < 1:
            raise ValueError(f"n_supernodes must be >= 1, got {n_supernodes}")
        self.n_supernodes = n_supernodes
        self.node_config = node_config
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.token = uuid.uuid4().hex
        self._own_workdir = workdir is None
        self.keep_workdir = keep_workdir
        self.workdir = Path(tempfile.mkdtemp(prefix="fedsparse-flower-")) if workdir is None else Path(workdir)
        self.extra_env = dict(env or {})
        self.port: int | None = None
        self._procs: list[tuple[str, subprocess.Popen, Path]] = []
        self._started = False

    # -- lifecycle ---------------------------------------------------------------------------------------------

    def __enter__(self) -> "LocalDeployment":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def env(self) -> dict:
        env = dict(os.environ)
        bindir = str(Path(sys.executable).parent)
        env.update({
            MARKER_ENV: self.token,
            "FLWR_HOME": str(self.workdir / "flwr-home"),
            "FLWR_TELEMETRY_ENABLED": "0",        # nothing leaves the machine
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2",
            "PATH": bindir + os.pathsep + env.get("PATH", ""),
            "PYTHONUNBUFFERED": "1",
        })
        env.update(self.extra_env)
        return env

    def _node_config(self, i: int) -> dict:
        if self.node_config is None:
            return {"partition-id": i, "num-partitions": self.n_supernodes}
        return dict(self.node_config(i) if callable(self.node_config) else self.node_config[i])

    def start(self) -> None:
        """Start the SuperLink, wait until it listens, start the SuperNodes."""
        if self._started:
            return
        self._started = True
        (self.workdir / "logs").mkdir(parents=True, exist_ok=True)
        home = self.workdir / "flwr-home"
        home.mkdir(parents=True, exist_ok=True)
        self.port = _free_port()
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "127.0.0.1:{self.port}"\ninsecure = true\n')
        self._spawn("superlink", [_executable("flower-superlink"), "--insecure", "--host", "127.0.0.1",
                                  "--port", str(self.port), "--disable-runtime-dependency-installation"])
        self._wait_listening(self.port, "superlink")
        for i in range(self.n_supernodes):
            cfg = " ".join(f"{k}={_toml_value(v)}" for k, v in self._node_config(i).items())
            cmd = [_executable("flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{self.port}",
                   "--host", "127.0.0.1", "--port", str(_free_port()), "--max-wait-time", "60"]
            if cfg:
                cmd += ["--node-config", cfg]
            # Runtime dependency installation is off by default on a SuperNode (--allow-... would enable it).
            self._spawn(f"supernode-{i}", cmd)
        time.sleep(0.5)
        self._check_alive()

    def stop(self) -> None:
        """Stop every process of this deployment (SIGTERM, then SIGKILL), then remove the temporary workdir."""
        try:
            self._terminate()
        finally:
            if self._own_workdir and not self.keep_workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)

    def _terminate(self) -> None:
        procs = list(self._procs)
        if not procs:
            return
        marked = marked_pids(self.token)
        for _, p, _ in reversed(procs):  # SuperNodes first, so they do not reconnect
            _signal(p.pid, signal.SIGTERM, group=True)
        for pid in marked:
            _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout
        while time.monotonic() < deadline:
            if all(p.poll() is not None for _, p, _ in procs) and not marked_pids(self.token):
                break
            time.sleep(0.1)
        for _ in range(3):  # stragglers, and anything spawned while we were stopping
            for _, p, _ in procs:
                _signal(p.pid, signal.SIGKILL, group=True)
            left = marked_pids(self.token)
            for pid in left:
                _signal(pid, signal.SIGKILL)
            if not left:
                break
            time.sleep(0.2)
        for _, p, _ in procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILLed above
                pass
        self._procs = []

    def alive(self) -> list[int]:
        """PIDs of this deployment's processes still running (empty after stop())."""
        pids = {p.pid for _, p, _ in self._procs if p.poll() is None}
        return sorted(pids | set(marked_pids(self.token)))

    # -- running apps ------------------------------------------------------------------------------------------

    def run(self, app_dir: str | os.PathLike, run_config: dict | None = None, *, timeout: float = 600.0,
            echo: bool = False) -> RunResult:
        """`flwr run app_dir` on this deployment and wait for the run to finish (at most `timeout` seconds).

        run_config overrides the app's [tool.flwr.app.config] (keys must exist there). Raises
        DeploymentError if the run does not finish in time or a component dies; the deployment keeps
        running either way (use the context manager, or stop()).
        """
        if not self._started:
            self.start()
        overrides = None
        if run_config:
            overrides = self.workdir / f"run-config-{uuid.uuid4().hex[:8]}.toml"
            overrides.write_text("".join(f"{k} = {_toml_value(v)}\n" for k, v in run_config.items()))
        cmd = [_executable("flwr"), "run", str(Path(app_dir).resolve()), CONNECTION, "--stream"]
        if overrides is not None:
            cmd += ["--run-config", str(overrides)]
        log = self.workdir / "logs" / f"flwr-run-{len(self._procs)}.log"
        t0 = time.perf_counter()
        proc = self._spawn("flwr-run", cmd, log=log)
        deadline = time.monotonic() + timeout
        while proc.poll() is None:
            if time.monotonic() > deadline:
                _signal(proc.pid, signal.SIGKILL, group=True)
                raise DeploymentError(f"the run did not finish in {timeout:.0f} s\n{self.log_tails()}")
            self._check_alive(skip={"flwr-run"})
            time.sleep(0.2)
        elapsed = time.perf_counter() - t0
        output = log.read_text(errors="replace")
        if echo:
            print(output)
        m = re.search(r"Successfully started run (\d+)", output)
        if proc.returncode != 0 or m is None:
            raise DeploymentError(f"`flwr run` failed (exit {proc.returncode})\n{self.log_tails()}")
        run_id = int(m.group(1))
        info = self.run_info(run_id)
        traffic = info.get("network-traffic", {})
        return RunResult(run_id=run_id, status=str(info.get("status", "unknown")),
                         details=str(info.get("status-details", "")),
                         traffic={"inbound": int(traffic.get("inbound-bytes", 0)),
                                  "outbound": int(traffic.get("outbound-bytes", 0)),
                                  "total": int(traffic.get("total-bytes", 0))},
                         elapsed_s=elapsed, output=output, info=info)

    def run_info(self, run_id: int) -> dict:
        """`flwr ls --run-id` as a dict (status, network-traffic, compute-time, ...)."""
        out = subprocess.run([_executable("flwr"), "ls", CONNECTION, "--run-id", str(run_id), "--format", "json"],
                             env=self.env, capture_output=True, text=True, timeout=60,
                             start_new_session=True)
        try:
            data = json.loads(out.stdout[out.stdout.index("{"):])
        except ValueError:
            raise DeploymentError(f"`flwr ls` gave no JSON (exit {out.returncode}): {out.stdout[-2000:]}"
                                  f"{out.stderr[-2000:]}") from None
        runs = data.get("runs", [])
        return runs[0] if runs else {}

    # -- helpers -----------------------------------------------------------------------------------------------

    def _spawn(self, name: str, cmd: list, log: Path | None = None) -> subprocess.Popen:
        log = log or self.workdir / "logs" / f"{name}.log"
        with open(log, "ab") as f:
            kw = {"preexec_fn": _preexec_die_with_parent} if sys.platform.startswith("linux") else {}
            p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT, env=self.env,
                                 cwd=str(self.workdir), start_new_session=True, **kw)
        self._procs.append((name, p, log))
        return p

    def _wait_listening(self, port: int, name: str) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.2)
        raise DeploymentError(f"{name} did not listen on 127.0.0.1:{port} in {self.startup_timeout:.0f} s\n"
                              f"{self.log_tails()}")

    def _check_alive(self, skip=()) -> None:
        dead = [(n, p.returncode) for n, p, _ in self._procs if n not in skip and p.poll() is not None]
        if dead:
            raise DeploymentError(f"{', '.join(f'{n} (exit {rc})' for n, rc in dead)} stopped\n{self.log_tails()}")

    def log_tails(self, n_chars: int = 3000) -> str:
        parts = []
        for name, _, log in self._procs:
            try:
                text = log.read_text(errors="replace")[-n_chars:]
            except OSError:
                text = "(no log)"
            parts.append(f"----- {name} ({log}) -----\n{text}")
        return "\n".join(parts)


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(str(v))  # a TOML basic string


# -- Flower app folders --------------------------------------------------------------------------------------

def write_app(directory: str | os.PathLike, module: str = "fedsparse.flower.demo_app", *,
              config: dict | None = None, name: str = "fedsparse-app", version: str = "1.0.0") -> Path:
    """Write a Flower app folder (a pyproject.toml) whose ServerApp and ClientApp are `module`'s server_app and
    client_app, with run config defaults `config` (default: the module's DEFAULTS). The code itself comes
    from the installed fedsparse: the app folder carries no Python."""
    import importlib

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if config is None:
        config = dict(getattr(importlib.import_module(module), "DEFAULTS", {}))
    lines = [
        "[build-system]", 'requires = ["hatchling"]', 'build-backend = "hatchling.build"', "",
        "[project]", f'name = "{name}"', f'version = "{version}"',
        'description = "fedsparse on Flower: packed head-sparse LoRA updates"', 'license = "Apache-2.0"',
        'dependencies = ["fedsparse[flower]"]', "",
        "[tool.flwr.app]", 'publisher = "fedsparse"', "",
        "[tool.flwr.app.components]", f'serverapp = "{module}:server_app"', f'clientapp = "{module}:client_app"', "",
        "[tool.flwr.app.config]",
    ]
    lines += [f"{k} = {_toml_value(v)}" for k, v in config.items()]
    (directory / "pyproject.toml").write_text("\n".join(lines) + "\n")
    return directory


# -- `fedsparse run --engine flower` -------------------------------------------------------------------------

def run_experiment(cfg, *, n_supernodes: int | None = None, timeout: float | None = None,
                   keep_workdir: bool = False) -> dict:
    """The main job of fedsparse.experiment (every arm of cfg) through Flower's deployment engine on loopback.

    cfg: a fedsparse.experiment.RunConfig. Starts one SuperLink and n_supernodes SuperNodes (default
    min(cfg.n_clients, 3)); the experiment's clients are virtual clients spread over them (client c runs on
    node c mod n). Returns what fedsparse.experiment.run(cfg) returns ({"summaries", "rounds", "table", "json",
    "png", "markdown"}) plus "flower": {"runs": [per-arm run id, status, Flower traffic, seconds]}. For the
    same cfg (seed, threads) accuracy and payload bytes equal the in-process engine's.
    """
    from .experiment_app import run_with_deployment

    return run_with_deployment(cfg, n_supernodes=n_supernodes, timeout=timeout, keep_workdir=keep_workdir)


def main(argv=None) -> int:
    """python -m fedsparse.flower.deploy: write an app folder, or run the demo app on a loopback deployment."""
    ap = argparse.ArgumentParser(prog="python -m fedsparse.flower.deploy", description=main.__doc__)
    ap.add_argument("--write-app", metavar="DIR", help="write a Flower app folder for --module and exit")
    ap.add_argument("--module", default="fedsparse.flower.demo_app")
    ap.add_argument("--supernodes", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--run-config", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    if args.write_app:
        print(write_app(args.write_app, args.module))
        return 0
    overrides = {}
    for kv in args.run_config:
        k, _, v = kv.partition("=")
        try:
            overrides[k] = json.loads(v)
        except ValueError:
            overrides[k] = v
    with LocalDeployment(args.supernodes) as dep:
        app = write_app(dep.workdir / "app", args.module)
        result = dep.run(app, overrides, timeout=args.timeout, echo=True)
    print(f"run {result.run_id}: {result.status}, {result.elapsed_s:.1f} s, Flower traffic {result.traffic}")
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
