"""Configuration shared by every process, read from the environment (flags override it).

| variable              | default                         | meaning                                        |
|-----------------------|---------------------------------|------------------------------------------------|
| FL_STATE_DIR          | .fl (in the repo)               | logs, chain database, IPFS repo, embedded store |
| FL_CHAIN_URL          | http://127.0.0.1:8545           | JSON-RPC URL of the EVM node; "embedded" = eth-tester |
| FL_CHAIN_NODE         | ganache                         | the node `run.py chain` and the demo start: ganache or anvil |
| FL_IPFS_API           | http://127.0.0.1:5001           | IPFS HTTP RPC API; "embedded" = on-disk store   |
| FL_CONTRACT_RECORD    | build/deployments.json          | where the deployed contract address is recorded |
| FL_ORG_KEY            | Ganache deterministic account 0 | organization's private key                      |
| FL_TIMEOUT            | 30                              | seconds for one IPFS or chain call              |
| FL_RETRIES            | 3                               | retries of a call the chain or IPFS refused     |
| FL_RETRY_BACKOFF      | 0.5                             | seconds before the first retry, doubled after each |
| FL_ALLOWED_HOSTS      | localhost,127.0.0.1             | Host names the apps answer (and the address they bind) |
| FL_SECRET_KEY         | random per start                | signs the pages' session cookies (their form tokens) |
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

from infra.files import REPO_ROOT

EMBEDDED = "embedded"
CHAIN_NODE_KINDS = ("ganache", "anvil")  # infra.chain.CHAIN_NODES, named without loading web3


@dataclass(frozen=True)
class Settings:
    state_dir: Path = REPO_ROOT / ".fl"
    chain_url: str = "http://127.0.0.1:8545"
    chain_node: str = "ganache"  # which local node to start where none answers at chain_url
    ipfs_api: str = "http://127.0.0.1:5001"
    contract_record: Path = REPO_ROOT / "build" / "deployments.json"
    org_key: str | None = None
    timeout: float = 30.0
    retries: int = 3
    retry_backoff: float = 0.5
    allowed_hosts: tuple[str, ...] = ("localhost", "127.0.0.1")
    secret_key: str | None = None  # None: a random one per start

    @classmethod
    def from_env(cls, **overrides) -> "Settings":
        env = os.environ
        settings = cls(
            state_dir=Path(env.get("FL_STATE_DIR", REPO_ROOT / ".fl")),
            chain_url=env.get("FL_CHAIN_URL", cls.chain_url),
            chain_node=env.get("FL_CHAIN_NODE", cls.chain_node),
            ipfs_api=env.get("FL_IPFS_API", cls.ipfs_api),
            contract_record=Path(env.get("FL_CONTRACT_RECORD", REPO_ROOT / "build" / "deployments.json")),
            org_key=env.get("FL_ORG_KEY") or None,
            timeout=float(env.get("FL_TIMEOUT", cls.timeout)),
            retries=int(env.get("FL_RETRIES", cls.retries)),
            retry_backoff=float(env.get("FL_RETRY_BACKOFF", cls.retry_backoff)),
            allowed_hosts=tuple(h.strip() for h in env.get("FL_ALLOWED_HOSTS", "").split(",") if h.strip())
            or cls.allowed_hosts,
            secret_key=env.get("FL_SECRET_KEY") or None,
        )
        settings = replace(settings, **{k: v for k, v in overrides.items() if v is not None})
        if settings.chain_node not in CHAIN_NODE_KINDS:
            raise ValueError(f"FL_CHAIN_NODE is {settings.chain_node!r}: choose one of {', '.join(CHAIN_NODE_KINDS)}")
        return settings
