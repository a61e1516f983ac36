"""The screenshots of docs/dashboard.md, taken on a running demo: three worker processes of the
seat-lock demo's group on Redis (16 partitions, a few hot keys, slow handling, some failures and
poisoned requests), a publisher, ``msgbroker dashboard --allow-changes``, and Debian's headless
chromium driven by Selenium. Needs ``scripts/brokers up redis`` and ``scripts/brokers browser``:

    set -a; . .brokers/env; set +a; .venv/bin/python scripts/dashboard_screenshots.py docs/dashboard

Keys live under their own prefix (``dashboard-demo``), deleted first; nothing else is touched.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import msgbroker
from msgbroker import Message, MessageContext

PREFIX = "dashboard-demo"
TOPIC, GROUP = "seat-lock-requests", "seat-lock-workers"
PARTITIONS = 16


class SeatLock(Message):
    session: str
    seats: list[str] = []  # noqa: RUF012 - a pydantic field default, copied per instance
    poison: bool = False

    @property
    def partition_key(self) -> str:
        return self.session


def connect() -> msgbroker.Broker:
    url = os.environ.get("MSGBROKER_REDIS__URL", "redis://127.0.0.1:6379")
    return msgbroker.connect(url, partition_count=PARTITIONS,
                             redis={"key_prefix": PREFIX, "claim_timeout": 3}, max_retry_attempts=3)


async def worker() -> None:
    async with connect() as broker:
        async def handle(ctx: MessageContext[SeatLock]) -> None:
            if ctx.message.poison:
                await ctx.nak(requeue=False, error=f"seat {ctx.message.seats[0]} does not exist in this area")
                return
            await asyncio.sleep(random.uniform(0.05, 0.4))
            if random.random() < 0.03:
                raise RuntimeError("seat map service timed out")

        await broker.subscribe(TOPIC, GROUP, handle, message_type=SeatLock)
        await asyncio.Event().wait()


async def publish(seconds: float) -> None:
    sessions = [f"{uuid.uuid4().hex[:8]}:area-{i % 5}" for i in range(40)]
    hot = sessions[:3]
    async with connect() as broker:
        end = time.monotonic() + seconds
        n = 0
        while time.monotonic() < end:
            session = random.choice(hot) if random.random() < 0.45 else random.choice(sessions)
            poison = n % 37 == 36
            headers = {"origin": "api-3", "note": "<script>alert('hi')</script>"} if poison else {"origin": "api-1"}
            await broker.publish(TOPIC, SeatLock(session=session, seats=[f"R{n % 20}-{n % 30}"], poison=poison),
                                 headers=headers)
            n += 1
            await asyncio.sleep(0.04)


async def clean() -> None:
    async with connect() as broker:
        redis = broker.transport.redis  # type: ignore[attr-defined]
        async for key in redis.scan_iter(match=f"{PREFIX}:*"):
            await redis.delete(key)


def main(out: Path) -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    asyncio.run(clean())
    out.mkdir(parents=True, exist_ok=True)
    me = [sys.executable, __file__]
    workers = [subprocess.Popen([*me, "--worker"]) for _ in range(3)]
    env = {**os.environ, "MSGBROKER_REDIS__KEY_PREFIX": PREFIX}
    url = os.environ.get("MSGBROKER_REDIS__URL", "redis://127.0.0.1:6379")
    dashboard = subprocess.Popen([sys.executable, "-m", "msgbroker.cli", "dashboard", "-u", url, "-p", str(PARTITIONS),
                                  "--port", "0", "--allow-changes", "-w", f"{TOPIC}:{GROUP}"],
                                 stdout=subprocess.PIPE, text=True, env=env)
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,1300",
                "--hide-scrollbars", "--force-device-scale-factor=1"):
        options.add_argument(arg)
    browser = webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver") or "chromedriver"))
    try:
        assert dashboard.stdout is not None
        page = dashboard.stdout.readline().split()[1]
        publisher = subprocess.Popen([*me, "--publish", "30"])
        browser.get(page)
        time.sleep(12)
        os.kill(workers[2].pid, signal.SIGKILL)  # a worker dies: its partitions move after the claim timeout
        time.sleep(7)
        browser.save_screenshot(str(out / "overview.png"))
        time.sleep(3)
        rows = browser.find_elements(By.CSS_SELECTOR, "tr.letter")
        if rows:
            rows[0].click()
        time.sleep(0.5)
        browser.execute_script("document.getElementById('dlq').scrollIntoView()")
        browser.find_element(By.ID, "dlq").screenshot(str(out / "dead-letters.png"))
        publisher.wait(60)
    finally:
        browser.quit()
        procs: list[subprocess.Popen[str] | subprocess.Popen[bytes]] = [*workers, dashboard]
        for proc in procs:
            proc.terminate()
            proc.wait(20)
        asyncio.run(clean())


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        asyncio.run(worker())
    elif sys.argv[1:2] == ["--publish"]:
        asyncio.run(publish(float(sys.argv[2])))
    else:
        main(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/dashboard"))
