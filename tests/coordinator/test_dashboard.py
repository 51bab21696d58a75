"""The dashboard in headless Chromium during a small demo run (Debian chromium + chromedriver).

Screenshots are saved under ``.artifacts/dashboard/`` (or ``$CROWDFL_ARTIFACTS``) for a person to look at.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from crowdfl_sim.demo import DemoOptions, DemoResult, run_demo
from tests.support.realparts import require_real_part

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
ARTIFACTS = Path(os.environ.get("CROWDFL_ARTIFACTS", Path(__file__).resolve().parents[2] / ".artifacts")) / "dashboard"


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[object]:
    have = os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        have = False
    require_real_part("chromium", have, "needs Debian chromium + chromium-driver and the selenium package (make test installs them)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1400,1100", f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(options=opts, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def eth_text(wei: int) -> str:
    """What the page must show: whole ETH and six decimals, cut (never rounded up), zeros trimmed."""
    whole, frac = divmod(wei, 10**18)
    decimals = f"{frac:018d}"[:6].rstrip("0")
    text = f"{whole}.{decimals}" if decimals else str(whole)
    return "<0.000001" if text == "0" and wei > 0 else text


def _get(url: str) -> object:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


@pytest.mark.realpart
@pytest.mark.slow
def test_dashboard_during_a_demo(browser, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = browser
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    hold = threading.Event()
    ready = threading.Event()
    urls: list[str] = []
    results: list[DemoResult] = []
    errors: list[BaseException] = []

    def on_dashboard(url: str) -> None:
        urls.append(url)
        ready.set()

    def run() -> None:
        try:
            results.append(run_demo(DemoOptions(
                agents=4, edges=2, rounds=3, samples_per_round=8, history_days=28, seed=5,  # 25 or 26 windows every 25 h
                workdir=tmp_path / "demo", hold=hold, on_dashboard=on_dashboard,
            ), open(os.devnull, "w")))
        except BaseException as exc:  # surfaced in the test thread
            errors.append(exc)
            ready.set()

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    try:
        assert ready.wait(300), "the demo never brought the dashboard up"
        assert not errors, errors
        base = urls[0]
        api = base.removesuffix("/dashboard/")
        driver.get(base)
        # the page re-renders its tables on every poll: an element read mid-render is stale, so retry
        wait = WebDriverWait(driver, 240, poll_frequency=0.5, ignored_exceptions=(StaleElementReferenceException,))
        # live: the accuracy plot gains a point per round while the task runs
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#accuracy-chart circle.point")) >= 1)
        driver.save_screenshot(str(ARTIFACTS / "manufacturer-running.png"))
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#accuracy-chart circle.point")) == 3)
        # the demo now holds (it returns only when `hold` is set): read the truth from the API
        task_id = _get(f"{api}/api/v1/tasks")[0]["task_id"]  # type: ignore[index]
        wait.until(lambda d: all(r["status"] == "anchored" for r in _get(f"{api}/api/v1/tasks/{task_id}/rounds")))  # type: ignore[index,union-attr]
        wait.until(lambda d: all("anchored" in r.text for r in d.find_elements(By.CSS_SELECTOR, "#rounds-table tbody tr")))
        rounds = _get(f"{api}/api/v1/tasks/{task_id}/rounds")
        assert len(driver.find_elements(By.CSS_SELECTOR, "#rounds-table tbody tr")) == 3
        points = driver.find_elements(By.CSS_SELECTOR, "#accuracy-chart circle.point")
        plotted = sorted(float(p.get_attribute("data-y")) for p in points)
        assert plotted == pytest.approx(sorted(r["accuracy"] for r in rounds), abs=1e-9)  # type: ignore[index,union-attr]
        driver.save_screenshot(str(ARTIFACTS / "manufacturer-done.png"))

        # rewards read in ETH, the exact wei on hover, and both agree with the API
        rewards = {c["customer"][:12]: int(c["reward_wei"]) for c in _get(f"{api}/api/v1/tasks/{task_id}/rewards")["customers"]}  # type: ignore[index]
        expected = sorted((k, f"{eth_text(w)} ETH", f"{w} wei") for k, w in rewards.items())

        def shown(d):  # type: ignore[no-untyped-def]
            return sorted(
                (row.find_element(By.CSS_SELECTOR, "td.hash").text.rstrip("…"), row.find_element(By.CSS_SELECTOR, "span.eth").text,
                 row.find_element(By.CSS_SELECTOR, "span.eth").get_attribute("title"))
                for row in d.find_elements(By.CSS_SELECTOR, "#rewards-table tbody tr")
            )

        try:
            wait.until(lambda d: shown(d) == expected)
        except TimeoutException:
            assert shown(driver) == expected

        # verify action: succeeds on the real store
        driver.find_element(By.ID, "verify-button").click()
        wait.until(lambda d: "verifying" not in d.find_element(By.ID, "verify-result").text)
        assert "ok" in driver.find_element(By.ID, "verify-result").get_attribute("class")
        driver.save_screenshot(str(ARTIFACTS / "manufacturer-verified.png"))

        # customer view: a device's contributions and its Merkle proof, checked in the browser
        device = sorted(_get(f"{api}/api/v1/tasks/{task_id}/rounds/1/updates"), key=lambda u: u["customer"])[0]["customer"]  # type: ignore[arg-type,index]
        driver.get(f"{api}/dashboard/customer?device={device}")
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#contributions-table tbody tr")) == 3)
        # 8 fresh samples a round, each released once: 24, not the 8 + 16 + 24 the edge trained on;
        # the default task's windows do not overlap: each hour carries epsilon 4 once, a day at most two windows
        row = driver.find_element(By.CSS_SELECTOR, "#budget-table tbody tr")
        assert [c.text for c in row.find_elements(By.CSS_SELECTOR, "td")][1:] == ["24", "4.00 (labels in clear)", "24 h, every 25 h", "4.00", "8.00"]
        assert "any one hour of your household's usage carries at most epsilon 4.00, any one day at most 8.00" in driver.find_element(By.ID, "budget-summary").text
        assert driver.find_element(By.CSS_SELECTOR, "#summary span.eth").get_attribute("title").endswith(" wei")
        for button in driver.find_elements(By.CSS_SELECTOR, "button.proof-button"):
            button.click()
        wait.until(lambda d: all(c.text.startswith(("yes", "NO", "cannot")) for c in d.find_elements(By.CSS_SELECTOR, "td.proof-result")))
        verdicts = [c.text for c in driver.find_elements(By.CSS_SELECTOR, "td.proof-result")]
        assert all(v.startswith("yes") and "read from http://127.0.0.1:" in v for v in verdicts), verdicts  # the chain's root, via RPC
        for button in driver.find_elements(By.CSS_SELECTOR, "button.claim-button"):
            button.click()
        wait.until(lambda d: all(c.text.endswith(")") or c.text.startswith(("NO", "cannot")) for c in d.find_elements(By.CSS_SELECTOR, "td.claim-result")))
        claims = [c.text for c in driver.find_elements(By.CSS_SELECTOR, "td.claim-result")]
        assert all("wei claimable (settled root" in v for v in claims), claims
        driver.save_screenshot(str(ARTIFACTS / "customer.png"))

        # tamper with one stored update of the last round: the verify action must now report failure
        store = tmp_path / "demo" / "store"
        last = _get(f"{api}/api/v1/tasks/{task_id}/rounds/3/updates")[0]["update_hash"]  # type: ignore[index]
        victim = store / last[:2] / last[2:]
        data = bytearray(victim.read_bytes())
        data[len(data) // 2] ^= 0x01
        victim.write_bytes(bytes(data))
        driver.get(base)
        wait.until(lambda d: d.find_element(By.ID, "verify-hash").get_attribute("value"))
        driver.find_element(By.ID, "verify-button").click()
        wait.until(lambda d: "verifying" not in d.find_element(By.ID, "verify-result").text and d.find_element(By.ID, "verify-result").text != "not run")
        result = driver.find_element(By.ID, "verify-result")
        assert "bad" in result.get_attribute("class"), result.text
        assert "FAILED" in result.text
        driver.save_screenshot(str(ARTIFACTS / "manufacturer-tampered.png"))
    except BaseException:
        driver.save_screenshot(str(ARTIFACTS / "failure.png"))
        (ARTIFACTS / "failure.txt").write_text(driver.find_element(By.TAG_NAME, "body").text)
        raise
    finally:
        hold.set()
        worker.join(timeout=60)
    assert not worker.is_alive()
    assert not errors, errors
    # the demo's own closing audit ran before the tampering
    assert results and results[0].audit_ok
