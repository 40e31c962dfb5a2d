"""How a task's training pool is split among N clients: pure functions from labels to index arrays.

Every function is deterministic in its seed and returns disjoint index arrays that together
cover the pool (except `dirichlet`, which also covers it; no sample is dropped anywhere).
"""
from __future__ import annotations

import numpy as np

SCHEMES = ("iid", "dirichlet", "skewed", "by-user")


def iid(num_samples: int, num_clients: int, seed: int) -> list[np.ndarray]:
    """A random permutation cut into N nearly equal parts."""
    order = np.random.default_rng(seed).permutation(num_samples)
    return [np.sort(part) for part in np.array_split(order, num_clients)]


def dirichlet(labels: np.ndarray, num_clients: int, alpha: float, seed: int) -> list[np.ndarray]:
    """Each class's samples are shared among clients in proportions drawn from Dirichlet(alpha).

    Small alpha gives each client few classes; large alpha approaches iid.
    """
    if alpha <= 0:
        raise ValueError(f"alpha must be positive, got {alpha}")
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        shares = rng.dirichlet(np.full(num_clients, alpha))
        cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
        for client, chunk in enumerate(np.split(members, cuts)):
            parts[client].append(chunk)
    return [np.sort(np.concatenate(chunks)) for chunks in parts]


def skewed(labels: np.ndarray, num_clients: int, seed: int, majority: float = 0.9) -> list[np.ndarray]:
    """The original's split, generalised: the classes are cut into N contiguous groups; client k
    holds `majority` of group k's samples, and the rest of group k is shared among the others.

    With two clients and ten classes: A holds 90% of classes 0-4 and 10% of 5-9, B the reverse.
    """
    if not 0 < majority <= 1:
        raise ValueError(f"majority must be in (0, 1], got {majority}")
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    groups = np.array_split(classes, num_clients)
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for owner, group in enumerate(groups):
        members = rng.permutation(np.flatnonzero(np.isin(labels, group)))
        others = [c for c in range(num_clients) if c != owner]
        keep = int(round(majority * len(members))) if others else len(members)
        parts[owner].append(members[:keep])
        for client, chunk in zip(others, np.array_split(members[keep:], max(len(others), 1))):
            parts[client].append(chunk)
    return [np.sort(np.concatenate(chunks)) for chunks in parts]


def scarce_classes(shard_labels: np.ndarray, classes: np.ndarray, share: float) -> np.ndarray:
    """The `classes` that make up less than `share` of a client's labels `shard_labels`: what it
    holds little of (under `skewed`, every group but its own)."""
    counts = np.array([np.sum(shard_labels == c) for c in classes])
    return classes[counts < share * max(len(shard_labels), 1)]


def by_group(groups: np.ndarray, num_clients: int, seed: int) -> list[np.ndarray]:
    """Whole groups (e.g. users) dealt to clients, so that a group's rows all stay on one device."""
    rng = np.random.default_rng(seed)
    ids = rng.permutation(np.unique(groups))
    parts = []
    for owned in np.array_split(ids, num_clients):
        parts.append(np.flatnonzero(np.isin(groups, owned)))
    return parts


def split(scheme: str, labels: np.ndarray, num_clients: int, seed: int, alpha: float = 0.5,
          groups: np.ndarray | None = None) -> list[np.ndarray]:
    """The index arrays of scheme `scheme` (one of SCHEMES)."""
    if num_clients < 1:
        raise ValueError(f"the number of clients must be at least 1, got {num_clients}")
    if scheme == "iid":
        return iid(len(labels), num_clients, seed)
    if scheme == "dirichlet":
        return dirichlet(labels, num_clients, alpha, seed)
    if scheme == "skewed":
        return skewed(labels, num_clients, seed)
    if scheme == "by-user":
        if groups is None:
            raise ValueError("the by-user partition needs a task whose samples belong to users (interest)")
        return by_group(groups, num_clients, seed)
    raise ValueError(f"unknown partition scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
