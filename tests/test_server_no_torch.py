"""The server side (unpack, aggregate, select_clients) imports and runs where torch cannot be imported."""
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import sys

    class NoTorch:
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch.") or name == "triton" or name.startswith("triton."):
                raise ImportError(f"{name} is blocked in this test")
            return None

    sys.meta_path.insert(0, NoTorch())
    import numpy as np
    import fedsparse
    from fedsparse.server import aggregate, select_clients

    rng = np.random.default_rng(0)
    payloads = []
    for k, r in enumerate([4, 4, 8]):
        update = {"m.layers.0.q_proj.lora_A.weight": rng.standard_normal((r, 16)).astype(np.float32),
                  "m.layers.0.q_proj.lora_B.weight": rng.standard_normal((16, r)).astype(np.float32)}
        payloads.append(fedsparse.pack(update, head_mask={"m.layers.0.q_proj": np.array([True, False, True, True])},
                                       metadata={"client_id": k, "num_examples": 10 + k,
                                                 "head_scores": rng.random(4).astype(np.float32)}))
    same_rank = payloads[:2]
    for method in ("fedavg", "headwise", "median", "trimmed_mean", "multibranch"):
        res = aggregate(same_rank, method=method)
        assert len(res.client_update(0)) == 2, method
    for method in ("hetlora", "flora", "flexlora"):
        assert aggregate(payloads, method=method).client_update(2)["m.layers.0.q_proj.lora_A.weight"].shape[0] >= 8
    again = fedsparse.unpack(fedsparse.pack(aggregate(same_rank)))
    assert sorted(again) == sorted(fedsparse.unpack(payloads[0]))
    stats = {i: {"global_loss": 1.0 + i, "local_loss": 0.5} for i in range(10)}
    assert len(select_clients(stats, 3, seed=0)) == 3
    assert "torch" not in sys.modules
    print("ok")
""")


def test_server_runs_without_torch():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("ok")
