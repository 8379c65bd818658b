"""fedsparse on Flower (the `flower` extra: `pip install 'fedsparse[flower]'`).

    FedSparse            the Strategy (Message API, a FedAvg subclass): select_clients, packed broadcast,
                         head-wise / multi-branch aggregation of packed payloads        (strategy.py)
    fedsparse_mod        the client Mod; global_update, apply_update, train_reply helpers (client.py)
    LocalDeployment      SuperLink + N SuperNodes on 127.0.0.1, always stopped             (deploy.py)
    write_app            a Flower app folder for an app module
    run_experiment       `fedsparse run --engine flower`

docs/flower.md covers deploying on real machines (TLS, SuperNode authentication) and the options.
Names resolve lazily, so `import fedsparse.flower` works (and says what to install) without Flower.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "FedSparse": "strategy", "ADDITIVE_METHODS": "strategy",
    "fedsparse_mod": "client", "global_update": "client", "global_payload": "client", "apply_update": "client",
    "train_reply": "client", "client_id": "client",
    "LocalDeployment": "deploy", "DeploymentError": "deploy", "RunResult": "deploy", "write_app": "deploy",
    "run_experiment": "deploy",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'fedsparse.flower' has no attribute {name!r}")
    try:
        module = importlib.import_module(f".{_EXPORTS[name]}", __name__)
    except ImportError as exc:
        if getattr(exc, "name", "") and exc.name.split(".")[0] == "flwr":
            raise ImportError("fedsparse.flower needs Flower: `pip install 'fedsparse[flower]'` "
                              f"(flwr>=1.41) ({exc})") from exc
        raise
    return getattr(module, name)
