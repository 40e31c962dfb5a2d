import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# Session fixtures for the real services live beside their layer's tests.
pytest_plugins = ("tests.fixtures.chain", "tests.fixtures.ipfs")
