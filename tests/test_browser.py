"""A whole round clicked through both dashboards in headless Chromium, on the real stack.

Ganache, js-ipfs, the organization and one client each run as their own process; the browser
submits the forms the apps render (so whatever hidden fields they carry go along) and reads the
result off the pages. Screenshots of every step are kept under results/browser/<time>/.
"""
from __future__ import annotations

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
def dashboards(tmp_path, ganache_url, ipfs_api):
    """URLs of the organization's dashboard and client 0's page, served by `run.py app` and `run.py client`."""
    env = {"FL_CHAIN_URL": ganache_url, "FL_IPFS_API": ipfs_api, "FL_STATE_DIR": str(tmp_path / "state"),
           "FL_CONTRACT_RECORD": str(tmp_path / "deployments.json"), "TF_CPP_MIN_LOG_LEVEL": "2"}
    commands = {"organization": (free_port(5470), ["app", "--task", "digits"]),
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
    """One dashboard in the browser: open it, submit its forms, read it, photograph it."""

    def __init__(self, driver, url: str, screenshots: Path, name: str) -> None:
        self.driver, self.url, self.screenshots, self.name = driver, url, screenshots, name

    def open(self) -> "Page":
        self.driver.get(self.url + "/")
        return self

    def press(self, action: str, label: str, fill: dict[str, str] | None = None) -> None:
        """Submit the form posting to `action` with the button labelled `label` (a prefix of its text)."""
        [form] = self.driver.find_elements(By.XPATH, f"//form[@action='{action}']")
        for name, value in (fill or {}).items():
            field = form.find_element(By.NAME, name)
            field.clear()
            field.send_keys(value)
        [button] = [b for b in form.find_elements(By.TAG_NAME, "button") if b.text.strip().startswith(label)]
        # Marks this document, so that the next one is told apart without touching a node that may be gone.
        self.driver.execute_script("window.beforePress = true")
        button.click()
        # The post does its work, then redirects back here: done once a new page has loaded.
        self.wait_for(self.new_page_loaded, f"the page after {label!r}", timeout=JOB_TIMEOUT)
        assert self.driver.current_url.rstrip("/") == self.url

    def new_page_loaded(self) -> bool:
        try:
            return self.driver.execute_script(
                "return window.beforePress !== true && document.readyState === 'complete'")
        except WebDriverException:  # the old document went away while the script ran
            return False

    def text(self, css: str) -> str:
        return self.driver.find_element(By.CSS_SELECTOR, css).text

    def flashes(self) -> list[str]:
        return [f.text for f in self.driver.find_elements(By.CSS_SELECTOR, ".flash")]

    def error_flashes(self) -> list[str]:
        return [f.text for f in self.driver.find_elements(By.CSS_SELECTOR, ".flash.error")]

    def shot(self, step: str) -> None:
        number = len(list(self.screenshots.iterdir()))  # numbered in the order they were taken
        self.driver.save_screenshot(str(self.screenshots / f"{number:02d}-{self.name}-{step}.png"))

    def wait_for(self, condition, what: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                self.shot("timeout")
                raise AssertionError(f"{self.name}: timed out waiting for {what}")
            time.sleep(0.5)


def test_a_whole_round_through_both_dashboards(browser, dashboards, screenshots):
    org_url, client_url = dashboards
    org = Page(browser, org_url, screenshots, "organization").open()
    client = Page(browser, client_url, screenshots, "client").open()
    client.shot("start")
    client_address = client.text("#address")

    org.open().shot("start")
    org.press("/deploy", "Deploy contract")  # a fresh deployment record: no contract yet
    assert org.error_flashes() == [] and org.flashes()[0].startswith("Deployed the round registry at ")
    contract = org.text("#contract")
    assert contract.startswith("0x") and len(contract) == 42

    org.press("/clients", "Enrol client", fill={"address": client_address})
    assert org.flashes() == [f"Client {client_address} is enrolled"], org.flashes()
    org.press("/rounds", "Start the first round")
    assert org.error_flashes() == [] and org.flashes()[0].startswith("Round 1 started from ")
    org.shot("round-open")
    round_id = int(org.text("#round"))
    assert round_id == 1 and "Round 1 (open)" in org.text("body")
    rounds_in_history = [row.text for row in org.driver.find_elements(By.CSS_SELECTOR, "#history tr > td:first-child")]
    assert rounds_in_history[0] == "initial", rounds_in_history

    client.open()
    assert client.text("#round").startswith(f"round {round_id} (open)")
    assert "not enrolled" not in client.text("#round")
    client.press("/participate", "Participate")
    assert client.error_flashes() == [] and client.flashes() == ["Participate started"]
    client.shot("participating")

    def job_finished() -> bool:
        client.open()  # the page shows the job; reload until it is no longer running
        return not client.text("#job").startswith("participate: running")

    client.wait_for(job_finished, "the participate job", timeout=JOB_TIMEOUT)
    # Once more: the page reads the chain before the job, so the load that saw the job end may
    # show the round as it was a moment before.
    client.open().shot("participated")
    assert client.text("#job").startswith("participate: done"), client.text("#job")
    assert "submitted" in client.text("#round")
    assert client.text("#local-accuracy").startswith(f"round {round_id}: before ")

    org.open()
    submissions = org.text("#submissions")
    assert client_address in submissions, submissions
    org.press(f"/rounds/{round_id}/aggregate", f"Aggregate and publish round {round_id}")
    org.shot("aggregated")
    assert org.error_flashes() == [], org.error_flashes()
    [done] = org.flashes()
    assert done.startswith(f"Round {round_id} finalized: model ") and done.endswith(f"round {round_id + 1} is open")

    # The page now shows the next round open, and the new model's accuracy in the history.
    assert int(org.text("#round")) == round_id + 1
    assert f"Round {round_id + 1} (open)" in org.text("body")
    rows = org.driver.find_elements(By.CSS_SELECTOR, "#history tr")[1:]
    assert [row.find_element(By.CSS_SELECTOR, "td").text for row in rows] == [*rounds_in_history, str(round_id)]
    history = requests.get(org_url + "/api/status", timeout=30).json()["history"]
    shown = [row.find_element(By.CSS_SELECTOR, "td.accuracy").text for row in rows]
    assert shown == [f"{100 * point['accuracy']:.2f} %" for point in history]
    assert history[-1]["round"] == round_id and history[-1]["accuracy"] > history[0]["accuracy"]
    chart = org.driver.find_element(By.CSS_SELECTOR, "img[alt='test accuracy per round']")
    assert org.driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", chart) > 0

    client.open().shot("next-round")
    assert client.text("#round").startswith(f"round {round_id + 1} (open)")
