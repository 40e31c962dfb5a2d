"""The Machine Learning Model Processor: tasks, local training with EWC, aggregation, the codec.

A pure library: no Flask, web3 or IPFS in here. Weights, deltas and Fisher information are
`dict[str, np.ndarray]` keyed by the tensor's name in the task's model (e.g. "hidden/kernel").
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before anything imports TensorFlow
