"""Content-addressed storage: a real IPFS daemon, or an embedded folder that gives the same CIDs.

One CID setting everywhere: CIDv1, raw leaves, base32, sha2-256 -- what Kubo gives with
`ipfs add --cid-version=1` and what js-ipfs gives with `cid-version=1&raw-leaves=true&cid-base=base32`.
A file of at most one 262,144-byte chunk is a single raw block (`bafkrei...`, the empty file
included); a larger file is Kubo's balanced DAG of dag-pb UnixFS file nodes (`bafybei...`) with at
most 174 links per node. `compute_cid` reproduces that exactly, so every fetched file is verified
against its CID before it is returned, whichever backend served it.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from functools import lru_cache
from pathlib import Path
from typing import Protocol, runtime_checkable
from urllib.parse import urlsplit

import requests
import urllib3
from multiformats import CID, multihash

from infra.files import REPO_ROOT, write_atomically
from infra.processes import ManagedProcess, ServiceError
from infra.settings import EMBEDDED

CHUNK_SIZE = 262_144
LINKS_PER_NODE = 174
JSIPFS = REPO_ROOT / "node_modules" / ".bin" / "jsipfs"


class StorageError(Exception):
    """A storage operation failed."""


class StorageUnavailable(StorageError):
    """The IPFS daemon does not answer."""


class StorageTimeout(StorageError):
    """The content was not obtained within the timeout (for example: no node has it)."""


class ContentMismatch(StorageError):
    """The bytes obtained do not hash to the requested CID."""


class ContentTooLarge(StorageError):
    """The content is larger than the caller allows."""


class ContentNotFound(StorageError):
    """The embedded store does not hold this CID (a definite answer, unlike a daemon's timeout)."""


# --- CIDs -------------------------------------------------------------------------------------

def parse_cid(cid: str) -> CID:
    """Decode `cid`, accepting only the setting this project uses (CIDv1, raw or dag-pb, sha2-256)."""
    if not isinstance(cid, str) or not cid:
        raise StorageError(f"not a CID: {cid!r}")
    return _decoded_cid(cid)


# multiformats type-checks every argument at run time (typing_validation): 0.15 ms a CID alone,
# several ms with the organization's fetch threads contending for the GIL. A fetch parses its CID
# twice (before asking, and to verify), and CID objects are immutable, so decodings are remembered.
@lru_cache(maxsize=4096)
def _decoded_cid(cid: str) -> CID:
    try:
        parsed = CID.decode(cid)
    except Exception as exc:  # multiformats raises several types for malformed input
        raise StorageError(f"not a valid CID: {cid!r} ({exc})") from None
    if parsed.version != 1 or parsed.codec.name not in ("raw", "dag-pb") or parsed.hashfun.name != "sha2-256":
        raise StorageError(
            f"unsupported CID {cid!r} (version {parsed.version}, {parsed.codec.name}, {parsed.hashfun.name}): "
            "this project uses CIDv1 with raw leaves and sha2-256 (ipfs add --cid-version=1)")
    return parsed


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _bytes_field(field: int, value: bytes) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(value)) + value


def _varint_field(field: int, value: int) -> bytes:
    return _varint(field << 3) + _varint(value)


def _file_node(children: list[tuple[bytes, int, int]]) -> tuple[bytes, int, int]:
    """dag-pb node of a UnixFS file over `children` (cid bytes, tsize, file bytes).

    No protobuf library is involved: the two messages are tiny, so they are encoded by hand, in
    the canonical field order that Kubo and js-ipfs produce (PBNode: Links then Data; PBLink:
    Hash, Name (empty, but present), Tsize; UnixFS Data: Type=File, filesize, blocksizes).
    Returns the node's (cid bytes, tsize, file bytes).
    """
    filesize = sum(size for _, _, size in children)
    unixfs = _varint_field(1, 2) + _varint_field(3, filesize)
    unixfs += b"".join(_varint_field(4, size) for _, _, size in children)
    links = b"".join(
        _bytes_field(2, _bytes_field(1, cid) + _bytes_field(2, b"") + _varint_field(3, tsize))
        for cid, tsize, _ in children)
    block = links + _bytes_field(1, unixfs)
    cid = CID("base32", 1, "dag-pb", multihash.digest(block, "sha2-256"))
    return bytes(cid), len(block) + sum(tsize for _, tsize, _ in children), filesize


def compute_cid(data: bytes) -> str:
    """The CID Kubo gives `data` with --cid-version=1 (raw leaves, 256 KiB chunks, balanced DAG)."""
    view = memoryview(data)
    chunks = [view[i:i + CHUNK_SIZE] for i in range(0, len(data), CHUNK_SIZE)] or [view]
    layer = [(bytes(CID("base32", 1, "raw", multihash.digest(chunk, "sha2-256"))), len(chunk), len(chunk))
             for chunk in chunks]
    # Kubo's balanced builder fills each level left to right, 174 children per node; building it
    # bottom-up one level at a time gives the same tree. A lone leaf is its own root.
    while len(layer) > 1:
        layer = [_file_node(layer[i:i + LINKS_PER_NODE]) for i in range(0, len(layer), LINKS_PER_NODE)]
    return str(CID.decode(layer[0][0]).set(base="base32"))


def verify(cid: str, data: bytes) -> bytes:
    """Return `data` if it hashes to `cid`, else raise ContentMismatch."""
    expected = parse_cid(cid)
    actual = parse_cid(compute_cid(data))  # remembered: the same decoding as `cid` when they agree
    if bytes(actual) != bytes(expected):
        raise ContentMismatch(f"content for {cid} hashes to {actual} instead: refusing it")
    return data


# --- the interface ----------------------------------------------------------------------------

@runtime_checkable
class ContentStore(Protocol):
    def add(self, data: bytes) -> str:
        """Store `data`; return its CID."""

    def get(self, cid: str, timeout: float | None = None, max_bytes: int | None = None) -> bytes:
        """The bytes named by `cid`, verified against it."""

    def pin(self, cid: str) -> None:
        """Keep `cid` from being garbage-collected."""

    def has(self, cid: str) -> bool:
        """True when the content is held locally."""

    def gateway_url(self, cid: str) -> str | None:
        """An HTTP URL a browser can fetch `cid` from, if there is one."""

    def describe(self) -> str:
        """One line naming the backend, for status pages and logs; StorageError if it does not answer."""


class EmbeddedStore:
    """A content-addressed folder: one file per CID, written atomically so processes can share it."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, cid: str) -> Path:
        # The canonical base32 form names the file, whatever base the caller used.
        return self.root / str(parse_cid(cid).set(base="base32"))

    def add(self, data: bytes) -> str:
        data = bytes(data)
        cid = compute_cid(data)
        path = self.root / cid
        try:
            if path.read_bytes() == data:
                return cid
        except FileNotFoundError:
            pass
        write_atomically(path, data)  # concurrent writers of one CID write equal bytes
        return cid

    def get(self, cid: str, timeout: float | None = None, max_bytes: int | None = None) -> bytes:
        path = self._path(cid)
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if max_bytes is not None and size > max_bytes:
                    raise ContentTooLarge(f"{cid} is {size} bytes, more than the {max_bytes} allowed")
                data = f.read()
        except FileNotFoundError:
            raise ContentNotFound(f"{cid} is not in the embedded store at {self.root}") from None
        return verify(cid, data)

    def pin(self, cid: str) -> None:
        # Nothing is ever garbage-collected here; pinning only checks that the content is present.
        if not self.has(cid):
            raise ContentNotFound(f"cannot pin {cid}: not in the embedded store at {self.root}")

    def has(self, cid: str) -> bool:
        return self._path(cid).is_file()

    def gateway_url(self, cid: str) -> str | None:
        return None

    def describe(self) -> str:
        return f"embedded store at {self.root}"


# --- the IPFS daemon's HTTP RPC API -----------------------------------------------------------

def _base_url(api_url: str) -> str:
    return (api_url if "://" in api_url else f"http://{api_url}").rstrip("/")


def _checked_api_url(api_url: str) -> str:
    url = _base_url(api_url)
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise StorageError(f"IPFS API must be an http(s) URL like http://127.0.0.1:5001, got {api_url!r}")
    return url


def default_gateway(api_url: str) -> str | None:
    """The gateway that goes with an API URL: the same offset as Kubo's 5001 -> 8080 (see IPFSDaemon)."""
    parts = urlsplit(_base_url(api_url))
    if parts.port is None or gateway_port_for(parts.port) is None:
        return None
    return f"http://{parts.hostname}:{gateway_port_for(parts.port)}"


def ipfs_answers(api: str, timeout: float = 2.0) -> bool:
    """True when an IPFS daemon answers POST /api/v0/version at `api`."""
    try:
        return requests.post(f"{_base_url(api)}/api/v0/version", timeout=timeout).ok
    except requests.RequestException:
        return False


class IPFSStore:
    """Any IPFS node with the HTTP RPC API (js-ipfs here, Kubo elsewhere), spoken with `requests`.

    Not through ipfshttpclient: unmaintained since 2021, it refuses every current daemon in
    connect(), and it streams an upload as 8 KiB chunked parts. Through it an 800 KB add took
    22-24 ms and a cat 9 ms; as one multipart body, 11-13 ms and 7.7 ms, and a full-stack round
    of 5 clients used 7% less CPU (benchmarks/README.md)."""

    def __init__(self, api_url: str, timeout: float = 30.0, gateway: str | None = None) -> None:
        self.api_url = _checked_api_url(api_url)
        self.timeout = timeout
        self.gateway = (gateway or default_gateway(self.api_url) or "").rstrip("/") or None
        self._session = requests.Session()  # keep-alive: connections are reused, not opened per call

    def _call(self, what: str, timeout: float, fn):
        """Run `fn`, mapping the failures of the requests it makes onto the storage errors."""
        try:
            return fn()
        except requests.ConnectTimeout:
            raise StorageUnavailable(self._not_answering(what)) from None
        except requests.Timeout:
            raise StorageTimeout(f"{what} at {self.api_url} took more than {timeout:g} s") from None
        except requests.ConnectionError as exc:
            # a read timeout in the middle of a streamed body comes wrapped as a connection error
            if exc.args and isinstance(exc.args[0], urllib3.exceptions.ReadTimeoutError):
                raise StorageTimeout(f"{what} at {self.api_url} took more than {timeout:g} s") from None
            raise StorageUnavailable(self._not_answering(what)) from None
        except requests.RequestException as exc:
            raise StorageError(f"{what} at {self.api_url} failed: {exc}") from None

    def _not_answering(self, what: str) -> str:
        return (f"no IPFS daemon answers at {self.api_url} ({what}); start one with `python run.py ipfs` "
                "or point FL_IPFS_API at a running node")

    def _post(self, command: str, timeout: float, params: dict, **kwargs) -> requests.Response:
        """POST /api/v0/`command`, its failures mapped onto the storage errors. The daemon gives up
        at `timeout` (a cat of an absent CID otherwise hangs forever); the client waits a little
        longer so that the daemon's own error arrives first."""
        what = f"{command} {params.get('arg', '')}".strip()
        reply = self._call(what, timeout, lambda: self._session.post(
            f"{self.api_url}/api/v0/{command}", params={**params, "timeout": f"{max(timeout, 0.001):.3f}s"},
            timeout=timeout + 2, **kwargs))
        if reply.ok:
            return reply
        try:
            message = reply.json()["Message"]
        except (ValueError, TypeError, KeyError):
            message = reply.text
        reply.close()
        if re.search(r"time(d)? ?out|deadline exceeded", message, re.IGNORECASE):
            raise StorageTimeout(f"{what} at {self.api_url} took more than {timeout:g} s ({message})")
        raise StorageError(f"{what} at {self.api_url} failed: {message}")

    def add(self, data: bytes) -> str:
        data = bytes(data)
        params = {"cid-version": 1, "raw-leaves": "true", "pin": "true", "cid-base": "base32"}

        reply = self._post("add", self.timeout, params, files={"file": ("file", data, "application/octet-stream")})
        try:
            named = json.loads(reply.text.strip().splitlines()[-1])["Hash"]  # a JSON line per file added
        except (ValueError, IndexError, KeyError, TypeError):
            raise StorageError(f"add at {self.api_url} answered no CID: {reply.text[:200]!r}") from None
        cid = str(parse_cid(named).set(base="base32"))
        expected = compute_cid(data)
        if cid != expected:
            # Every later get verifies against compute_cid, so a node with other settings would
            # publish CIDs nobody can fetch: refuse now rather than then.
            raise ContentMismatch(f"the node at {self.api_url} named the content {cid}, expected {expected}: "
                                  "it does not use CIDv1 with raw leaves and 256 KiB chunks")
        return cid

    def get(self, cid: str, timeout: float | None = None, max_bytes: int | None = None) -> bytes:
        parse_cid(cid)
        timeout = self.timeout if timeout is None else timeout
        # Cut by the daemon itself one byte past max_bytes, and streamed, so an oversized file is
        # never transferred or read whole.
        params = {"arg": cid, **({"length": max_bytes + 1} if max_bytes is not None else {})}

        def fetch() -> bytes:
            buffer = bytearray()
            with self._post("cat", timeout, params, stream=True) as reply:
                for piece in reply.iter_content(CHUNK_SIZE):
                    buffer += piece
                    if max_bytes is not None and len(buffer) > max_bytes:
                        raise ContentTooLarge(f"{cid} is more than the {max_bytes} bytes allowed")
            return bytes(buffer)

        return verify(cid, self._call(f"cat {cid}", timeout, fetch))  # also maps a failure mid-stream

    def pin(self, cid: str) -> None:
        parse_cid(cid)
        self._post("pin/add", self.timeout, {"arg": cid})

    def has(self, cid: str) -> bool:
        parse_cid(cid)
        # Kubo answers at once with --offline; js-ipfs ignores it and waits for its timeout, so
        # the wait for a block the node lacks is kept short.
        timeout = min(self.timeout, 1.0)
        try:
            self._post("block/stat", timeout, {"arg": cid, "offline": "true"})
            return True
        except StorageTimeout:
            return False
        except StorageUnavailable:
            raise
        except StorageError:
            return False

    def gateway_url(self, cid: str) -> str | None:
        return f"{self.gateway}/ipfs/{cid}" if self.gateway else None

    def describe(self) -> str:
        reply = self._post("version", 1.0, {})
        try:
            version = reply.json()
            agent = "js-ipfs" if "ipfs-core" in version else "Kubo" if "Golang" in version else "IPFS"
            return f"IPFS daemon at {self.api_url} ({agent} {version.get('Version', '?')})"
        except (ValueError, TypeError, AttributeError):
            raise StorageError(f"version at {self.api_url} answered no version: {reply.text[:200]!r}") from None


def open_store(api: str, state_dir: Path, timeout: float = 30.0) -> ContentStore:
    """The store `api` names: "embedded" (a folder under `state_dir`) or an IPFS API URL."""
    if api == EMBEDDED:
        return EmbeddedStore(Path(state_dir) / "store")
    return IPFSStore(api, timeout)


# --- running js-ipfs --------------------------------------------------------------------------

GATEWAY_OFFSET = 8080 - 5001


def gateway_port_for(api_port: int) -> int | None:
    """Gateway port paired with an API port: 5001 -> 8080 as in Kubo, and the same offset otherwise
    (5101 -> 8180), so a restart on the same API port finds the same gateway."""
    port = api_port + GATEWAY_OFFSET
    return port if port <= 65535 else None


def _repo_users(repo_dir: Path) -> list[int]:
    """Pids of live IPFS processes using `repo_dir` (IPFS_PATH in their environment)."""
    wanted = Path(repo_dir).resolve()
    users = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if b"ipfs" not in (proc / "cmdline").read_bytes():
                continue
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:  # gone meanwhile, or another user's
            continue
        paths = [Path(os.fsdecode(entry[len(b"IPFS_PATH="):])) for entry in environ if entry.startswith(b"IPFS_PATH=")]
        if any(path.resolve() == wanted for path in paths):
            users.append(int(proc.name))
    return users


class IPFSDaemon(ManagedProcess):
    """A js-ipfs daemon in `repo_dir`, bound to 127.0.0.1 only, offline, with no bootstrap peers.

    A daemon already answering at the API URL (a user's Kubo, say) is reused and left running.
    """

    def __init__(self, repo_dir: Path, api_port: int = 5001, gateway_port: int = 8080,
                 log_path: Path | None = None, ready_timeout: float = 60.0) -> None:
        self.repo_dir = Path(repo_dir)
        self.api_port = api_port
        self.gateway_port = gateway_port
        self.api_url = f"http://127.0.0.1:{api_port}"
        self.gateway_url = f"http://127.0.0.1:{gateway_port}"
        self.config_path = self.repo_dir.parent / f"{self.repo_dir.name}.init-config.json"
        super().__init__(
            "IPFS daemon",
            [str(JSIPFS), "daemon", "--init-config", str(self.config_path), "--init-profile", "test",
             "--offline", "--enable-preload=false"],
            is_ready=lambda: ipfs_answers(self.api_url, timeout=1.0),
            log_path=Path(log_path) if log_path else self.repo_dir.parent / f"{self.repo_dir.name}.log",
            env={"IPFS_PATH": str(self.repo_dir)},
            cwd=REPO_ROOT,
            ready_timeout=ready_timeout,
        )

    @classmethod
    def for_api(cls, api_url: str, repo_dir: Path, log_path: Path | None = None) -> "IPFSDaemon":
        parts = urlsplit(_base_url(api_url))
        if parts.hostname not in ("127.0.0.1", "localhost") or parts.port is None:
            raise ServiceError(f"can only start a local IPFS daemon at http://127.0.0.1:<port>, not {api_url!r}")
        gateway = gateway_port_for(parts.port)
        if gateway is None:
            raise ServiceError(f"API port {parts.port} leaves no gateway port ({GATEWAY_OFFSET} above it)")
        return cls(repo_dir, api_port=parts.port, gateway_port=gateway, log_path=log_path)

    def init_config(self) -> dict:
        return {
            "Addresses": {
                "API": f"/ip4/127.0.0.1/tcp/{self.api_port}",
                "Gateway": f"/ip4/127.0.0.1/tcp/{self.gateway_port}",
                "RPC": "",  # no gRPC server (it would take port 5003 for every daemon)
                "Swarm": [], "Announce": [], "NoAnnounce": [], "Delegates": [],
            },
            "Bootstrap": [],
            "Discovery": {"MDNS": {"Enabled": False}, "webRTCStar": {"Enabled": False}},
        }

    def _clear_stale_lock(self) -> None:
        """Remove repo.lock left by a daemon that was killed; refuse if a live process uses the repo."""
        lock = self.repo_dir / "repo.lock"
        if not lock.exists():
            return
        users = _repo_users(self.repo_dir)
        if users:
            raise ServiceError(f"the IPFS repo {self.repo_dir} is locked by process {users[0]}, which is still "
                               f"running but does not answer at {self.api_url}; stop it or use another repo")
        # js-ipfs locks with a directory (proper-lockfile) and would wait 20 s to call it stale.
        if lock.is_dir():
            shutil.rmtree(lock, ignore_errors=True)
        else:
            lock.unlink(missing_ok=True)

    def start(self) -> "IPFSDaemon":
        if self.is_ready():
            self.reused = True
            return self
        if not JSIPFS.exists():
            raise ServiceError(f"{JSIPFS} is missing: run `bash setup.sh` to install js-ipfs")
        self.repo_dir.parent.mkdir(parents=True, exist_ok=True)
        self._clear_stale_lock()
        # js-ipfs applies --init-config to an existing repo too, so a changed port takes effect.
        self.config_path.write_text(json.dumps(self.init_config(), indent=2))
        super().start()
        return self

    def __enter__(self) -> "IPFSDaemon":
        return self.start()
