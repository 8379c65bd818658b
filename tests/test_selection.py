"""fedsparse.server.select_clients: loss-gap priority, exploration, fairness bound, determinism."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsparse.server import select_clients


def make_stats(n=20, seed=0, **extra):
    rng = np.random.default_rng(seed)
    return {f"c{i:02d}": {"global_loss": float(2 + rng.random()), "local_loss": float(rng.random()), **extra}
            for i in range(n)}


def gaps(stats):
    return {c: s["global_loss"] - s["local_loss"] for c, s in stats.items()}


def test_loss_gap_without_exploration_takes_the_largest_gaps():
    stats = make_stats()
    chosen = select_clients(stats, 5, explore=0.0, seed=1)
    g = gaps(stats)
    assert chosen == sorted(g, key=g.get, reverse=True)[:5]


def test_exploration_share():
    stats = make_stats(50)
    g = gaps(stats)
    top = sorted(g, key=g.get, reverse=True)
    chosen = select_clients(stats, 10, explore=0.3, seed=3)
    assert len(chosen) == len(set(chosen)) == 10
    assert chosen[:7] == top[:7]  # 7 greedy, then 3 explored from the rest
    assert not set(chosen[7:]) & set(top[:7])


def test_deterministic_per_seed_and_independent_of_mapping_order():
    stats = make_stats(30)
    shuffled = dict(reversed(list(stats.items())))
    for strategy in ("loss_gap", "random"):
        a = select_clients(stats, 8, strategy=strategy, explore=0.5, seed=42)
        assert a == select_clients(stats, 8, strategy=strategy, explore=0.5, seed=42)
        assert a == select_clients(shuffled, 8, strategy=strategy, explore=0.5, seed=42)
    picks = {tuple(select_clients(stats, 8, strategy="random", seed=s)) for s in range(10)}
    assert len(picks) > 1


def test_random_and_all():
    stats = make_stats(12)
    r = select_clients(stats, 4, strategy="random", seed=0)
    assert len(set(r)) == 4 and set(r) <= set(stats)
    assert select_clients(stats, 4, strategy="all") == sorted(stats)
    assert select_clients(stats, 100, seed=0, explore=0) == sorted(gaps(stats), key=gaps(stats).get, reverse=True)
    assert select_clients(stats, 0) == []


def test_power_of_choice_candidates():
    stats = make_stats(40)
    for i, s in enumerate(stats.values()):
        s["num_examples"] = 1 + i
    chosen = select_clients(stats, 5, candidates=10, explore=0.0, seed=7)
    assert len(set(chosen)) == 5
    assert chosen == select_clients(stats, 5, candidates=10, explore=0.0, seed=7)
    with pytest.raises(ValueError, match="candidates"):
        select_clients(stats, 5, candidates=3, explore=0.0)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(2, 25), k=st.integers(1, 10), max_skip=st.integers(0, 6), seed=st.integers(0, 1000),
       strategy=st.sampled_from(["loss_gap", "random"]), explore=st.sampled_from([0.0, 0.2]))
def test_fairness_bound_over_rounds(n, k, max_skip, seed, strategy, explore):
    """No client is ever skipped more than max_skip rounds in a row when k is large enough for that."""
    k = min(k, n)
    if k * (max_skip + 1) < n:
        k = -(-n // (max_skip + 1))
    rng = np.random.default_rng(seed)
    stats = {i: {"global_loss": 1.0 + (i == 0) * 10, "local_loss": 0.0} for i in range(n)}  # client 0 hogs
    last = {i: -1 for i in range(n)}
    for rnd in range(3 * (max_skip + 2)):
        for i in stats:
            stats[i]["last_round"] = last[i]
            stats[i]["local_loss"] = float(rng.random())
        chosen = select_clients(stats, k, strategy=strategy, explore=explore, seed=seed + rnd, round=rnd,
                                max_skip=max_skip)
        assert len(set(chosen)) == len(chosen) == k
        for c in chosen:
            last[c] = rnd
        for i in stats:
            assert rnd - last[i] <= max_skip, f"client {i} skipped {rnd - last[i]} rounds"


def test_fairness_forces_the_most_overdue_first():
    stats = make_stats(6)
    for i, s in enumerate(stats.values()):
        s["last_round"] = i  # c00 last picked in round 0, c05 in round 5
    chosen = select_clients(stats, 2, round=6, max_skip=3, explore=0.0, seed=0)
    assert chosen[:2] == ["c00", "c01"]  # deadlines 0+3+1 and 1+3+1 passed: both due now, the most overdue


def test_bad_input():
    stats = make_stats(5)
    with pytest.raises(ValueError, match="strategy"):
        select_clients(stats, 2, strategy="best")
    with pytest.raises(ValueError, match="k must be"):
        select_clients(stats, -1)
    with pytest.raises(ValueError, match="explore"):
        select_clients(stats, 2, explore=1.5)
    stats["c03"]["local_loss"] = float("nan")
    with pytest.raises(ValueError, match=r"client 'c03': stats\['local_loss'\] is nan"):
        select_clients(stats, 2)
    del stats["c03"]["local_loss"]
    with pytest.raises(ValueError, match=r"client 'c03': stats lack 'local_loss'"):
        select_clients(stats, 2)
