"""The chain layer on each real node, Ganache and anvil: the same contract, Truffle's deployment,
restarts, reverts by name, blocks and logs pushed over the node's WebSocket."""
from __future__ import annotations

import json
import os
import queue
import subprocess
import threading
import time

import pytest
import requests
from eth_account import Account
from web3 import Web3

from infra import chain
from infra.files import REPO_ROOT
from tests.fixtures.chain import (
    CLIENT_KEYS,
    CLIENTS,
    ORG_KEY,
    check_round_lifecycle,
    cid_for,
    close_and_finalize,
    expect_revert,
)

pytestmark = [pytest.mark.ganache, pytest.mark.anvil]

RESTART_URL = "http://127.0.0.1:8646"


@pytest.fixture(scope="module")
def w3(node_url):
    return chain.connect(node_url)


def test_the_nodes_accounts_are_the_dev_keys(w3):
    assert w3.eth.chain_id == chain.GANACHE_CHAIN_ID
    assert w3.net.version in (str(chain.GANACHE_NETWORK_ID), str(chain.GANACHE_CHAIN_ID))  # Ganache's, anvil's
    assert w3.eth.accounts[:len(chain.DEV_KEYS)] == [Account.from_key(key).address for key in chain.DEV_KEYS]
    assert all(w3.eth.get_balance(account) >= chain.DEV_BALANCE_WEI // 2 for account in w3.eth.accounts[:3])


def test_round_lifecycle_with_events(w3):
    check_round_lifecycle(w3)


def test_a_submission_costs_four_requests_once_fees_and_gas_are_known(w3, monkeypatch):
    """The view a client reads, then its nonce, the raw transaction and the receipt: the chain id,
    the fees and the gas estimate are not asked again for every transaction."""
    asked = []
    post = requests.Session.post

    def counted_post(session, url, data=None, **kwargs):
        asked.append(json.loads(data)["method"])  # what reaches the node, not what a cache answered
        return post(session, url, data=data, **kwargs)

    monkeypatch.setattr(requests.Session, "post", counted_post)
    registry = chain.deploy_registry(w3, ORG_KEY, open_enrolment=True)
    registry.start_round(ORG_KEY, cid_for("base"))
    registry.submit_update(CLIENT_KEYS[0], 1, cid_for("first"), 10)
    asked.clear()
    assert registry.current_round_for(CLIENTS[1]) == chain.ClientRound(1, cid_for("base"), True, False, True, 0)
    registry.submit_update(CLIENT_KEYS[1], 1, cid_for("second"), 10)
    # A node that has not mined the transaction yet answers the receipt with null and is asked again.
    sent, polls = asked[:3], asked[3:]
    assert sent == ["eth_call", "eth_getTransactionCount", "eth_sendRawTransaction"]
    assert polls and set(polls) == {"eth_getTransactionReceipt"}


def test_reverts_are_named(w3):
    registry = chain.deploy_registry(w3, ORG_KEY)
    registry.add_client(ORG_KEY, CLIENTS[0])
    expect_revert("RoundNotOpen", lambda: registry.submit_update(CLIENT_KEYS[0], 1, cid_for("early"), 5))
    expect_revert("NotOwner", lambda: registry.start_round(CLIENT_KEYS[0], cid_for("base")))
    registry.start_round(ORG_KEY, cid_for("base"))
    expect_revert("NotEnrolled", lambda: registry.submit_update(CLIENT_KEYS[1], 1, cid_for("u"), 5))
    expect_revert("ZeroSamples", lambda: registry.submit_update(CLIENT_KEYS[0], 1, cid_for("u"), 0))
    registry.submit_update(CLIENT_KEYS[0], 1, cid_for("u"), 5)
    error = expect_revert("AlreadySubmitted",
                          lambda: registry.submit_update(CLIENT_KEYS[0], 1, cid_for("v"), 5))
    assert error.fields == {"round": 1, "client": CLIENTS[0]}
    close_and_finalize(registry, 1, cid_for("model"))
    expect_revert("RoundAlreadyFinalized", lambda: registry.finalize_round(ORG_KEY, 1, cid_for("model")))


def test_contract_deployed_by_truffle_is_driven_by_the_binding(w3, node_url, tmp_path):
    truffle = REPO_ROOT / "node_modules" / ".bin" / "truffle"
    build_dir = tmp_path / "build" / "contracts"
    done = subprocess.run([str(truffle), "migrate", "--reset", "--network", "development"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=240,
                          env={**os.environ, "FL_CHAIN_URL": node_url, "FL_TRUFFLE_BUILD_DIR": str(build_dir)})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    address = chain.find_deployment(w3, tmp_path / "no-record.json", artifact=build_dir / "RoundRegistry.json")
    assert address is not None and address.lower() in done.stdout.lower()
    registry = chain.Registry(w3, address)
    assert registry.owner == Account.from_key(ORG_KEY).address and not registry.open_enrolment
    registry.add_client(ORG_KEY, CLIENTS[0])
    registry.start_round(ORG_KEY, cid_for("truffle base"))
    registry.submit_update(CLIENT_KEYS[0], 1, cid_for("truffle update"), 42)
    assert registry.submissions(1) == [chain.Submission(CLIENTS[0], cid_for("truffle update"), 42)]


@pytest.mark.parametrize("kind", list(chain.CHAIN_NODES))
def test_restart_on_the_same_database_keeps_the_rounds(tmp_path, kind):
    node_class = chain.CHAIN_NODES[kind]
    db, log = tmp_path / "db", tmp_path / f"{kind}.log"
    with node_class(RESTART_URL, db_dir=db, log_path=log) as node:
        assert not node.reused
        w3 = chain.connect(RESTART_URL)
        registry = chain.deploy_registry(w3, ORG_KEY, open_enrolment=True)
        record = tmp_path / "deployments.json"
        chain.record_deployment(record, w3, registry.address)
        registry.start_round(ORG_KEY, cid_for("base"))
        registry.submit_update(CLIENT_KEYS[0], 1, cid_for("update"), 7)
        # A second start at the same URL reuses the running node and leaves it alone.
        with node_class(RESTART_URL, db_dir=tmp_path / "other", log_path=log) as again:
            assert again.reused
        assert chain.connect(RESTART_URL).eth.block_number == w3.eth.block_number
    with pytest.raises(chain.ChainUnavailable, match=RESTART_URL):
        chain.connect(RESTART_URL)
    with pytest.raises(chain.ChainUnavailable, match=RESTART_URL):
        registry.current_round()
    with pytest.raises(chain.ChainUnavailable, match=RESTART_URL):
        close_and_finalize(registry, 1, cid_for("model"))

    with node_class(RESTART_URL, db_dir=db, log_path=log) as node:
        assert not node.reused
        w3 = chain.connect(RESTART_URL)
        registry = chain.Registry(w3, chain.find_deployment(w3, record))
        assert registry.current_round() == 1
        assert registry.submissions(1) == [chain.Submission(CLIENTS[0], cid_for("update"), 7)]
        close_and_finalize(registry, 1, cid_for("model"))  # nonces carry on after the restart
        assert registry.latest_model() == (1, cid_for("model"))


def test_block_watcher_is_pushed_each_new_block_and_polls_nothing(w3, monkeypatch):
    """Over HTTP the watcher follows the node's WebSocket: a mined block reaches on_block without
    the watcher asking the node for its block number."""
    asked_by_watcher = []
    post = requests.Session.post

    def counted_post(session, url, data=None, **kwargs):
        if threading.current_thread().name == "test-watcher":
            asked_by_watcher.append(json.loads(data)["method"])
        return post(session, url, data=data, **kwargs)

    monkeypatch.setattr(requests.Session, "post", counted_post)
    looks = queue.Queue()
    watcher = chain.BlockWatcher("test-watcher", w3, lambda logs: looks.put(time.monotonic()) and False,
                                 on_error=lambda exc, wait: None, poll_seconds=0.05, recheck_seconds=60).start()
    try:
        looks.get(timeout=10)  # the look made as the subscription begins
        time.sleep(0.5)
        assert looks.empty()  # an idle chain: no look until a block or the recheck
        chain.deploy_registry(w3, ORG_KEY, open_enrolment=True)
        looks.get(timeout=5)
    finally:
        watcher.stop()
    assert asked_by_watcher == []


def test_block_watcher_with_topics_looks_only_at_blocks_that_log_them(w3):
    """A watcher given event topics is woken by a block that logs one of them, and by no other."""
    registry = chain.deploy_registry(w3, ORG_KEY)
    looks = queue.Queue()
    watcher = chain.BlockWatcher("test-topics", w3, lambda logs: looks.put(logs) and False,
                                 on_error=lambda exc, wait: None, poll_seconds=0.05, recheck_seconds=60,
                                 topics=chain.event_topics("RoundStarted")).start()
    try:
        assert looks.get(timeout=10) is None  # the look made as the subscription begins: it knows of no log
        registry.add_client(ORG_KEY, CLIENTS[0])  # a block that logs ClientAdded only
        time.sleep(0.5)
        assert looks.empty()
        started = registry.start_round(ORG_KEY, cid_for("base"))
        [notified] = looks.get(timeout=5)  # the log that woke it
        assert notified["blockNumber"] == started.block_number
        assert notified["topics"][0] == bytes.fromhex(chain.event_topics("RoundStarted")[0][2:])
    finally:
        watcher.stop()


def test_block_watcher_polls_where_no_websocket_answers():
    """A node whose WebSocket cannot be reached is polled for its block number instead."""
    w3 = Web3(Web3.HTTPProvider("http://127.0.0.1:9"))  # nothing listens: the socket fails, so does every poll
    errors = queue.Queue()
    watcher = chain.BlockWatcher("test-poller", w3, lambda logs: False, on_error=lambda exc, wait: errors.put(exc),
                                 poll_seconds=0.05, recheck_seconds=60).start()
    try:
        assert isinstance(errors.get(timeout=10), chain.NODE_ERRORS)
    finally:
        watcher.stop()


def test_events_of_a_range_past_the_head_are_none(w3):
    """The demo's follower asks from the block after the last it read: on an idle chain that is past
    the head, which anvil refuses as out of range and Ganache answers with no logs."""
    registry = chain.deploy_registry(w3, ORG_KEY)
    head = w3.eth.block_number
    assert registry.events("ClientAdded", head + 1, head) == []
    assert registry.events("ClientAdded", head + 1) == []
    registry.add_client(ORG_KEY, CLIENTS[0])
    [added] = registry.events("ClientAdded", head + 1)
    assert added["args"]["client"] == CLIENTS[0]
