"""Both dashboards in headless Chromium, on the real stack, as a person uses them.

A Ganache node of the test's own (so that it can be stopped), the session's js-ipfs daemon, the
organization and one client, each its own process. The organization's page and the client's page
stay open in two windows: the test presses the buttons the pages render and reads what the pages
show, checking that each page's checklist names the next step at every stage, that the pages
follow the round by themselves without reloading (the enrolment box keeps its half-typed text),
that the client's training shows a progress bar, that a failed action's message goes once its
round changes, and that a chain outage is said in words with the actions hidden, until the chain
is back. Screenshots of every step are kept under results/browser/<time>/.
"""
from __future__ import annotations

import re
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
import requests
from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

from demo import free_port
from infra import chain
from infra.files import REPO_ROOT
from infra.processes import ManagedProcess, http_answers

pytestmark = [pytest.mark.browser, pytest.mark.e2e, pytest.mark.ganache, pytest.mark.ipfs_daemon]

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SCREENSHOTS = REPO_ROOT / "results" / "browser"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1280,1400"]
JOB_TIMEOUT = 300.0  # a loaded CI machine trains digits in well under this
LIVE_TIMEOUT = 60.0  # for a page to show by itself what happened (it asks every 1-3 s)
# The organization's plan: enough batches (about 40 epochs of 140) for the progress bar to be seen moving.
PLAN = ["--epochs", "40", "--batch-size", "8"]


@pytest.fixture()
def screenshots(capsys):
    folder = SCREENSHOTS / datetime.now().strftime("%Y%m%d-%H%M%S")
    folder.mkdir(parents=True)
    with capsys.disabled():
        print(f"\nbrowser screenshots: {folder}")
    return folder


@pytest.fixture()
def browser(tmp_path):
    """Headless Debian Chromium through Debian's chromedriver; fails (never skips) when they are missing."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        pytest.fail(f"{', '.join(missing)} missing: run `bash setup.sh` (Debian chromium and chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)  # Debian's binary; the driver path below keeps Selenium Manager off
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=str(CHROMEDRIVER),
                                                               log_output=str(tmp_path / "chromedriver.log")))
    driver.set_page_load_timeout(JOB_TIMEOUT)  # a button's post returns once its action is done
    yield driver
    driver.quit()


@pytest.fixture()
def own_chain(tmp_path):
    """A Ganache node of this test's own, which it may stop and start again (its state kept on disk)."""
    url = f"http://127.0.0.1:{free_port(8760)}"
    node = chain.Ganache(url, db_dir=tmp_path / "chain", log_path=tmp_path / "logs" / "ganache.log").start()
    assert not node.reused
    yield node
    node.stop()


@pytest.fixture()
def dashboards(tmp_path, own_chain, ipfs_api):
    """URLs of the organization's dashboard and client 0's page, served by `run.py app` and `run.py client`."""
    env = {"FL_CHAIN_URL": own_chain.url, "FL_IPFS_API": ipfs_api, "FL_STATE_DIR": str(tmp_path / "state"),
           "FL_CONTRACT_RECORD": str(tmp_path / "deployments.json"), "TF_CPP_MIN_LOG_LEVEL": "2"}
    commands = {"organization": (free_port(5470), ["app", "--task", "digits", *PLAN]),
                "client-0": (free_port(5480),
                             ["client", "--id", "0", "--clients", "1", "--task", "digits", "--manual"])}
    processes, urls = [], []
    try:
        for name, (port, args) in commands.items():
            url = f"http://127.0.0.1:{port}"
            process = ManagedProcess(name, [sys.executable, str(REPO_ROOT / "run.py"), *args, "--port", str(port)],
                                     is_ready=lambda url=url: http_answers(url + "/api/status"),
                                     log_path=tmp_path / "logs" / f"{name}.log", env=env, cwd=REPO_ROOT,
                                     ready_timeout=180)
            processes.append(process)
            process.start()
            assert not process.reused, f"something else already answers at {url}"
            urls.append(url)
        yield tuple(urls)
    finally:
        for process in processes:
            process.stop()


class Page:
    """One dashboard in a browser window of its own: open it, submit its forms, read it, photograph it."""

    def __init__(self, driver, url: str, screenshots: Path, name: str, window: str) -> None:
        self.driver, self.url, self.screenshots, self.name, self.window = driver, url, screenshots, name, window

    def use(self) -> "Page":
        if self.driver.current_window_handle != self.window:
            self.driver.switch_to.window(self.window)
        return self

    def open(self) -> "Page":
        self.use().driver.get(self.url + "/")
        self.mark()
        return self

    def mark(self) -> None:
        """Mark the document now shown: `reloaded()` tells whether another one has replaced it since."""
        self.use().driver.execute_script("window.stillHere = true")

    def reloaded(self) -> bool:
        return not self.use().driver.execute_script("return window.stillHere === true")

    def press(self, action: str, label: str, fill: dict[str, str] | None = None) -> None:
        """Submit the form posting to `action` with the button labelled `label` (a prefix of its text)."""
        self.use()
        [form] = self.driver.find_elements(By.XPATH, f"//form[@action='{action}']")
        for name, value in (fill or {}).items():
            field = form.find_element(By.NAME, name)
            field.clear()
            field.send_keys(value)
        [button] = [b for b in form.find_elements(By.TAG_NAME, "button") if b.text.strip().startswith(label)]
        assert button.is_enabled(), f"{self.name}: {label!r} is disabled"
        button.click()
        # The post does its work, then redirects back here: done once a new page has loaded.
        self.wait_for(self.new_page_loaded, f"the page after {label!r}", timeout=JOB_TIMEOUT)
        assert self.driver.current_url.rstrip("/") == self.url, self.text("body")
        self.mark()

    def new_page_loaded(self) -> bool:
        try:
            return self.driver.execute_script("return window.stillHere !== true && document.readyState === 'complete'")
        except WebDriverException:  # the old document went away while the script ran
            return False

    def text(self, css: str) -> str:
        return self.use().driver.find_element(By.CSS_SELECTOR, css).text

    def texts(self, css: str) -> list[str]:
        return [e.text for e in self.use().driver.find_elements(By.CSS_SELECTOR, css)]

    def next_step(self) -> str:
        return self.text("#next-step")

    def flashes(self) -> list[str]:
        return self.texts(".flash")

    def error_flashes(self) -> list[str]:
        return self.texts(".flash.error")

    def shot(self, step: str) -> None:
        number = len(list(self.screenshots.iterdir()))  # numbered in the order they were taken
        self.use().driver.save_screenshot(str(self.screenshots / f"{number:02d}-{self.name}-{step}.png"))

    def wait_for(self, condition, what: str, timeout: float = LIVE_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self.use()
            try:
                if condition():
                    return
            except WebDriverException:  # a live part swapped out under the read: read again
                pass
            if time.monotonic() > deadline:
                self.shot("timeout")
                raise AssertionError(f"{self.name}: timed out waiting for {what}")
            time.sleep(0.25)

    def shows(self, css: str, words: str, what: str, timeout: float = LIVE_TIMEOUT) -> None:
        """Wait until the element at `css` contains `words`, shown by the page itself (no reload)."""
        self.wait_for(lambda: words in self.text(css), f"{what}: {words!r} in {css}", timeout)
        assert not self.reloaded(), f"{self.name} reloaded itself to show {what}"


def test_both_dashboards_guide_a_round_and_follow_it_live(browser, dashboards, own_chain, screenshots):
    org_url, client_url = dashboards
    org = Page(browser, org_url, screenshots, "organization", browser.current_window_handle)
    browser.switch_to.new_window("window")
    client = Page(browser, client_url, screenshots, "client", browser.current_window_handle)

    # Before anything: each page says what comes first.
    client.open().shot("start")
    client_address = client.text("#address")
    assert client.next_step().startswith("Next: Wait for the organization to deploy its round registry")
    client.press("/pull", "Pull base model")  # cannot work yet: the failure shows, until the round changes
    client.shows("#job", "pull: failed", "the failed pull")
    assert "no contract is deployed" in client.text("#job")
    org.open().shot("start")
    assert org.next_step().startswith("Next: Deploy the round registry: the button below")

    org.press("/deploy", "Deploy contract")
    assert org.error_flashes() == [] and org.flashes()[0].startswith("Deployed the round registry at ")
    assert org.next_step().startswith("Next: Enrol each client's address (shown on its page)")
    client.shows("#next-step", f"Ask the organization to enrol this device's address {client_address}",
                 "the deployed registry, on the client's page")

    org.press("/clients", "Enrol client", fill={"address": client_address})
    assert org.flashes() == [f"Client {client_address} is enrolled"], org.flashes()
    assert org.next_step() == "Next: Start the first round: the button below publishes the initial model and opens round 1."
    assert client_address in org.text("#clients")
    client.shows("#next-step", "Wait for the organization to open the first round", "the enrolment")

    org.press("/rounds", "Start the first round")
    assert org.error_flashes() == [] and org.flashes()[0].startswith("Round 1 started from ")
    assert org.next_step().startswith("Next: Wait for the clients: 0 of 1 invited clients have submitted; deadline ")
    assert int(org.text("#round")) == 1 and "Round 1 (open)" in org.text("body")
    assert "always answering the most common label of the test set" in org.text("#baseline")
    org.shot("round-open")

    # The client's page follows by itself: its next step, and the failed pull of another round gone.
    client.shows("#next-step", "Press Participate to take part in round 1", "round 1's opening")
    assert client.text("#job") == "idle", client.text("#job")
    client.shot("round-open")

    # Half an address typed on the organization's page, which must survive every refresh.
    half_typed = "0xFFcf8FDEE72ac11b5c54"
    org.use().driver.find_element(By.NAME, "address").send_keys(half_typed)

    client.press("/participate", "Participate")
    assert client.error_flashes() == []
    client.wait_for(lambda: client.texts("#training progress"), "the training progress bar", timeout=JOB_TIMEOUT)
    bar = client.driver.find_element(By.CSS_SELECTOR, "#training progress")
    first = float(bar.get_attribute("value"))
    assert re.search(r"training: epoch \d+ of 40(, batch \d+ of \d+| done)", client.text("#training"))
    client.shot("training")
    client.wait_for(lambda: not client.texts("#training") or float(
        client.driver.find_element(By.CSS_SELECTOR, "#training progress").get_attribute("value")) > first,
        "the progress bar to move")
    client.shows("#job", "participate: done", "the end of the job", timeout=JOB_TIMEOUT)
    assert "submitted" in client.text("#round")
    assert client.text("#local-accuracy").startswith("round 1: before ")
    assert "always answering its most common label scores" in client.text("#local-accuracy")
    assert client.next_step().startswith("Next: Done with round 1")
    client.shot("submitted")

    # The organization's page shows the update and the next step without a reload; the box keeps its text.
    org.shows("#submissions", client_address, "the client's update")
    org.shows("#next-step", "Aggregate and publish round 1 (button below): every invited client is in",
              "the next step once every invited client is in")
    assert "submitted" in org.text("#clients")
    assert org.use().driver.find_element(By.NAME, "address").get_attribute("value") == half_typed
    org.shot("update-in")

    org.press("/rounds/1/aggregate", "Aggregate and publish round 1")
    org.shot("aggregated")
    assert org.error_flashes() == [], org.error_flashes()
    [done] = org.flashes()
    assert done.startswith("Round 1 finalized: model ") and done.endswith("round 2 is open")
    assert int(org.text("#round")) == 2 and org.next_step().startswith("Next: Wait for the clients: 0 of 1 invited")
    assert "round 1: accepted" in org.text("#clients")
    history = requests.get(org_url + "/api/status", timeout=30).json()["history"]
    assert [point["round"] for point in history] == [0, 1] and history[1]["accuracy"] > history[0]["accuracy"]
    assert org.texts("#history td.accuracy") == [f"{100 * point['accuracy']:.2f} %" for point in history]
    baseline = requests.get(org_url + "/api/status", timeout=30).json()["baseline"]["accuracy"]
    assert org.texts("#history td.gain") == [f"{100 * (point['accuracy'] - baseline):+.2f} pp" for point in history]
    chart = org.driver.find_element(By.CSS_SELECTOR, "img[alt='test accuracy per round']")
    assert org.driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", chart) > 0
    client.shows("#round", "round 2 (open)", "round 2's opening")
    client.shot("next-round")

    # The chain goes down: both pages say so in words, with what to run, and hide what cannot work.
    own_chain.stop()
    org.shows("#chain", "does not answer. Start it with `python run.py chain`", "the chain's outage")
    assert org.texts("#actions button") == [] and not org.driver.find_element(By.ID, "enrol").is_displayed()
    assert "unknown while the chain is down" in org.text("body")
    assert "Traceback" not in org.text("body") and "urllib3" not in org.text("body")
    org.shot("chain-down")
    client.shows("#chain", "does not answer. Start it with `python run.py chain`", "the chain's outage")
    assert client.texts("#actions button") == []
    client.shot("chain-down")

    # And back: the pages carry on by themselves, the actions return.
    own_chain.start()
    org.shows("#actions", "Aggregate and publish round 2", "the chain back")
    assert org.driver.find_element(By.ID, "enrol").is_displayed()
    client.shows("#actions", "Participate", "the chain back")
