"""A model's tensors by name: what every part of the processor passes around."""
from __future__ import annotations

import numpy as np

Weights = dict[str, np.ndarray]
