"""select_clients(): which clients train in the next round (loss-gap / Power-of-Choice, with exploration
and a fairness bound). Pure Python + numpy; deterministic for a given seed.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

STRATEGIES = ("loss_gap", "random", "all")


def _canonical_order(ids: list) -> list:
    """Client ids in an order that does not depend on the mapping's insertion order."""
    try:
        return sorted(ids)
    except TypeError:  # mixed id types
        return sorted(ids, key=lambda c: (type(c).__name__, repr(c)))


def _number(cid, stats: Mapping, key: str, default=None) -> float:
    if key not in stats:
        if default is None:
            raise ValueError(f"client {cid!r}: stats lack {key!r}")
        return default
    try:
        value = float(stats[key])
    except (TypeError, ValueError):
        raise ValueError(f"client {cid!r}: stats[{key!r}] = {stats[key]!r} is not a number") from None
    if not math.isfinite(value):
        raise ValueError(f"client {cid!r}: stats[{key!r}] is {value} (NaN or Inf)")
    return value


def _forced(ids: list, last: dict, now: int, max_skip: int, k: int, rng) -> list:
    """The clients that must be selected this round so that every deadline stays reachable (EDF)."""
    raw = {c: last[c] + max_skip + 1 for c in ids}
    deadline = {c: max(now, raw[c]) for c in ids}  # one already missed is due now
    tiebreak = dict(zip(ids, rng.permutation(len(ids))))
    order = sorted(ids, key=lambda c: (raw[c], tiebreak[c]))  # the most overdue first
    need = 0
    for i, c in enumerate(order):  # clients order[:i+1] are all due by deadline[c]
        if i + 1 < len(order) and deadline[order[i + 1]] == deadline[c]:
            continue
        need = max(need, i + 1 - k * (deadline[c] - now))
    return order[:min(k, int(need))]


def select_clients(
    stats: Mapping,
    k: int,
    *,
    strategy: str = "loss_gap",
    explore: float = 0.1,
    seed: int | None = None,
    round: int | None = None,  # noqa: A002 - the federated round, as users name it
    max_skip: int | None = None,
    candidates: int | None = None,
) -> list:
    """Choose k client ids for the next round.

    stats: client id -> dict with "global_loss" (the global model's loss on the client's data) and
        "local_loss" (the client's loss after local training), optionally "num_examples" (> 0) and
        "last_round" (the last round the client was selected; absent: never).
    strategy:
        "loss_gap": the clients with the largest gap global_loss - local_loss (the global model helps them
            least), Power-of-Choice style. With `candidates=d`, a candidate set of d clients is drawn first
            (without replacement, probability proportional to num_examples) and the top gaps are taken from
            it. `explore` (a fraction of k, rounded) of the slots go to clients drawn uniformly at random
            from the rest, so clients whose statistics are stale are revisited.
        "random": k clients uniformly at random. "all": every client (k is ignored).
    Fairness bound (all strategies): with `max_skip=N` and the current `round` (default: 1 + the largest
        last_round), a client last selected in round r0 must be selected by round r0 + N + 1 (its deadline).
        Each round forces in, earliest deadline first, the fewest clients that keep every future deadline
        reachable with k per round (for every d: #clients due by d <= k (d - round + 1)). So no client is
        skipped more than N rounds in a row whenever that is possible at all; k (N + 1) >= n suffices. A client
        never selected counts as last selected in round -1.
    seed: the same stats, k and seed give the same choice, whatever the mapping's order.

    Returns a list of k ids (all ids for "all"; every id when k >= the number of clients): forced clients
    first, then by priority, then explored ones.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if not isinstance(stats, Mapping):
        raise TypeError(f"stats must be a mapping of client ids to dicts, got {type(stats).__name__}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
        raise ValueError(f"k must be a non-negative integer, got {k!r}")
    if not 0.0 <= explore <= 1.0:
        raise ValueError(f"explore must be a fraction in [0, 1], got {explore!r}")
    if max_skip is not None and max_skip < 0:
        raise ValueError(f"max_skip must be >= 0, got {max_skip!r}")
    ids = _canonical_order(list(stats))
    if strategy == "all":
        return ids
    k = min(int(k), len(ids))
    if k == 0:
        return []
    rng = np.random.default_rng(seed)

    last = {}
    for cid in ids:
        s = stats[cid]
        if not isinstance(s, Mapping):
            raise TypeError(f"client {cid!r}: stats must be a dict, got {type(s).__name__}")
        last[cid] = _number(cid, s, "last_round", -1.0)
    chosen: list = []
    if max_skip is not None:
        now = round if round is not None else (max(last.values()) + 1 if last else 0)
        chosen = _forced(ids, last, now, max_skip, k, rng)
    forced = set(chosen)
    rest = [c for c in ids if c not in forced]
    slots = k - len(chosen)
    if slots == 0:
        return chosen

    if strategy == "random":
        picked = rng.choice(len(rest), size=slots, replace=False)
        return chosen + [rest[i] for i in picked]

    gap = {}
    for cid in rest:
        s = stats[cid]
        gap[cid] = _number(cid, s, "global_loss") - _number(cid, s, "local_loss")
    n_explore = min(slots, int(math.floor(explore * k + 0.5))) if explore > 0 else 0
    n_greedy = slots - n_explore
    pool = rest
    if candidates is not None:
        if candidates < n_greedy:
            raise ValueError(f"candidates={candidates} is smaller than the {n_greedy} greedy slots")
        if candidates < len(rest):
            sizes = np.array([_number(c, stats[c], "num_examples", 1.0) for c in rest])
            if (sizes <= 0).any():
                bad = rest[int(np.argmax(sizes <= 0))]
                raise ValueError(f"client {bad!r}: num_examples must be > 0")
            picked = rng.choice(len(rest), size=candidates, replace=False, p=sizes / sizes.sum())
            pool = [rest[i] for i in sorted(picked)]
    # Highest gap first; ties broken by a seeded random key, not by id.
    tiebreak = rng.permutation(len(pool))
    order = sorted(range(len(pool)), key=lambda i: (-gap[pool[i]], tiebreak[i]))
    greedy = [pool[i] for i in order[:n_greedy]]
    taken = set(greedy)
    remaining = [c for c in rest if c not in taken]
    explored = [remaining[i] for i in rng.choice(len(remaining), size=min(n_explore, len(remaining)),
                                                  replace=False)] if n_explore else []
    return chosen + greedy + explored
