"""``msgbroker dashboard`` in a real browser (Debian's Chromium driven by Selenium through
chromedriver) against a real Redis (``scripts/brokers up redis``; ``scripts/brokers browser``
installs the browser — scripts/test runs both). Neither missing is a skip: the test fails
saying what to run.

The page's partition grid matches ``pending_by_partition``; killing a worker (a subprocess)
moves its partitions to the other member on the page; a poisoned message shows in the dead
letters, is replayed from the page and handled; a hostile header value is shown as text;
read-only mode and the cross-site checks refuse mutation; off loopback a token is required.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import msgbroker
import pytest
from msgbroker import Message, partition_for
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver

T = TypeVar("T")
HERE = Path(__file__).resolve().parent
PARTITIONS = 4
CLAIM = 2.0
"""The workers' claim timeout (seconds): how long a killed worker keeps its partitions."""
HOSTILE = '<script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2"><b>bold</b>'


class Job(Message):
    key: str = ""
    poison: bool = False

    @property
    def partition_key(self) -> str:
        return self.key or str(self.message_id)


def redis_url() -> str:
    url = os.environ.get("MSGBROKER_REDIS__URL")
    if not url:
        pytest.fail("MSGBROKER_REDIS__URL is not set: run `scripts/brokers up redis` and "
                    "`set -a; . .brokers/env; set +a` (scripts/test does both)")
    return url


def until(check: Callable[[], T | None], what: str, timeout: float = 15.0) -> T:
    """Poll ``check`` until it returns something truthy, at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = check()
        except Exception as exc:  # the page is being redrawn: an element went stale
            last = exc
        else:
            if last:
                return last  # type: ignore[no-any-return]
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout:g}s for {what}; last: {last!r}")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or driver is None:
        pytest.fail("chromium and chromedriver are not installed: run `scripts/brokers browser` "
                    "(Debian's chromium and chromium-driver; scripts/test does it)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1200", "--no-first-run"):
        options.add_argument(arg)
    browser = webdriver.Chrome(options=options, service=Service(executable_path=driver))
    try:
        yield browser
    finally:
        browser.quit()


class Dashboard:
    """One ``msgbroker dashboard`` process on a free port."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "msgbroker.cli", "dashboard", "--url", redis_url(), "-p", str(PARTITIONS),
             "--port", "0", "--interval", "0.3", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})},
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # the command prints its URL once it listens
        if not line.startswith("dashboard: http://"):
            self.proc.kill()
            raise AssertionError(f"the dashboard did not start: {line!r} {self.proc.communicate()[1]!r}")
        self.url = line.split()[1]

    def close(self) -> None:
        stop(self.proc, signal.SIGTERM)


def stop(proc: subprocess.Popen[str], how: signal.Signals) -> None:
    """Signal ``proc`` and reap it (SIGKILL after 10 s), closing its pipes."""
    if proc.poll() is None:
        proc.send_signal(how)
    try:
        proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()


@pytest.fixture
def tmp(tmp_path: Path) -> Path:
    return tmp_path


def start_worker(topic: str, group: str, tmp: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(HERE / "dashboard_worker.py"), redis_url(), topic, group, str(tmp / "handled"),
         str(tmp / "cure"), str(PARTITIONS), str(CLAIM)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )


def publish(topic: str, jobs: list[tuple[Job, dict[str, str] | None]]) -> list[str]:
    async def go() -> list[str]:
        async with msgbroker.connect(redis_url(), partition_count=PARTITIONS) as broker:
            return [await broker.publish(topic, job, headers=headers) for job, headers in jobs]

    return asyncio.run(go())


def by_partition(topic: str, group: str) -> dict[int, int]:
    async def go() -> dict[int, int]:
        async with msgbroker.connect(redis_url(), partition_count=PARTITIONS) as broker:
            counts = await broker.transport.pending_by_partition(topic, group)
            return {p: counts.get(p, 0) for p in range(PARTITIONS)}

    return asyncio.run(go())


# The page redraws its sections as the dashboard polls: the grid and the member table are read
# in one script each (a snapshot), not element by element (an element found before a redraw is
# stale after it).
_CELLS = """
const [topic, group] = arguments;
const section = [...document.querySelectorAll('section.group')]
  .find(s => s.dataset.topic === topic && s.dataset.group === group);
return section ? [...section.querySelectorAll('.cell')].map(
  c => [c.dataset.partition || '-1', c.dataset.pending || '', c.dataset.owner || '']) : [];
"""
_MEMBERS = """
const [topic, group] = arguments;
const section = [...document.querySelectorAll('section.group')]
  .find(s => s.dataset.topic === topic && s.dataset.group === group);
return section ? [...section.querySelectorAll('tr.member')].map(
  r => [r.dataset.member || '', (r.querySelector('.held') || {}).textContent || '0']) : [];
"""


def cells(browser: WebDriver, topic: str, group: str) -> dict[int, dict[str, str]]:
    found = browser.execute_script(_CELLS, topic, group)
    return {int(partition): {"pending": pending, "owner": owner} for partition, pending, owner in found}


def members(browser: WebDriver, topic: str, group: str) -> dict[str, int]:
    rows = browser.execute_script(_MEMBERS, topic, group)
    return {member: int(held) for member, held in rows}


def keys_for(partition: int, n: int) -> list[str]:
    keys: list[str] = []
    i = 0
    while len(keys) < n:
        key = f"k{i}"
        if partition_for(key, PARTITIONS) == partition:
            keys.append(key)
        i += 1
    return keys


def test_the_grid_shows_pending_count_per_partition(browser: WebDriver) -> None:
    topic, group = f"dash-{uuid.uuid4().hex[:8]}", "grid"
    wanted = {0: 3, 1: 0, 2: 5, 3: 1}
    publish(topic, [(Job(key=key), None) for p, n in wanted.items() for key in keys_for(p, n)])
    assert by_partition(topic, group) == wanted, "the broker's own count differs from what was published"
    dashboard = Dashboard("--watch", f"{topic}:{group}")
    try:
        browser.get(dashboard.url)
        shown = until(lambda: {p: int(c["pending"]) for p, c in cells(browser, topic, group).items()
                               if c["pending"] != ""} == wanted and cells(browser, topic, group),
                      f"the grid to show {wanted}")
        assert shown
        total = browser.find_element(By.CSS_SELECTOR, f'section.group[data-topic="{topic}"] .total-pending').text
        assert total == f"pending {sum(wanted.values())}"
        assert browser.find_element(By.ID, "health").text.startswith("healthy")
        assert browser.find_element(By.ID, "mode").text == "read-only"
    finally:
        dashboard.close()


def test_killing_a_worker_moves_its_partitions_to_the_other(browser: WebDriver, tmp: Path) -> None:
    topic, group = f"dash-{uuid.uuid4().hex[:8]}", "failover"
    workers = [start_worker(topic, group, tmp) for _ in range(2)]
    ids = [(w.stdout.readline().split() or ["", ""])[1] for w in workers if w.stdout is not None]
    dashboard = Dashboard("--watch", f"{topic}:{group}")
    try:
        browser.get(dashboard.url)
        until(lambda: members(browser, topic, group) == {ids[0]: 2, ids[1]: 2},
              f"two members {ids} holding 2 partitions each")
        owners = {c["owner"] for c in cells(browser, topic, group).values()}
        assert owners == set(ids), f"the grid's owners {owners} are not the two workers {ids}"
        workers[0].send_signal(signal.SIGKILL)
        until(lambda: members(browser, topic, group) == {ids[1]: PARTITIONS},
              f"the survivor {ids[1]} to hold every partition after {ids[0]} was killed", timeout=CLAIM * 5 + 10)
        assert {c["owner"] for c in cells(browser, topic, group).values()} == {ids[1]}
    finally:
        dashboard.close()
        for worker in workers:
            stop(worker, signal.SIGKILL)


def test_a_poisoned_message_is_replayed_from_the_page_and_handled(browser: WebDriver, tmp: Path) -> None:
    topic, group = f"dash-{uuid.uuid4().hex[:8]}", "poison"
    worker = start_worker(topic, group, tmp)
    dashboard = Dashboard("--watch", f"{topic}:{group}", "--allow-changes")
    try:
        assert worker.stdout is not None and worker.stdout.readline().startswith("member ")
        [good, bad] = publish(topic, [(Job(key="fine"), None),
                                      (Job(key="bad", poison=True), {"note": HOSTILE})])
        handled = tmp / "handled"
        until(lambda: handled.exists() and good in handled.read_text(), "the good message to be handled")
        browser.get(dashboard.url)

        def open_letter() -> bool:
            # Found and clicked in one try: the page redraws the table while it polls, and a row
            # found before a redraw is stale by the click (seen once in a full test run).
            browser.find_element(By.CSS_SELECTOR, f'tr.letter[data-id="{bad}"]').click()
            return True

        until(open_letter, "the poisoned message in the dead letters, opened")
        headers = until(lambda: browser.find_element(By.ID, "letter-headers").text, "the letter's headers")
        assert json.loads(headers)["note"] == HOSTILE, f"the header is not shown as text: {headers!r}"
        assert "poisoned" in browser.find_element(By.ID, "letter-error").text
        assert not browser.find_elements(By.CSS_SELECTOR, "#letter b, #letter img, #letter script")
        assert browser.execute_script("return window.__pwned === undefined") is True
        (tmp / "cure").write_text("")
        pick = f'tr.letter[data-id="{bad}"] input.pick'

        def tick() -> bool:
            box = browser.find_element(By.CSS_SELECTOR, pick)
            if not box.is_selected():
                box.click()
            return bool(browser.find_element(By.CSS_SELECTOR, pick).is_selected())

        until(tick, "the poisoned letter's box to be ticked")
        # The list is drawn again whenever a poll sees the count change (a CI dry run met it
        # between the tick and the button: the box came back unticked, and no confirmation was
        # asked for); a reload keeps what is ticked.
        before = browser.find_element(By.CSS_SELECTOR, pick)
        browser.find_element(By.ID, "dlq-refresh").click()

        def redrawn() -> bool:
            try:
                before.is_selected()
            except StaleElementReferenceException:
                return True
            return False

        until(redrawn, "the list to be loaded again")
        assert browser.find_element(By.CSS_SELECTOR, pick).is_selected(), "loading the list again unticked the box"
        browser.find_element(By.ID, "replay-selected").click()
        alert = until(lambda: browser.switch_to.alert, "the confirmation of the replay")
        assert "Replay 1 dead letter(s)" in alert.text
        alert.accept()
        until(lambda: "replayed 1 dead letter(s)" in browser.find_element(By.ID, "status").text,
              "the page to report the replay")
        until(lambda: bad in handled.read_text(), "the replayed message to be handled")
        until(lambda: not browser.find_elements(By.CSS_SELECTOR, f'tr.letter[data-id="{bad}"]'),
              "the replayed letter to leave the list")
        # A rate needs every partition's published count in two samples in a row; a sample in which
        # the provider could not tell one (Redis's XINFO GROUPS may answer no lag) shows n/a until
        # the next ones (a CI dry run met it right after the replay): the rate must come.
        until(lambda: browser.find_element(By.CSS_SELECTOR, '.rate[data-kind="published"] .value').text
              .endswith("/s"), "the published rate to be shown")
    finally:
        dashboard.close()
        stop(worker, signal.SIGTERM)


def post(url: str, body: dict[str, Any], headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(url, json.dumps(body).encode(), method="POST", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read())


def test_read_only_and_cross_site_requests_are_refused(browser: WebDriver) -> None:
    topic, group = f"dash-{uuid.uuid4().hex[:8]}", "guarded"
    target = {"topic": topic, "group": group, "all": True}
    read_only = Dashboard("--watch", f"{topic}:{group}")
    changing = Dashboard("--watch", f"{topic}:{group}", "--allow-changes")
    try:
        browser.get(read_only.url)
        until(lambda: browser.find_element(By.ID, "mode").text == "read-only", "the read-only badge")
        assert not browser.find_element(By.ID, "replay-all").is_enabled()
        answer = browser.execute_async_script(
            """const done = arguments[arguments.length - 1];
            fetch('api/state').then((r) => r.json()).then((s) => fetch('api/purge', {method: 'POST',
              headers: {'Content-Type': 'application/json', 'X-Msgbroker-Csrf': s.csrf},
              body: JSON.stringify(arguments[0])})).then(async (r) => done([r.status, await r.json()]));""",
            target)
        assert answer[0] == 403 and "read-only" in answer[1]["error"], answer
        with urllib.request.urlopen(changing.url + "api/state", timeout=10) as response:
            csrf = json.loads(response.read())["csrf"]
        good = {"Content-Type": "application/json", "X-Msgbroker-Csrf": csrf}
        assert post(changing.url + "api/purge", target, good) == (200, {"topic": topic, "group": group, "purged": 0})
        for headers, why in [({"Content-Type": "application/json"}, "header"),
                             ({**good, "Origin": "http://evil.example"}, "cross-origin"),
                             ({**good, "Sec-Fetch-Site": "cross-site"}, "cross-site"),
                             ({**good, "Content-Type": "text/plain"}, "JSON")]:
            status, answer = post(changing.url + "api/purge", target, headers)
            assert status in (403, 415) and why in answer["error"], (headers, status, answer)
        rebound = urllib.request.Request(changing.url + "api/state", headers={"Host": "evil.example"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(rebound, timeout=10)
        refused.value.close()
        assert refused.value.code == 421
    finally:
        read_only.close()
        changing.close()


def test_off_loopback_a_token_is_required(browser: WebDriver) -> None:
    refused = subprocess.run(
        [sys.executable, "-m", "msgbroker.cli", "dashboard", "--url", redis_url(), "--host", "0.0.0.0", "--port", "0"],
        capture_output=True, text=True, timeout=60, env={k: v for k, v in os.environ.items()
                                                          if k != "MSGBROKER_DASHBOARD_TOKEN"},
    )
    assert refused.returncode == 2 and "give --token" in refused.stderr, refused.stderr
    token = uuid.uuid4().hex
    topic, group = f"dash-{uuid.uuid4().hex[:8]}", "tokens"
    guarded = Dashboard("--watch", f"{topic}:{group}", env={"MSGBROKER_DASHBOARD_TOKEN": token})
    try:
        with pytest.raises(urllib.error.HTTPError) as denied:
            urllib.request.urlopen(guarded.url + "api/state", timeout=10)
        denied.value.close()
        assert denied.value.code == 401
        browser.get(guarded.url)
        assert "token is required" in browser.find_element(By.TAG_NAME, "body").text
        browser.get(guarded.url + "?token=" + token)  # sets the HttpOnly cookie the page's requests carry
        until(lambda: browser.find_element(By.ID, "health").text.startswith("healthy"), "the page with its token")
        until(lambda: cells(browser, topic, group), "the group's grid")
    finally:
        guarded.close()
