"""Storage: CIDs identical to the daemon's, verified reads, timeouts, clear errors, concurrent writers."""
from __future__ import annotations

import functools
import json
import multiprocessing
import random
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from multiformats import CID

from infra import ipfs
from infra.processes import ServiceError

KIB = 1024
CHUNK = ipfs.CHUNK_SIZE
# 0 B and one byte; exactly one chunk and one byte more; a few chunks; ~172 chunks (one level).
ROUND_TRIP_SIZES = [0, 1, 256 * KIB, 256 * KIB + 1, 5_000_000, 45_000_000]
TWO_LEVELS = 174 * CHUNK + 1  # one leaf more than a single node can link: the DAG gets a second level
EMPTY_FILE_CID = "bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku"  # Kubo, --cid-version=1
# A well-formed CID that no test ever adds.
ABSENT_CID = ipfs.compute_cid(b"never added by any test: 5c0b1e")


@functools.lru_cache(maxsize=None)
def payload(size: int) -> bytes:
    return random.Random(size).randbytes(size)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def embedded(tmp_path) -> ipfs.EmbeddedStore:
    return ipfs.EmbeddedStore(tmp_path / "store")


@pytest.fixture()
def daemon_store(ipfs_api) -> ipfs.IPFSStore:
    return ipfs.IPFSStore(ipfs_api, timeout=30)


# --- CIDs -------------------------------------------------------------------------------------

def test_cid_setting_is_v1_raw_leaves_base32():
    assert ipfs.compute_cid(b"") == EMPTY_FILE_CID
    assert ipfs.compute_cid(payload(CHUNK)).startswith("bafkrei")
    assert ipfs.compute_cid(payload(CHUNK + 1)).startswith("bafybei")


@pytest.mark.parametrize("bad", ["", "notacid", "bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvy!!"])
def test_malformed_cid_is_a_clear_storage_error(embedded, bad):
    with pytest.raises(ipfs.StorageError, match="CID"):
        embedded.get(bad)


def test_cid_v0_is_refused_with_the_setting_named(embedded):
    with pytest.raises(ipfs.StorageError, match="CIDv1"):
        embedded.get("QmbFMke1KXqnYyBBWxB74N4c5SBnJMVAiMNRcGu6x1AwQH")


# --- embedded store ---------------------------------------------------------------------------

@pytest.mark.parametrize("size", ROUND_TRIP_SIZES)
def test_embedded_round_trip(embedded, size):
    data = payload(size)
    cid = embedded.add(data)
    assert cid == ipfs.compute_cid(data)
    assert embedded.has(cid)
    assert embedded.get(cid) == data
    assert embedded.add(data) == cid  # adding again is harmless


def test_embedded_accepts_the_cid_in_another_base(embedded):
    cid = embedded.add(b"hello")
    base58 = str(CID.decode(cid).set(base="base58btc"))
    assert embedded.get(base58) == b"hello"


def test_embedded_rejects_tampered_bytes(embedded):
    cid = embedded.add(payload(300 * KIB))
    path = embedded.root / cid
    tampered = bytearray(path.read_bytes())
    tampered[12345] ^= 0x01
    path.write_bytes(tampered)
    with pytest.raises(ipfs.ContentMismatch, match=cid):
        embedded.get(cid)
    # Adding the true bytes again repairs the file.
    embedded.add(payload(300 * KIB))
    assert embedded.get(cid) == payload(300 * KIB)


def test_embedded_missing_cid_is_not_found_at_once(embedded):
    started = time.monotonic()
    with pytest.raises(ipfs.ContentNotFound, match=ABSENT_CID):
        embedded.get(ABSENT_CID, timeout=2)
    assert time.monotonic() - started < 1
    assert not embedded.has(ABSENT_CID)
    with pytest.raises(ipfs.ContentNotFound):
        embedded.pin(ABSENT_CID)


def test_embedded_max_bytes(embedded):
    cid = embedded.add(payload(1000))
    assert embedded.get(cid, max_bytes=1000) == payload(1000)
    with pytest.raises(ipfs.ContentTooLarge, match="999"):
        embedded.get(cid, max_bytes=999)


def test_embedded_describe_and_no_gateway(embedded):
    assert str(embedded.root) in embedded.describe()
    assert embedded.gateway_url(EMPTY_FILE_CID) is None


def _write_many(root: str, seed: int, rounds: int) -> list[str]:
    """Worker for the concurrency test: one shared payload and one of its own, many times each."""
    store = ipfs.EmbeddedStore(Path(root))
    cids = []
    for i in range(rounds):
        cids.append(store.add(payload(600 * KIB)))
        cids.append(store.add(random.Random(seed * 1000 + i).randbytes(100 * KIB)))
    return cids


def test_two_processes_writing_at_once_leave_the_store_intact(tmp_path):
    root = tmp_path / "shared-store"
    ipfs.EmbeddedStore(root)
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        results = pool.starmap(_write_many, [(str(root), 1, 15), (str(root), 2, 15)])
    store = ipfs.EmbeddedStore(root)
    written = {cid for cids in results for cid in cids}
    assert len(written) == 1 + 2 * 15
    assert sorted(p.name for p in root.iterdir()) == sorted(written)  # no temp files left behind
    for cid in written:
        store.get(cid)  # verified read


def test_open_store_chooses_the_backend(tmp_path):
    assert isinstance(ipfs.open_store("embedded", tmp_path), ipfs.EmbeddedStore)
    store = ipfs.open_store("http://127.0.0.1:5001", tmp_path, timeout=5)
    assert isinstance(store, ipfs.IPFSStore) and store.timeout == 5
    assert store.gateway_url(EMPTY_FILE_CID) == f"http://127.0.0.1:8080/ipfs/{EMPTY_FILE_CID}"


# --- a node that is down, or that lies --------------------------------------------------------

def test_stopped_daemon_gives_a_clear_error():
    url = f"http://127.0.0.1:{free_port()}"
    store = ipfs.IPFSStore(url, timeout=5)
    assert not ipfs.ipfs_answers(url)
    for call in (lambda: store.add(b"x"), lambda: store.get(EMPTY_FILE_CID), lambda: store.pin(EMPTY_FILE_CID)):
        with pytest.raises(ipfs.StorageUnavailable) as caught:
            call()
        assert url in str(caught.value) and "python run.py ipfs" in str(caught.value)
    with pytest.raises(ipfs.StorageUnavailable, match="python run.py ipfs"):
        store.describe()


class LyingNode(BaseHTTPRequestHandler):
    """An HTTP RPC API whose add names the wrong CID (or answers nonsense to a one-byte add), whose
    cat serves other bytes, and whose pin fails with the daemon's JSON error."""

    def do_POST(self):
        sent = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        status = 200
        if self.path.startswith("/api/v0/add"):
            one_byte = b"\r\n\r\nx\r\n--" in sent
            body = b"<html>not json</html>" if one_byte else json.dumps({"Name": "x", "Hash": ABSENT_CID}).encode()
        elif self.path.startswith("/api/v0/pin"):
            status, body = 500, json.dumps({"Message": "pin: repo is read-only", "Code": 0}).encode()
        else:
            body = b"not the content you asked for"
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture()
def lying_store():
    server = ThreadingHTTPServer(("127.0.0.1", 0), LyingNode)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield ipfs.IPFSStore(f"http://127.0.0.1:{server.server_address[1]}", timeout=5)
    server.shutdown()
    server.server_close()


def test_bytes_from_a_lying_node_are_rejected(lying_store):
    with pytest.raises(ipfs.ContentMismatch):
        lying_store.get(EMPTY_FILE_CID)
    with pytest.raises(ipfs.ContentMismatch, match="expected"):
        lying_store.add(b"some bytes")
    with pytest.raises(ipfs.StorageError, match="answered no CID"):
        lying_store.add(b"x")
    with pytest.raises(ipfs.StorageError, match="repo is read-only"):
        lying_store.pin(EMPTY_FILE_CID)


# --- the real daemon --------------------------------------------------------------------------

@pytest.mark.ipfs_daemon
@pytest.mark.parametrize("size", ROUND_TRIP_SIZES)
def test_daemon_round_trip_with_the_embedded_cid(daemon_store, size):
    data = payload(size)
    cid = daemon_store.add(data)
    assert cid == ipfs.compute_cid(data)
    assert daemon_store.get(cid) == data
    assert daemon_store.has(cid)
    daemon_store.pin(cid)


@pytest.mark.ipfs_daemon
def test_daemon_cid_of_a_two_level_dag_matches(daemon_store):
    data = payload(TWO_LEVELS)
    cid = daemon_store.add(data)
    assert cid == ipfs.compute_cid(data)
    assert daemon_store.get(cid) == data


@pytest.mark.ipfs_daemon
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(size=st.one_of(st.integers(0, 3 * CHUNK + 2),
                      st.sampled_from([CHUNK - 1, 2 * CHUNK, 2 * CHUNK + 1, 174 * CHUNK])),
       seed=st.integers(0, 2**32 - 1))
def test_daemon_and_embedded_cids_agree_near_chunk_boundaries(daemon_store, size, seed):
    data = random.Random(seed).randbytes(size)
    assert daemon_store.add(data) == ipfs.compute_cid(data)


@pytest.mark.ipfs_daemon
def test_daemon_missing_cid_fails_within_its_timeout(daemon_store):
    started = time.monotonic()
    with pytest.raises(ipfs.StorageTimeout):
        daemon_store.get(ABSENT_CID, timeout=2)
    assert time.monotonic() - started < 5
    assert not daemon_store.has(ABSENT_CID)


@pytest.mark.ipfs_daemon
def test_daemon_max_bytes_stops_the_transfer(daemon_store):
    cid = daemon_store.add(payload(5_000_000))
    assert daemon_store.get(cid, max_bytes=5_000_000) == payload(5_000_000)
    with pytest.raises(ipfs.ContentTooLarge):
        daemon_store.get(cid, max_bytes=100_000)


@pytest.mark.ipfs_daemon
def test_daemon_serving_corrupted_blocks_is_caught(ipfs_daemon, daemon_store):
    """Corrupt the node's own copy on disk: the node serves it, the store refuses it."""
    data = random.Random("tamper").randbytes(10 * KIB)
    cid = daemon_store.add(data)
    blocks = [p for p in (ipfs_daemon.repo_dir / "blocks").rglob("*") if p.is_file() and p.read_bytes() == data]
    assert len(blocks) == 1, "the raw leaf should be stored as one file holding exactly the bytes"
    tampered = bytearray(data)
    tampered[0] ^= 0xFF
    blocks[0].write_bytes(tampered)
    with pytest.raises(ipfs.ContentMismatch, match=cid):
        daemon_store.get(cid)


@pytest.mark.ipfs_daemon
def test_daemon_describe_and_gateway(ipfs_daemon, daemon_store):
    assert "js-ipfs" in daemon_store.describe() and ipfs_daemon.api_url in daemon_store.describe()
    store = ipfs.IPFSStore(ipfs_daemon.api_url, gateway=ipfs_daemon.gateway_url)
    cid = store.add(b"through the gateway")
    assert requests.get(store.gateway_url(cid), timeout=10).content == b"through the gateway"


# --- daemon lifecycle -------------------------------------------------------------------------

def test_gateway_port_follows_the_api_port(tmp_path):
    assert ipfs.IPFSDaemon.for_api("http://127.0.0.1:5001", tmp_path / "r").gateway_port == 8080
    assert ipfs.IPFSDaemon.for_api("http://127.0.0.1:5101", tmp_path / "r").gateway_port == 8180
    with pytest.raises(ServiceError, match="local"):
        ipfs.IPFSDaemon.for_api("http://example.org:5001", tmp_path / "r")


@pytest.mark.ipfs_daemon
def test_a_running_daemon_is_reused_and_left_running(ipfs_daemon, tmp_path):
    with ipfs.IPFSDaemon.for_api(ipfs_daemon.api_url, tmp_path / "unused") as again:
        assert again.reused
    assert ipfs.ipfs_answers(ipfs_daemon.api_url)


@pytest.mark.ipfs_daemon
def test_stop_start_and_stale_lock_recovery_on_one_repo(tmp_path, ipfs_daemon):
    api_port = free_port()
    daemon = ipfs.IPFSDaemon(tmp_path / "repo", api_port=api_port, gateway_port=free_port(),
                                log_path=tmp_path / "ipfs.log")
    with daemon:
        assert not daemon.reused
        cid = ipfs.IPFSStore(daemon.api_url, timeout=10).add(b"survives restarts")
    assert not ipfs.ipfs_answers(daemon.api_url)

    daemon.start()  # same repo after a clean stop
    assert ipfs.IPFSStore(daemon.api_url, timeout=10).get(cid) == b"survives restarts"
    intruder = ipfs.IPFSDaemon(daemon.repo_dir, api_port=free_port(), gateway_port=free_port(),
                                  log_path=tmp_path / "intruder.log")
    with pytest.raises(ServiceError, match="locked by process"):
        intruder.start()  # a live daemon's lock is never taken away
    daemon.kill()  # as a crash would: the repo lock stays behind
    assert (daemon.repo_dir / "repo.lock").exists()

    daemon.start()
    try:
        assert ipfs.IPFSStore(daemon.api_url, timeout=10).get(cid) == b"survives restarts"
    finally:
        daemon.stop()
    assert not ipfs.ipfs_answers(daemon.api_url)
