"""A model's tensors by name: what every part of the processor passes around."""
from __future__ import annotations

import numpy as np

Weights = dict[str, np.ndarray]

# A tensor whose layer's name starts with this is private: the device learns it about its own
# users and keeps it (never in a delta, a base model or on IPFS). Every other tensor is global.
PRIVATE_PREFIX = "user_"


def is_private(name: str) -> bool:
    """Whether the tensor called `name` (e.g. "user_factors/embeddings") stays on the device."""
    return name.startswith(PRIVATE_PREFIX)


def flatten(tensors: Weights) -> np.ndarray:
    """Every value of `tensors` in one vector, tensor after tensor in the dict's order."""
    return np.concatenate([np.ravel(t) for t in tensors.values()]) if tensors else np.zeros(0)


def unflatten(flat: np.ndarray, like: Weights) -> Weights:
    """`flat` (as `flatten` made it) cut back into tensors of `like`'s names and shapes."""
    out, start = {}, 0
    for name, tensor in like.items():
        size = int(np.size(tensor))
        out[name] = flat[start:start + size].reshape(np.shape(tensor))
        start += size
    return out
