"""The chain layer: compile, deploy and drive the RoundRegistry contract; run Ganache.

Every transaction is signed locally with the sender's private key and sent raw, so nothing
depends on accounts unlocked in the node. The same binding drives a real node over HTTP
(Ganache here) and the embedded in-process chain (web3's EthereumTesterProvider, py-evm).
"""
from __future__ import annotations

import ast
import asyncio
import enum
import functools
import json
import logging
import sys
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import requests
from eth_abi import decode as abi_decode
from eth_account import Account
from eth_utils import event_abi_to_log_topic, keccak, to_checksum_address
from web3 import AsyncWeb3, EthereumTesterProvider, Web3
from web3.exceptions import (
    ContractLogicError,
    PersistentConnectionError,
    ProviderConnectionError,
    TimeExhausted,
    TransactionNotFound,
    Web3RPCError,
)
from web3.providers.persistent import WebSocketProvider
from web3.providers.rpc.utils import REQUEST_RETRY_ALLOWLIST, ExceptionRetryConfiguration
from websockets.exceptions import WebSocketException

from infra.files import REPO_ROOT, write_atomically
from infra.processes import ManagedProcess, ServiceError
from infra.settings import EMBEDDED

log = logging.getLogger("infra.chain")

# py_ecc, imported by web3, raises the recursion limit to 100,000. C code that recurses (the JSON
# decoder reading every answer of the node) then overflows an 8 MB thread stack before Python's
# guard fires, and the process dies. Back to a limit the stacks hold with room to spare, and
# roomier stacks for the threads started from now on (the apps' request threads among them).
RECURSION_LIMIT = 10_000
THREAD_STACK_BYTES = 32 * 1024 * 1024
sys.setrecursionlimit(RECURSION_LIMIT)
threading.stack_size(THREAD_STACK_BYTES)

CONTRACT_SOURCE = REPO_ROOT / "contracts" / "RoundRegistry.sol"
SOLC_WRAPPER = REPO_ROOT / "tools" / "solc"
SOLC_PACKAGE = REPO_ROOT / "node_modules" / "solc" / "package.json"
GANACHE_BIN = REPO_ROOT / "node_modules" / ".bin" / "ganache"
ANVIL_BIN = REPO_ROOT / "node_modules" / ".bin" / "anvil"
# Truffle's artifact format and place: `truffle migrate` and run.py compile write it, every process reads it.
ARTIFACT = REPO_ROOT / "build" / "contracts" / "RoundRegistry.json"
CONTRACT_NAME = "RoundRegistry"
EVM_VERSION = "shanghai"  # Ganache 7.9 knows no later hardfork; solc >= 0.8.25 defaults to cancun

GANACHE_CHAIN_ID = 1337
GANACHE_NETWORK_ID = 5777
RECEIPT_TIMEOUT = 120.0
# One JSON-RPC call. Ganache 7 now and then drops a response when several processes send
# transactions at once (about 1 in 200 submissions here); web3 retries read calls after a
# timeout, so a short one bounds that stall (it was 30 s). Healthy nodes answer in milliseconds.
HTTP_TIMEOUT = 5.0
# ...but not a transaction: sent again while Ganache mines it, it is refused ("transaction can't
# be replaced, mining has already started"). A lost answer to a send is settled by asking the node
# for the transaction's hash (_send_raw).
RETRIED_CALLS = [method for method in REQUEST_RETRY_ALLOWLIST if method != "eth_sendRawTransaction"]
SEND_ATTEMPTS = 3
# The most samples a submission may claim (its FedAvg weight), unless the contract is deployed otherwise.
DEFAULT_MAX_SAMPLES = 1_000_000
MAX_ROUND = 2**256 - 1  # round numbers are uint256 on chain
GAS_MARGIN = 1.2  # headroom over the estimate, in case state changes between estimate and mining
NODE_ERRORS = (requests.ConnectionError, requests.Timeout)  # the node went away mid-call
# A node's WebSocket could not be reached, or went away (the stream of pushed heads then ends).
SOCKET_ERRORS = (OSError, TimeoutError, ProviderConnectionError, PersistentConnectionError, WebSocketException,
                 StopAsyncIteration)

# Private keys of Ganache's --wallet.deterministic accounts (mnemonic "myth like bonus scare over
# problem client lizard pioneer submit female collect", path m/44'/60'/0'/0/i). Account 0 is the
# organization, account K+1 is client K. The embedded chain funds the same accounts at genesis.
DEV_KEYS: list[str] = [
    "0x4f3edf983ac636a65a842ce7c78d9aa706d3b113bce9c46f30d7d21715b23b1d",
    "0x6cbed15c793ce57650b9877cf6fa156fbef513c4e6134f022a85b1ffdd59b2a1",
    "0x6370fd033278c143179d81c5526140625662b8daa446c22ee2d73db3707e620c",
    "0x646f1ce2fdad0e6deeeb5c7e8e5543bdde65e86029e2fd9fc169899c440a7913",
    "0xadd53f9a7e588d003326d1cbf9e4a43c061aadd9bc938c843a79e7b4fd2ad743",
    "0x395df67f0c2d2d9fe1ad08d1bc8b6627011959b79c53d7dd6a3536a33ab8a4fd",
    "0xe485d098507f54e7733a205420dfddbe58db035fa577fc294ebd14db90767a52",
    "0xa453611d9419d0e56f499079478fd72c37b251a94bfde4d19872c44cf65386e3",
    "0x829e924fdf021ba3dbbc4225edfece9aca04b929d6e75613329ca6f1d31c0bb4",
    "0xb0057716d5917badaf911b193b12b910811c1497b5bada8d7711f758981c3773",
    "0x77c5495fbb039eed474fc940f29955ed0531693cc9212911efd35dff0373153f",
    "0xd99b5b29e6da2528bf458b26237a6cf8655a3e3276c1cdc0de1f98cefee81c01",
    "0x9b9c613a36396172eab2d34d72331c8ca83a358781883a535d2941f66db07b24",
    "0x0874049f95d55fb76916262dc70571701b5c4cc5900c0691af75f1a8a52c8268",
    "0x21d7212f3b4e5332fd465877b64926e3532653e2798a11255a46f533852dfe46",
    "0x47b65307d0d654fd4f786b908c04af8fface7710fc998b37d219de19c39ee58c",
    "0x66109972a14d82dbdb6894e61f74708f26128814b3359b64f8b66565679f7299",
    "0x2eac15546def97adc6d69ca6e28eec831189baa2533e7910755d15403a0749e8",
    "0x2e114163041d2fb8d45f9251db259a68ee6bdbfd6d10fe1ae87c5c4bcd6ba491",
    "0xae9a2e131e9b359b198fa280de53ddbe2247730b881faae7af08e567e58915bd",
]
DEV_BALANCE_WEI = 1000 * 10**18  # Ganache's default balance
# A client account beyond DEV_KEYS (run.py clients runs any number) is topped up to CLIENT_FUNDS_WEI
# once it holds less than CLIENT_MIN_WEI: a submission costs about 0.0002 ether on Ganache.
CLIENT_FUNDS_WEI = 10**18
CLIENT_MIN_WEI = CLIENT_FUNDS_WEI // 10
TRANSFER_GAS = 21_000


def client_key(k: int) -> str:
    """Client k's private key: Ganache's deterministic account k + 1 while there is one, then a key
    derived from a fixed seed (the same on every machine and run), funded by fund_accounts."""
    if k + 1 < len(DEV_KEYS):
        return DEV_KEYS[k + 1]
    return "0x" + keccak(text=f"federated learning client {k}").hex()


def client_address(k: int) -> str:
    return Account.from_key(client_key(k)).address


class ChainUnavailable(Exception):
    """The chain node does not answer."""


class ContractError(Exception):
    """The contract reverted; `.name` is its custom error ("AlreadySubmitted"), `.args` its arguments."""

    def __init__(self, name: str, args: tuple = (), fields: dict[str, Any] | None = None) -> None:
        super().__init__(*args)
        self.name = name
        self.fields = fields or {}
        described = ", ".join(f"{k}={v}" for k, v in self.fields.items())
        self.message = f"{CONTRACT_NAME} reverted: {name}({described})"

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class TxResult:
    tx_hash: str
    gas_used: int
    block_number: int


ALL_INVITED = 10_000  # an invited share, in basis points, that invites every enrolled client


@dataclass(frozen=True)
class RoundRules:
    """What the rounds opened from now on follow."""
    duration: int = 0  # seconds from a round's opening to its deadline; 0 = no deadline
    quorum: int = 1  # the fewest updates a round may be merged from
    invited_share: int = ALL_INVITED  # basis points of the enrolled clients each round invites


@dataclass(frozen=True)
class RoundInfo:
    round_id: int
    base_cid: str
    model_cid: str
    closed: bool  # to submissions
    finalized: bool
    submissions: int
    start_block: int
    finalize_block: int
    deadline: int = 0  # unix seconds; 0 = none
    quorum: int = 1
    invited_share: int = ALL_INVITED
    seed: bytes = bytes(32)  # of the draw of invited clients (zero when every enrolled client is)

    def past_deadline(self, now: float) -> bool:
        return self.deadline != 0 and now > self.deadline

    def invites(self, address: str) -> bool:
        """Whether this round's draw picks `address` (enrolment aside): the contract's rule."""
        return is_drawn(self.seed, address, self.invited_share)


def is_drawn(seed: bytes, address: str, invited_share: int) -> bool:
    """The contract's draw: keccak256(abi.encode(seed, client)) mod ALL_INVITED < invited_share."""
    if invited_share >= ALL_INVITED:
        return True
    digest = keccak(bytes(seed) + bytes(12) + bytes.fromhex(to_checksum_address(address)[2:]))
    return int.from_bytes(digest, "big") % ALL_INVITED < invited_share


@dataclass(frozen=True)
class ClientRound:
    """The current round as one client sees it."""
    round_id: int  # 0 before the first round
    base_cid: str
    open: bool  # whether it still accepts submissions (started, not closed, deadline not passed)
    submitted: bool  # whether this client has submitted to it
    invited: bool  # whether it invites this client
    deadline: int  # unix seconds; 0 = none


@dataclass(frozen=True)
class StartedRound:
    """What a RoundStarted event says of the round it opened: enough for a client to take part."""
    round_id: int
    base_cid: str
    deadline: int  # unix seconds; 0 = none
    quorum: int
    invited_share: int
    seed: bytes

    def as_seen_by(self, address: str, enrolled: bool) -> ClientRound:
        """The round as `address` sees it the moment it opens: open, not yet submitted to, and
        inviting it when it is enrolled for the round and drawn (the contract's rule)."""
        return ClientRound(self.round_id, self.base_cid, True, False,
                           enrolled and is_drawn(self.seed, address, self.invited_share), self.deadline)


@dataclass(frozen=True)
class Submission:
    client: str
    cid: str
    num_samples: int


class MessageKind(enum.IntEnum):
    """The contract's MessageKind: the messages of a secure-aggregation round, in stage order."""
    KEYS = 0  # a client's ephemeral public keys, signed
    SHARES = 1  # CID of a client's encrypted shares of its mask secret
    KEY_ROSTER = 2  # from the owner: the clients whose keys the round uses
    MASK_ROSTER = 3  # from the owner: the clients whose shares arrived, who mask and train
    REVEAL = 4  # CID of a client's decrypted shares of the secrets the recovery roster names
    UNMASK_ROSTER = 5  # from the owner, once closed: the survivors, whose masked updates enter the sums
    UNMASK = 6  # a survivor's self-mask seed and its pairwise keys with its group's dropped clients
    RECOVERY_ROSTER = 7  # from the owner: the clients whose secrets are still missing


@dataclass(frozen=True)
class RoundMessage:
    """A RoundMessage event: `sender` is the account that sent it (the contract checked its role)."""
    sender: str
    kind: MessageKind
    payload: bytes
    block_number: int


# ---- compiling --------------------------------------------------------------------------------


class ArtifactError(Exception):
    """The contract's build artifact is missing or was built from another source."""


def compile_artifact(path: Path | None = None) -> Path:
    """Compile RoundRegistry with the npm solc (through tools/solc) into a Truffle-format artifact
    at `path` (build/contracts/RoundRegistry.json), keeping the deployments it already records.

    Run once at install (setup.sh runs `run.py compile`); the apps only read the artifact."""
    import solcx

    path = Path(path or ARTIFACT)
    source = CONTRACT_SOURCE.read_text()
    standard_input = {
        "language": "Solidity",
        "sources": {CONTRACT_SOURCE.name: {"content": source}},
        "settings": {
            "evmVersion": EVM_VERSION,
            "optimizer": {"enabled": True, "runs": 200},
            "outputSelection": {"*": {"*": ["abi", "evm.bytecode.object"]}},
        },
    }
    output = solcx.compile_standard(standard_input, solc_binary=SOLC_WRAPPER)
    errors = [e for e in output.get("errors", []) if e.get("severity") == "error"]
    if errors:
        raise RuntimeError("solc failed:\n" + "\n".join(e["formattedMessage"] for e in errors))
    compiled = output["contracts"][CONTRACT_SOURCE.name][CONTRACT_NAME]
    try:
        networks = json.loads(path.read_text()).get("networks", {})
    except (FileNotFoundError, ValueError):
        networks = {}
    artifact = {"contractName": CONTRACT_NAME, "abi": compiled["abi"],
                "bytecode": "0x" + compiled["evm"]["bytecode"]["object"], "source": source,
                "sourcePath": str(CONTRACT_SOURCE), "networks": networks,
                "compiler": {"name": "solc", "version": json.loads(SOLC_PACKAGE.read_text())["version"],
                             "evmVersion": EVM_VERSION}}
    write_atomically(path, json.dumps(artifact, indent=2).encode())
    return path


_artifacts: dict[Path, tuple[list[dict], str]] = {}
_artifacts_guard = threading.Lock()


def load_artifact(path: Path | None = None) -> tuple[list[dict], str]:
    """ABI and creation bytecode (0x-hex) of RoundRegistry from its build artifact (ours or
    Truffle's: the same format), read once per process. Never compiles."""
    path = Path(path or ARTIFACT)
    with _artifacts_guard:  # one reader at a time: concurrent first calls must not each read and parse
        if path not in _artifacts:
            try:
                artifact = json.loads(path.read_text())
            except FileNotFoundError:
                raise ArtifactError(f"{path} is missing: build the contract with `bash setup.sh` "
                                    "(or `python run.py compile`)") from None
            except ValueError as exc:
                raise ArtifactError(f"{path} is not a contract artifact ({exc}): rebuild it with "
                                    "`python run.py compile`") from None
            if artifact.get("source") != CONTRACT_SOURCE.read_text():
                raise ArtifactError(f"{path} was built from another version of {CONTRACT_SOURCE.name}: "
                                    "rebuild it with `bash setup.sh` (or `python run.py compile`)")
            _artifacts[path] = (artifact["abi"], artifact["bytecode"])
        return _artifacts[path]


@functools.cache
def _event_topics() -> dict[str, bytes]:
    abi, _ = load_artifact()
    return {entry["name"]: event_abi_to_log_topic(entry) for entry in abi if entry["type"] == "event"}


def event_topics(*names: str) -> list[str]:
    """The log topics (0x-hex) that name RoundRegistry's events `names`, from its artifact's ABI."""
    return ["0x" + _event_topics()[name].hex() for name in names]


def event_name(raw_log) -> str | None:
    """Which of RoundRegistry's events a raw log (as a subscription pushes it) records; None for
    another contract's."""
    topics = raw_log.get("topics") or [b""]
    return next((name for name, topic in _event_topics().items() if bytes(topics[0]) == topic), None)


# ---- connecting -------------------------------------------------------------------------------

_embedded_lock = threading.Lock()
_embedded_w3: Web3 | None = None


class SerialTesterProvider(EthereumTesterProvider):
    """eth-tester's chain, one request at a time: it mines as it takes a transaction, and a request
    that meets a block half mined by another thread fails (BlockNotFound), as many devices of one
    process (run.py clients) sending at once would."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._guard = threading.RLock()

    def make_request(self, method, params):
        with self._guard:
            return super().make_request(method, params)


def _embedded_chain() -> Web3:
    """One in-process py-evm chain per process, with the DEV_KEYS accounts funded at genesis."""
    global _embedded_w3
    with _embedded_lock:
        if _embedded_w3 is None:
            from eth_tester import EthereumTester, PyEVMBackend

            # eth-tester's own accounts stay funded: it sends calls without a sender from the first.
            genesis_state = PyEVMBackend.generate_genesis_state()
            for key in DEV_KEYS:
                genesis_state[bytes.fromhex(Account.from_key(key).address[2:])] = {
                    "balance": DEV_BALANCE_WEI, "nonce": 0, "code": b"", "storage": {}}
            tester = EthereumTester(PyEVMBackend(genesis_state=genesis_state))
            _embedded_w3 = Web3(SerialTesterProvider(tester))
        return _embedded_w3


def _rpc_answers(url: str, timeout: float = 2.0) -> bool:
    try:
        reply = requests.post(url, json={"jsonrpc": "2.0", "id": 1, "method": "eth_chainId", "params": []},
                              timeout=timeout)
        return reply.ok and "result" in reply.json()
    except (requests.RequestException, ValueError):
        return False


def connect(url: str, timeout: float = HTTP_TIMEOUT) -> Web3:
    """A Web3 for `url`: "embedded" is the process-wide in-process chain, anything else JSON-RPC over HTTP."""
    if url == EMBEDDED:
        return _embedded_chain()
    if not _rpc_answers(url, timeout=min(timeout, 5.0)):
        raise ChainUnavailable(
            f"no Ethereum JSON-RPC node answers at {url} (start one with `python run.py chain`)")
    # web3 asks for the chain id before every call and transaction it validates; it never changes
    # under a running node, so it is asked once.
    retried = ExceptionRetryConfiguration(errors=(requests.ConnectionError, requests.HTTPError, requests.Timeout),
                                          method_allowlist=RETRIED_CALLS)
    return Web3(Web3.HTTPProvider(url, request_kwargs={"timeout": timeout}, cache_allowed_requests=True,
                                  cacheable_requests={"eth_chainId"}, exception_retry_configuration=retried))


# ---- revert decoding --------------------------------------------------------------------------


@functools.cache
def _error_signatures() -> dict[bytes, tuple[str, list[str], list[str]]]:
    """4-byte selector -> (error name, argument names, argument types) for the ABI's custom errors."""
    abi, _ = load_artifact()
    found = {}
    for entry in abi:
        if entry["type"] == "error":
            types = [i["type"] for i in entry["inputs"]]
            selector = keccak(text=f"{entry['name']}({','.join(types)})")[:4]
            found[selector] = (entry["name"], [i["name"] for i in entry["inputs"]], types)
    return found


def _bytes_literal(text: str) -> bytes | None:
    """The bytes of a text like "execution reverted: b'$Z...'": eth-tester's eth_call reports
    revert data only that way. ast.literal_eval evaluates literals and nothing else."""
    text = text.removeprefix("execution reverted: ")
    if not (text[:2] in ("b'", 'b"') and text[-1:] == text[1]):
        return None
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return None
    return value if isinstance(value, bytes) else None


def _revert_data(exc: BaseException) -> bytes | None:
    """The raw revert data carried by a web3 or eth-tester exception, if any.

    web3 puts "0x<selector>..." (or Ganache's details) in `.data`; eth-tester raises bytes, which
    web3's tester provider re-raises as text, so the exception chain is searched too."""
    seen: set[int] = set()
    pending: list[BaseException | None] = [exc]
    while pending:
        current = pending.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        for value in (getattr(current, "data", None), *getattr(current, "args", ())):
            if isinstance(value, dict):  # Ganache: {"result": "0x<selector>...", "message": "revert", ...}
                value = value.get("data") or value.get("result")
            if isinstance(value, str):
                value = _bytes_literal(value) or value
            if isinstance(value, (bytes, bytearray)) and len(value) >= 4:
                return bytes(value)
            if isinstance(value, str) and value.startswith("0x") and len(value) >= 10:
                try:
                    return bytes.fromhex(value[2:])
                except ValueError:
                    pass
        pending += [current.__cause__, current.__context__]
    return None


def contract_error_from(exc: BaseException) -> ContractError | None:
    """A ContractError for a revert raised by Ganache (web3) or eth-tester, else None."""
    data = _revert_data(exc)
    if data is not None:
        known = _error_signatures().get(data[:4])
        if known:
            name, arg_names, arg_types = known
            values = abi_decode(arg_types, data[4:])
            values = tuple(to_checksum_address(v) if t == "address" else v for v, t in zip(values, arg_types))
            return ContractError(name, values, dict(zip(arg_names, values)))
    if isinstance(exc, ContractLogicError) or type(exc).__name__ == "TransactionFailed":
        return ContractError("Reverted", (str(exc),), {"reason": str(exc)})
    return None


# ---- deployment records -----------------------------------------------------------------------


def record_deployment(path: Path, w3: Web3, address: str) -> None:
    """Record `address` for this chain in the JSON file at `path` (keyed by chain id, atomic write)."""
    path = Path(path)
    try:
        records = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        records = {}
    records[str(w3.eth.chain_id)] = {"address": to_checksum_address(address), "contract": CONTRACT_NAME}
    write_atomically(path, json.dumps(records, indent=2).encode())


def find_deployment(w3: Web3, path: Path, artifact: Path = ARTIFACT) -> str | None:
    """The registry's address on this chain: from the record at `path`, else from Truffle's artifact.

    An address without code (a chain that was reset) does not count."""
    candidates = []
    try:
        record = json.loads(Path(path).read_text()).get(str(w3.eth.chain_id))
        if record:
            candidates.append(record["address"])
    except (FileNotFoundError, ValueError, KeyError):
        pass
    try:
        network = json.loads(Path(artifact).read_text())["networks"].get(str(w3.net.version))
        if network:
            candidates.append(network["address"])
    except (FileNotFoundError, ValueError, KeyError):
        pass
    for address in candidates:
        if len(w3.eth.get_code(to_checksum_address(address))) > 0:
            return to_checksum_address(address)
    return None


# ---- transactions -----------------------------------------------------------------------------

def _node_name(w3: Web3) -> str:
    """The node's URL, or "embedded" for the in-process chain."""
    return getattr(w3.provider, "endpoint_uri", None) or EMBEDDED


def _unavailable(w3: Web3, exc: BaseException) -> ChainUnavailable:
    return ChainUnavailable(f"the chain node at {_node_name(w3)} stopped answering: {exc}")


_key_locks: dict[str, threading.Lock] = {}
_key_locks_guard = threading.Lock()


def _lock_for(address: str) -> threading.Lock:
    with _key_locks_guard:
        return _key_locks.setdefault(address, threading.Lock())


# Any address will do for eth_call; eth-tester charges its gas to it, so it must be funded there.
VIEW_CALLER = Account.from_key(DEV_KEYS[0]).address

# EIP-1559 fees by connection, asked at most every FEE_TTL seconds instead of twice per
# transaction (web3 reads the priority fee and the latest block for each one it builds). The cap
# of twice the base fee plus the tip outlasts six full blocks of base-fee rises.
FEE_TTL = 10.0
_fees: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # Web3 -> (asked at, fee fields)
_fees_guard = threading.Lock()


def _fee_fields(w3: Web3) -> dict[str, int]:
    with _fees_guard:
        asked, fields = _fees.get(w3, (-FEE_TTL, {}))
    if time.monotonic() - asked >= FEE_TTL:
        tip = w3.eth.max_priority_fee
        base_fee = w3.eth.get_block("latest")["baseFeePerGas"]
        fields = {"maxPriorityFeePerGas": tip, "maxFeePerGas": 2 * base_fee + tip}
        with _fees_guard:
            _fees[w3] = (time.monotonic(), fields)
    return fields


# Gas limits by (node, contract, function selector): the largest estimate seen with GAS_MARGIN.
# Estimating runs the transaction (in Ganache several times) and cost more than sending it; the
# contract's functions cost about the same every call (no loops), so one estimate serves them all.
# A transaction that would revert is then mined and fails, and its replay names the error (its
# function's next transaction is estimated again); one that needs more than the margin
# (finalizeRound storing a much longer model CID than the first one did) runs out, and is
# estimated and sent again.
_gas_limits: dict[tuple[str, str, str], int] = {}
_gas_limits_guard = threading.Lock()


def _gas_key(w3: Web3, tx: dict) -> tuple[str, str, str]:
    # The node too: two chains hold contracts at the same address (same deployer, same nonce).
    return _node_name(w3), str(tx.get("to")), str(tx["data"])[:10]


def _gas_limit(w3: Web3, tx: dict, refresh: bool = False) -> int:
    """The gas limit for `tx` (built without one); `refresh` estimates anew."""
    function = _gas_key(w3, tx)
    with _gas_limits_guard:
        limit = None if refresh else _gas_limits.get(function)
    if limit is None:
        try:
            limit = int(w3.eth.estimate_gas(tx) * GAS_MARGIN)
        except Exception as exc:
            error = contract_error_from(exc)
            if error is None:
                raise
            raise error from exc
        if tx.get("to"):  # a deployment is a one-off
            with _gas_limits_guard:
                _gas_limits[function] = max(limit, _gas_limits.get(function, 0))
    return limit


def _send(w3: Web3, key: str, build) -> tuple[TxResult, Any]:
    """Sign and send the transaction `build(params)` makes from `key`'s account; wait for its receipt.

    A transaction that runs out of its cached gas limit (its replay succeeds) is sent once more
    with a fresh estimate."""
    account = Account.from_key(key)
    tx, receipt = _send_once(w3, account, build, fresh_estimate=False)
    if receipt["status"] != 1:
        error = _replay_failure(w3, tx, receipt)
        if error is None:
            tx, receipt = _send_once(w3, account, build, fresh_estimate=True)
            if receipt["status"] != 1:
                error = _replay_failure(w3, tx, receipt) or ContractError(
                    "OutOfGas", (receipt["transactionHash"].to_0x_hex(),),
                    {"tx": receipt["transactionHash"].to_0x_hex(), "gas": tx["gas"]})
        if error is not None:
            # Estimated again next time: an estimate refuses a call that would revert before anything
            # is sent, where a cached limit has it mined (a late submission's CID then lies in its calldata).
            with _gas_limits_guard:
                _gas_limits.pop(_gas_key(w3, tx), None)
            raise error
    return TxResult(receipt["transactionHash"].to_0x_hex(), receipt["gasUsed"], receipt["blockNumber"]), receipt


def _send_once(w3: Web3, account, build, fresh_estimate: bool) -> tuple[dict, Any]:
    """The transaction as sent and its receipt. Sending is serialized per account so that threads
    sharing a key never reuse a nonce."""
    with _lock_for(account.address):
        try:
            params = {"from": account.address, "chainId": w3.eth.chain_id,
                      "nonce": w3.eth.get_transaction_count(account.address, "pending"), **_fee_fields(w3)}
            tx = build({**params, "gas": 1})  # a placeholder gas stops web3 from estimating on its own
            del tx["gas"]
            tx["gas"] = _gas_limit(w3, tx, refresh=fresh_estimate)
            tx_hash = _send_raw(w3, account.sign_transaction(tx))
        except NODE_ERRORS as exc:
            raise _unavailable(w3, exc) from exc
    try:
        return tx, w3.eth.wait_for_transaction_receipt(tx_hash, timeout=RECEIPT_TIMEOUT)
    except TimeExhausted as exc:
        raise ChainUnavailable(f"transaction {tx_hash.to_0x_hex()} not mined after {RECEIPT_TIMEOUT:.0f} s") from exc
    except NODE_ERRORS as exc:
        raise _unavailable(w3, exc) from exc


# One send at a time per node from a process: Ganache's miner sometimes stops for good when sends
# overlap (8 threads sending transfers: 2 of 7 runs of 3,200 stalled, every later transaction left
# pending; 0 of 7 with sends one at a time, in the same time, since a send is answered in about a
# millisecond). Waiting for receipts still overlaps.
_node_send_locks: dict[str, threading.Lock] = {}


def _node_send_lock(w3: Web3) -> threading.Lock:
    with _key_locks_guard:
        return _node_send_locks.setdefault(_node_name(w3), threading.Lock())


def _send_raw(w3: Web3, signed) -> bytes:
    """Send a signed transaction; its hash. When the node's answer is lost, the node is asked whether
    it has the transaction before it is sent again (never twice to a node that has it)."""
    for attempt in range(1, SEND_ATTEMPTS + 1):
        try:
            with _node_send_lock(w3):
                return w3.eth.send_raw_transaction(signed.raw_transaction)
        except NODE_ERRORS as exc:
            lost = exc
        try:
            w3.eth.get_transaction(signed.hash)
            return signed.hash  # it reached the node: only the answer was lost
        except TransactionNotFound:
            log.warning("transaction %s: no answer from the node, which does not have it (attempt %d of %d)",
                        signed.hash.to_0x_hex(), attempt, SEND_ATTEMPTS)
    raise lost


def _replay_failure(w3: Web3, tx: dict, receipt) -> ContractError | None:
    """Why a mined transaction failed, by replaying it as a call on the state it met; None when
    the replay succeeds, that is when the transaction ran out of gas."""
    call = {k: tx[k] for k in ("from", "to", "data", "value") if k in tx}
    try:
        w3.eth.call(call, block_identifier=receipt["blockNumber"] - 1)
    except Exception as exc:
        return contract_error_from(exc) or ContractError(
            "Reverted", (receipt["transactionHash"].to_0x_hex(),), {"tx": receipt["transactionHash"].to_0x_hex()})
    return None


def fund_accounts(w3: Web3, payer_key: str, addresses: list[str]) -> list[str]:
    """Top up each of `addresses` holding less than CLIENT_MIN_WEI to CLIENT_FUNDS_WEI from
    `payer_key`'s account; the addresses funded. The transfers are sent back to back and then
    waited for: one block each on an automining node, not one round trip each."""
    try:
        short = {address: CLIENT_FUNDS_WEI - balance for address in addresses
                 if (balance := w3.eth.get_balance(to_checksum_address(address))) < CLIENT_MIN_WEI}
        payer = Account.from_key(payer_key)
        hashes = []
        with _lock_for(payer.address):
            nonce = w3.eth.get_transaction_count(payer.address, "pending")
            for offset, (address, value) in enumerate(short.items()):
                tx = {"to": to_checksum_address(address), "value": value, "gas": TRANSFER_GAS,
                      "nonce": nonce + offset, "chainId": w3.eth.chain_id, **_fee_fields(w3)}
                hashes.append(_send_raw(w3, payer.sign_transaction(tx)))
        for tx_hash in hashes:
            if w3.eth.wait_for_transaction_receipt(tx_hash, timeout=RECEIPT_TIMEOUT)["status"] != 1:
                raise ChainUnavailable(f"funding transfer {tx_hash.to_0x_hex()} failed")
    except NODE_ERRORS as exc:
        raise _unavailable(w3, exc) from exc
    return list(short)


def deploy_registry(w3: Web3, key: str, open_enrolment: bool = False,
                    max_samples: int = DEFAULT_MAX_SAMPLES) -> "Registry":
    """Deploy a new RoundRegistry owned by `key`'s account, accepting at most `max_samples` per submission."""
    abi, bytecode = load_artifact()
    factory = w3.eth.contract(abi=abi, bytecode=bytecode)
    _, receipt = _send(w3, key, lambda params: factory.constructor(open_enrolment, max_samples)
                       .build_transaction(params))
    return Registry(w3, receipt["contractAddress"])


# ---- the binding ------------------------------------------------------------------------------


class Registry:
    """A deployed RoundRegistry: a method per contract function."""

    def __init__(self, w3: Web3, address: str) -> None:
        abi, _ = load_artifact()
        self.w3 = w3
        self.address = to_checksum_address(address)
        self.contract = w3.eth.contract(address=self.address, abi=abi)

    def __repr__(self) -> str:
        return f"Registry({self.address})"

    def _transact(self, key: str, function: str, *args) -> TxResult:
        function_call = self.contract.functions[function](*args)
        result, _ = _send(self.w3, key, function_call.build_transaction)
        return result

    def _call(self, function: str, *args):
        try:
            # An explicit sender: without one web3 lists the node's accounts to pick one, every call.
            return self.contract.functions[function](*args).call({"from": VIEW_CALLER})
        except NODE_ERRORS as exc:
            raise _unavailable(self.w3, exc) from exc
        except Exception as exc:
            error = contract_error_from(exc)
            if error is None:
                raise
            raise error from exc

    # transactions

    def start_round(self, key: str, base_cid: str) -> TxResult:
        return self._transact(key, "startRound", base_cid)

    def submit_update(self, key: str, round_id: int, cid: str, num_samples: int) -> TxResult:
        return self._transact(key, "submitUpdate", round_id, cid, num_samples)

    def close_round(self, key: str, round_id: int) -> TxResult:
        return self._transact(key, "closeRound", round_id)

    def finalize_round(self, key: str, round_id: int, model_cid: str) -> TxResult:
        return self._transact(key, "finalizeRound", round_id, model_cid)

    def restart_round(self, key: str, round_id: int) -> TxResult:
        return self._transact(key, "restartRound", round_id)

    def catch_up(self, moment: int) -> None:
        """Have the chain's latest block be later than `moment` (unix seconds) if the node can mine
        on request. Ganache and anvil mine only on transactions and judge a transaction's estimate
        by the latest block's time: after a quiet deadline, restartRound would still see the round
        before it. A chain that mines by itself refuses evm_mine, and is left as it is."""
        try:
            if self.w3.eth.get_block("latest")["timestamp"] <= moment:
                self.w3.provider.make_request("evm_mine", [])
        except NODE_ERRORS as exc:
            raise _unavailable(self.w3, exc) from exc

    def set_round_rules(self, key: str, rules: RoundRules) -> TxResult:
        return self._transact(key, "setRoundRules", rules.duration, rules.quorum, rules.invited_share)

    def add_client(self, key: str, address: str) -> TxResult:
        return self._transact(key, "addClient", to_checksum_address(address))

    def post_round_message(self, key: str, round_id: int, kind: MessageKind, payload: bytes) -> TxResult:
        return self._transact(key, "postRoundMessage", round_id, int(kind), payload)

    def remove_client(self, key: str, address: str) -> TxResult:
        return self._transact(key, "removeClient", to_checksum_address(address))

    # views

    def current_round(self) -> int:
        return self._call("currentRound")

    def round(self, n: int) -> RoundInfo:
        return RoundInfo(n, *self._call("getRound", n))

    def round_rules(self) -> RoundRules:
        return RoundRules(*self._call("roundRules"))

    def is_invited(self, n: int, address: str) -> bool:
        return self._call("isInvited", n, to_checksum_address(address))

    def enrolled_from(self, address: str) -> int:
        """The first round `address` may take part in; 0 when it is not enrolled."""
        return self._call("enrolledFrom", to_checksum_address(address))

    def submissions(self, n: int) -> list[Submission]:
        """Round `n`'s submissions in submission order ([] for a round not started), from its
        UpdateSubmitted events: the contract keeps only who submitted (hasSubmitted) and how many
        (the round's count); each submission's CID and sample count are on record in its event."""
        return self.logged_submissions(self.round(n))

    def logged_submissions(self, info: RoundInfo) -> list[Submission]:
        """Round `info`'s submissions in submission order, read from its UpdateSubmitted events
        (from the block it started in: none before it can be about it)."""
        if info.start_block == 0:  # not started: no submission can be about it
            return []
        try:
            logs = self.contract.events.UpdateSubmitted().get_logs(
                from_block=info.start_block, argument_filters={"round": info.round_id})
        except NODE_ERRORS as exc:
            raise _unavailable(self.w3, exc) from exc
        logs = sorted(logs, key=lambda log: (log["blockNumber"], log["logIndex"]))
        return [Submission(log["args"]["client"], log["args"]["cid"], log["args"]["numSamples"]) for log in logs]

    def round_messages(self, info: RoundInfo, from_block: int = 0, to_block: int | str = "latest") -> list[RoundMessage]:
        """Round `info`'s secure-aggregation messages in the order they were sent (an unknown kind,
        which this contract cannot log, is skipped), those mined from `from_block` to `to_block`
        when given. Decoded here with eth_abi: web3's event decoding cost 1.3 ms a log, and every
        look at a secure round reads them all."""
        if info.start_block == 0:
            return []
        topics = [_event_topics()["RoundMessage"], info.round_id.to_bytes(32, "big")]
        try:
            logs = self.w3.eth.get_logs({"address": self.address, "fromBlock": max(info.start_block, from_block),
                                         "toBlock": to_block,
                                         "topics": ["0x" + bytes(t).hex() for t in topics]})
        except NODE_ERRORS as exc:
            raise _unavailable(self.w3, exc) from exc
        messages = []
        for log in sorted(logs, key=lambda log: (log["blockNumber"], log["logIndex"])):
            kind, payload = abi_decode(["uint8", "bytes"], bytes(log["data"]))
            if kind in MessageKind._value2member_map_:
                messages.append(RoundMessage(to_checksum_address(bytes(log["topics"][2])[-20:]), MessageKind(kind),
                                             bytes(payload), log["blockNumber"]))
        return messages

    def emitted(self, raw_log, event: str) -> bool:
        """Whether a raw log is this registry's `event`."""
        return str(raw_log.get("address")).lower() == self.address.lower() and event_name(raw_log) == event

    def pushed_round(self, raw_log) -> StartedRound:
        """The round a RoundStarted log pushed by a subscription opened."""
        args = self.contract.events.RoundStarted().process_log(raw_log)["args"]
        return StartedRound(args["round"], args["baseCid"], args["deadline"], args["quorum"], args["invitedShare"],
                            bytes(args["seed"]))

    def sent_by_client(self, raw_log) -> bool | None:
        """Whether a RoundMessage log pushed by a subscription was sent by a client (its indexed sender
        is not the owner); None for any other log. Every device of a process asks it of every log."""
        if not self.emitted(raw_log, "RoundMessage"):
            return None
        return bytes(raw_log["topics"][2])[-20:] != self._owner_bytes

    @functools.cached_property
    def _owner_bytes(self) -> bytes:
        return bytes.fromhex(self.owner[2:])

    def pushed_submission(self, raw_log) -> tuple[int, Submission]:
        """The round and the submission an UpdateSubmitted log pushed by a subscription records."""
        args = self.contract.events.UpdateSubmitted().process_log(raw_log)["args"]
        return args["round"], Submission(args["client"], args["cid"], args["numSamples"])

    def has_submitted(self, n: int, address: str) -> bool:
        return self._call("hasSubmitted", n, to_checksum_address(address))

    def is_client(self, address: str) -> bool:
        return self._call("isClient", to_checksum_address(address))

    @functools.cached_property
    def open_enrolment(self) -> bool:
        """Whether any account may submit (an immutable: asked once)."""
        return self._call("openEnrolment")

    def max_samples(self) -> int:
        return self._call("maxSamples")

    @functools.cached_property
    def deployment_block(self) -> int:
        """The block the registry was deployed in (an immutable: asked once)."""
        return self._call("deploymentBlock")

    def current_round_for(self, address: str) -> ClientRound:
        """The current round, its base, whether it is open, whether `address` submitted to it and is
        invited, and its deadline, in one call."""
        return ClientRound(*self._call("currentRoundFor", to_checksum_address(address)))

    def latest_model(self) -> tuple[int, str]:
        round_id, cid = self._call("latestModel")
        return round_id, cid

    @functools.cached_property
    def owner(self) -> str:
        """The organization's account (an immutable: asked once)."""
        return self._call("owner")

    def events(self, name: str, from_block: int | None = None, to_block: int | str = "latest") -> list[dict]:
        """The contract's `name` events from `from_block` (its deployment's) to `to_block`, decoded, oldest first."""
        if from_block is None:
            from_block = self.deployment_block
        if isinstance(to_block, int) and from_block > to_block:
            return []
        try:
            logs = self.contract.events[name]().get_logs(from_block=from_block, to_block=to_block)
        except NODE_ERRORS as exc:
            raise _unavailable(self.w3, exc) from exc
        except Web3RPCError as exc:  # anvil refuses a range that starts past its head; Ganache answers []
            if "BlockOutOfRange" not in str(exc):
                raise
            return []
        return [{"event": log["event"], "args": dict(log["args"]), "block_number": log["blockNumber"],
                 "log_index": log["logIndex"], "tx_hash": log["transactionHash"].to_0x_hex()} for log in logs]


class BlockWatcher:
    """A daemon thread that calls `on_block(logs)` on every new block of `w3` (with `topics`, only on
    the blocks that log one of those events), and at least every `recheck_seconds` (deadlines pass
    without blocks), until it returns True or `stop()`. `logs` are the raw logs pushed since the
    last look when a `logs` subscription woke it, and None when the watcher cannot say what
    happened (a poll, a recheck, the look as a subscription begins): look at the chain then.

    A node reached over HTTP is followed by a subscription on its WebSocket (Ganache and anvil serve
    both on one port), `newHeads` or `logs`: a block is seen the moment it is mined, and an idle
    chain, or one busy with what does not concern the watcher, costs no calls. The embedded chain,
    or a node whose WebSocket cannot be reached, is polled for its block number every
    `poll_seconds`, and every new block is looked at. An exception is handed to `on_error` and the
    look is tried again, less and less often, up to `max_backoff` seconds apart."""

    STOP_CHECK_SECONDS = 0.25  # how soon a stop() is noticed while waiting for a block

    def __init__(self, name: str, w3: Web3, on_block, on_error, poll_seconds: float, recheck_seconds: float,
                 max_backoff: float = 5.0, topics: list[str] | None = None) -> None:
        self.w3, self.on_block, self.on_error, self.topics = w3, on_block, on_error, topics
        self.poll_seconds, self.recheck_seconds, self.max_backoff = poll_seconds, recheck_seconds, max_backoff
        self.done = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._retry_wait = poll_seconds
        self._next_look = 0.0  # monotonic time of the next look due without a new block
        self._wanted_look = float("inf")  # a look on_block asked for (look_within)

    def start(self) -> "BlockWatcher":
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        if self._thread.ident is not None:  # started
            self._thread.join(timeout=timeout)

    @property
    def websocket_url(self) -> str | None:
        endpoint = getattr(self.w3.provider, "endpoint_uri", None)
        if not isinstance(endpoint, str) or urlparse(endpoint).scheme not in ("http", "https"):
            return None
        return "ws" + endpoint[len("http"):]

    def look_within(self, seconds: float) -> None:
        """Look again no later than `seconds` from now, block or not (a deadline comes due)."""
        self._wanted_look = min(self._wanted_look, time.monotonic() + max(seconds, 0.0))

    def _look(self, logs: list | None = None) -> None:
        """One call of on_block, its outcome setting when the next look is due without a block."""
        try:
            self._wanted_look = float("inf")  # on_block asks anew for what it still waits for
            if self.on_block(logs):
                self.done.set()
                self._stop.set()
                return
            self._retry_wait = self.poll_seconds
            self._next_look = min(time.monotonic() + self.recheck_seconds, self._wanted_look)
        except Exception as exc:  # an outage, or a step that cannot be taken yet: tried again later
            self.on_error(exc, self._retry_wait)
            self._next_look = time.monotonic() + self._retry_wait
            self._retry_wait = min(max(self._retry_wait * 2, self.poll_seconds), self.max_backoff)

    def _run(self) -> None:
        url = self.websocket_url
        if url is not None:
            try:
                asyncio.run(self._follow_subscription(url))
            except SOCKET_ERRORS as exc:
                log.info("%s: no WebSocket at %s (%s): polling the block number", self._thread.name, url, exc)
        self._poll()

    def _poll(self) -> None:
        last_block = None
        while not self._stop.wait(self.poll_seconds):
            try:
                block = self.w3.eth.block_number
            except Exception as exc:
                self.on_error(exc, self._retry_wait)
                self._stop.wait(self._retry_wait)
                self._retry_wait = min(self._retry_wait * 2, self.max_backoff)
                continue
            if block != last_block or time.monotonic() >= self._next_look:
                last_block = block
                self._look()

    async def _follow_subscription(self, url: str) -> None:
        """Looks on every pushed notification (block header or log); returns once stopped. The first
        connection failing raises (the caller polls instead); a connection lost later is opened again."""
        connected_once = False
        while not self._stop.is_set():
            try:
                # One attempt per connection: this loop waits between attempts, and a node without
                # a WebSocket is polled at once instead of after the provider's own retries.
                async with AsyncWeb3(WebSocketProvider(url, max_connection_retries=1)) as socket_w3:
                    if self.topics is None:
                        await socket_w3.eth.subscribe("newHeads")
                    else:  # one list in the first position: a log with any of these first topics
                        await socket_w3.eth.subscribe("logs", {"topics": [self.topics]})
                    connected_once = True
                    await self._look_on_notifications(socket_w3)
            except SOCKET_ERRORS as exc:
                if not connected_once:
                    raise
                self.on_error(exc, self._retry_wait)
                await asyncio.sleep(self._retry_wait)
                self._retry_wait = min(self._retry_wait * 2, self.max_backoff)

    async def _look_on_notifications(self, socket_w3: AsyncWeb3) -> None:
        loop = asyncio.get_running_loop()
        notifications = socket_w3.socket.process_subscriptions().__aiter__()
        await loop.run_in_executor(None, self._look)  # what happened before the subscription began
        next_one = asyncio.ensure_future(notifications.__anext__())
        try:
            while not self._stop.is_set():
                await asyncio.wait({next_one}, timeout=self.STOP_CHECK_SECONDS)
                notified = []
                while next_one.done():  # notifications that came while looking: one look covers them all
                    notified.append(next_one.result()["result"])
                    next_one = asyncio.ensure_future(notifications.__anext__())
                    await asyncio.sleep(0)
                if notified or time.monotonic() >= self._next_look:
                    logs = notified if notified and self.topics is not None else None
                    # The look makes blocking calls (and may train): off the loop, so the socket stays served.
                    await loop.run_in_executor(None, self._look, logs)
        finally:
            next_one.cancel()


class EnrolmentLog:
    """Who is on a registry's allowlist and from which round, kept up to date from its ClientAdded
    and ClientRemoved events (read from where the last update stopped): the contract keeps no
    list of its clients, so that no transaction loops over them."""

    def __init__(self) -> None:
        self._address: str | None = None
        self._next_block = 0
        self._from_round: dict[str, int] = {}
        self._guard = threading.Lock()

    def update(self, registry: Registry) -> None:
        with self._guard:
            if registry.address != self._address:
                self._address, self._next_block, self._from_round = registry.address, registry.deployment_block, {}
            head = registry.w3.eth.block_number
            if head < self._next_block:
                return
            changes = [(e["block_number"], e["log_index"], e) for name in ("ClientAdded", "ClientRemoved")
                       for e in registry.events(name, self._next_block, to_block=head)]
            for _, _, event in sorted(changes, key=lambda change: change[:2]):
                client = event["args"]["client"]
                if event["event"] == "ClientAdded":
                    self._from_round[client] = event["args"]["fromRound"]
                else:
                    self._from_round.pop(client, None)
            self._next_block = head + 1

    def clients_for(self, round_id: int) -> list[str]:
        """The clients enrolled in time for round `round_id` (as of the last update)."""
        with self._guard:
            return [client for client, first in self._from_round.items() if first <= round_id]

    def from_round(self, client: str) -> int | None:
        """The first round `client` may take part in (as of the last update); None if not enrolled."""
        with self._guard:
            return self._from_round.get(client)


# ---- local chain nodes: Ganache, anvil ---------------------------------------------------------

# Ganache's --wallet.deterministic mnemonic: anvil derives the same accounts (DEV_KEYS) from it.
DEV_MNEMONIC = "myth like bonus scare over problem client lizard pioneer submit female collect"


class LocalChain:
    """A chain node of this machine at `url`, keeping its chain in `db_dir` (a restart keeps the
    state); Ganache or anvil, with the same accounts (DEV_KEYS), chain id and hardfork.

    A node already answering at `url` is reused and left running (`.reused`)."""

    name = ""
    binary = Path()

    def __init__(self, url: str, db_dir: Path, log_path: Path, ready_timeout: float = 60.0) -> None:
        parsed = urlparse(url)
        if parsed.hostname is None or parsed.port is None:
            raise ValueError(f"{self.name} needs a URL with a host and a port, not {url!r}")
        self.url = url
        self.db_dir = Path(db_dir)
        self.process = ManagedProcess(self.name, [str(self.binary), *self.arguments(parsed.hostname, parsed.port)],
                                      lambda: _rpc_answers(url, timeout=1.0), log_path=log_path, cwd=REPO_ROOT,
                                      ready_timeout=ready_timeout)

    def arguments(self, host: str, port: int) -> list[str]:
        raise NotImplementedError

    @property
    def reused(self) -> bool:
        return self.process.reused

    def start(self) -> "LocalChain":
        if not _rpc_answers(self.url) and not self.binary.exists():
            raise ServiceError(f"{self.binary} is missing: run `bash setup.sh` to install the npm packages")
        self.db_dir.mkdir(parents=True, exist_ok=True)
        self.process.start()
        return self

    def stop(self) -> None:
        self.process.stop()

    def __enter__(self) -> "LocalChain":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class Ganache(LocalChain):
    """Ganache (npm `ganache`), the product's named chain: its database in `db_dir`."""

    name = "Ganache"
    binary = GANACHE_BIN

    def arguments(self, host: str, port: int) -> list[str]:
        return ["--host", host, "--port", str(port),
                "--wallet.deterministic", "--wallet.totalAccounts", str(len(DEV_KEYS)),
                "--chain.chainId", str(GANACHE_CHAIN_ID), "--chain.networkId", str(GANACHE_NETWORK_ID),
                "--chain.hardfork", EVM_VERSION, "--database.dbPath", str(self.db_dir), "--logging.quiet"]


class Anvil(LocalChain):
    """Foundry's anvil (npm `@foundry-rs/anvil`, its binary inside the platform package): the
    same accounts, chain id and hardfork as Ganache; its state is written to `db_dir` when it
    stops (and every few seconds) and read back when it starts."""

    name = "anvil"
    binary = ANVIL_BIN

    def arguments(self, host: str, port: int) -> list[str]:
        return ["--host", host, "--port", str(port), "--mnemonic", DEV_MNEMONIC, "--accounts", str(len(DEV_KEYS)),
                "--balance", str(DEV_BALANCE_WEI // 10**18), "--chain-id", str(GANACHE_CHAIN_ID),
                "--hardfork", EVM_VERSION, "--state", str(self.db_dir / "state.json"), "--state-interval", "5",
                "--silent"]


CHAIN_NODES: dict[str, type[LocalChain]] = {"ganache": Ganache, "anvil": Anvil}  # infra.settings.CHAIN_NODE_KINDS


def local_chain(kind: str, url: str, state_dir: Path) -> LocalChain:
    """The local node of that kind for `url`, its chain under `state_dir`/chain and its log in
    `state_dir`/logs/<kind>.log."""
    return CHAIN_NODES[kind](url, db_dir=Path(state_dir) / "chain", log_path=Path(state_dir) / "logs" / f"{kind}.log")
