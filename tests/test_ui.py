"""The job page (/ui/ of `deepe api`) in headless Chromium: sign in, submit, live charts, reload, cancel.

The API runs as a real `deepe api` process, the job on a real worker; Playwright drives
Debian's chromium (a browser download of Playwright's own cannot work here).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from deepe_tasks import EventKind, Job, JobStatus
from deepe_tasks.fixtures.embedded import free_port
from tests.helpers import ROOT, SLOW_METHOD, Worker, wait_for, write_method

pytestmark = pytest.mark.e2e

TOKEN = "ui-test-token"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# What the project's probe found Chromium needs on these machines: no sandbox as root, and no
# background connections (the closed network refuses them, slowly).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
SCREENSHOT = ROOT / "docs" / "job-page.png"


@pytest.fixture(scope="module")
def api_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `deepe api` server on a free port, with one token."""
    port = free_port()
    log = tmp_path_factory.mktemp("api") / "api.log"
    env = {**os.environ, "DEEPE_API_TOKENS": TOKEN}
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "deepe_tasks", "api", "--port", str(port)], env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _up(url), timeout=60, interval=0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        # No token ever reaches the server's log: it travels in a header, never in a URL.
        assert TOKEN not in log.read_text()


def _up(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=2).status_code in (200, 503)
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if CHROMIUM is None:
        pytest.skip("Debian's chromium is not installed (scripts/test.sh installs it as root: apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


def log_steps(job: Job) -> list[int]:
    return [e.step or 0 for e in job.events() if e.kind is EventKind.LOG and "loss" in e.metrics]


def points(page: Any) -> int:
    box = page.locator('[data-metric="loss"]')
    return int(box.get_attribute("data-points") or 0) if box.count() else 0


def test_the_job_page_signs_in_submits_charts_live_survives_a_reload_and_cancels(
        api_url: str, browser: Any, workers: list[Worker], tmp_path: Path, store: Path,
        sft_params: dict[str, Any]) -> None:
    write_method(store, "slowui", SLOW_METHOD)
    workers.append(Worker("ui-q", tmp_path / "worker.log").start())
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(f"{api_url}/ui/")

    # A wrong token is refused, with a sentence; the right one opens the job list
    page.fill("#login-token", "not-the-token")
    page.click("#login-submit")
    page.wait_for_selector("#login-error:has-text('not one of DEEPE_API_TOKENS')")
    assert page.is_visible("#login-form") and not page.is_visible("#jobs-table")
    page.fill("#login-token", TOKEN)
    page.click("#login-submit")
    page.wait_for_selector("#jobs-table")
    assert not page.is_visible("#login-form")

    # Submit from the form: the method's parameters, the queue
    page.click("text=Submit")
    page.select_option("#method", "slowui")
    page.wait_for_selector("#param-MODEL_PATH")
    values = {**sft_params, "MAX_STEPS": 200, "PromptInputColumn": "instruction", "PromptOutputColumn": "output",
              "step_sleep": 0.4}
    for name, value in values.items():
        if page.locator(f"#param-{name}").count():
            page.fill(f"#param-{name}", str(value))
    page.fill("#queue", "ui-q")
    page.click("#submit")
    page.wait_for_url("**/ui/#/jobs/*")
    job = Job(page.url.rsplit("/", 1)[1])
    assert job.info()["params"]["MAX_STEPS"] == 200

    # The loss chart grows as the job trains
    wait_for(lambda: points(page) >= 3 or job.status().is_final, timeout=180)
    assert points(page) >= 3, (job.info()["status"], job.info()["error"], page.inner_text("#view")[:800])
    first = points(page)
    wait_for(lambda: points(page) >= first + 3, timeout=60)
    assert page.locator('[data-metric="learning_rate"]').count() == 1
    assert page.locator('[data-metric="grad_norm"]').count() == 1
    # (the record is polled every 3 s: the page may have read it just before the claim)
    wait_for(lambda: page.locator("#job-state").inner_text() == "running", timeout=15)

    # A reload mid-job replays the whole curve: every step logged so far, from step 1
    before = points(page)
    page.reload()
    wait_for(lambda: points(page) >= before, timeout=30)
    assert not page.is_visible("#login-form")  # the token is kept for the tab's session
    assert page.locator('[data-metric="loss"]').get_attribute("data-points") is not None
    logged = log_steps(job)
    assert logged[0] == 1 and points(page) >= before
    page.screenshot(path=str(tmp_path / "job-page.png"), full_page=True)
    if os.environ.get("DEEPE_UPDATE_SCREENSHOT"):
        shutil.copy(tmp_path / "job-page.png", SCREENSHOT)

    # Cancel from the page: the job stops at its next step, and the page shows it
    page.click("#cancel")
    assert job.wait(timeout=60) is JobStatus.CANCELLED
    page.wait_for_selector("#job-state:has-text('cancelled')", timeout=30_000)
    assert page.locator("#cancel").is_disabled()

    # The queues page: the queue and the worker online
    page.click("text=Queues")
    page.wait_for_selector('[data-queue="ui-q"]')
    page.wait_for_selector(f'[data-worker="{workers[0].hostname}"]')

    # The job list shows it, filtered by state
    page.click("text=Jobs")
    page.select_option("#state-filter", "cancelled")
    page.wait_for_selector(f'[data-job="{job.id}"]')
    page.close()


def test_the_page_needs_no_token_to_load_but_the_api_refuses_without_one(api_url: str) -> None:
    page = httpx.get(f"{api_url}/ui/", timeout=10)
    assert page.status_code == 200 and "deepe" in page.text and "uPlot" in page.text or "uplot" in page.text
    assert httpx.get(f"{api_url}/ui/vendor/uplot/LICENSE", timeout=10).status_code == 200
    assert httpx.get(f"{api_url}/jobs", timeout=10).status_code == 401
    assert httpx.get(f"{api_url}/queues", timeout=10).status_code == 401
    assert httpx.get(f"{api_url}/queues", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10).status_code == 200


def test_the_job_page_draws_the_eval_loss_on_the_loss_chart(
        api_url: str, browser: Any, worker: Worker, sft_params: dict[str, Any]) -> None:
    from deepe_tasks import submit

    # Given a job that is evaluated on a held-out quarter of its data every 2 steps
    job = submit("sft-demo", {**sft_params, "MAX_STEPS": 6, "EVAL_SPLIT": 0.25, "EVAL_STEPS": 2,
                              "PromptInputColumn": "instruction", "PromptOutputColumn": "output"})
    assert job.wait(timeout=180) is JobStatus.SUCCEEDED, job.info()
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(f"{api_url}/ui/")
    page.fill("#login-token", TOKEN)
    page.click("#login-submit")
    page.wait_for_selector("#jobs-table")
    # When its page is opened
    page.goto(f"{api_url}/ui/#/jobs/{job.id}")
    # Then the loss chart holds the eval loss beside the training loss, and the summary the last one
    chart = page.locator('[data-metric="loss"]')
    wait_for(lambda: chart.count() == 1 and chart.get_attribute("data-points2") == "3", timeout=30)
    assert int(chart.get_attribute("data-points") or 0) == 6
    last = [e for e in job.events() if e.kind is EventKind.EVAL][-1]
    shown = page.locator("#job-eval").inner_text()
    assert shown.endswith("(step 6)") and float(shown.split()[0]) == pytest.approx(last.metrics["eval_loss"], rel=1e-3)
    page.close()


def test_ticked_jobs_open_a_comparison_with_overlaid_curves_a_table_and_samples_side_by_side(
        api_url: str, browser: Any, worker: Worker, sft_params: dict[str, Any], colors_data: Path,
        tmp_path: Path) -> None:
    from deepe_tasks import evaluate, submit

    # Given two finished jobs, one validated during training, both evaluated on the same dataset
    base = {**sft_params, "MAX_STEPS": 6, "PromptInputColumn": "instruction", "PromptOutputColumn": "output"}
    jobs = [submit("sft-demo", {**base, "LEARNING_RATE": 2e-2, "EVAL_SPLIT": 0.25, "EVAL_STEPS": 2}),
            submit("sft-demo", {**base, "LEARNING_RATE": 1e-3})]
    for job in jobs:
        assert job.wait(timeout=180) is JobStatus.SUCCEEDED, job.info()
        assert evaluate(job.id, str(colors_data), max_samples=3, samples=3).wait(timeout=180) is JobStatus.SUCCEEDED
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.goto(f"{api_url}/ui/")
    page.fill("#login-token", TOKEN)
    page.click("#login-submit")
    # When both are ticked in the list and compared
    for job in jobs:
        page.wait_for_selector(f'[data-pick="{job.id}"]')
        page.check(f'[data-pick="{job.id}"]')
    page.click("#compare")
    page.wait_for_selector("#compare-table")
    # Then the table has both, the chart overlays both train curves and the eval curve, and the
    # evaluation samples stand side by side (the same prompt, each model's answer)
    assert page.locator("#compare-table tbody tr").count() == 2
    assert "LEARNING_RATE" in page.inner_text("#compare-table thead")
    assert page.locator("#compare-chart").get_attribute("data-series") == "3"
    assert page.locator("#compare-chart canvas").count() >= 1
    samples = page.locator("table.samples tbody tr.sample")
    assert samples.count() == 3
    assert samples.nth(0).locator("td.generated").count() == 2
    assert "What colour is the sky?" in samples.nth(0).inner_text()
    page.screenshot(path=str(tmp_path / "compare.png"), full_page=True)
    if os.environ.get("DEEPE_UPDATE_SCREENSHOT"):
        shutil.copy(tmp_path / "compare.png", ROOT / "docs" / "compare.png")
    page.close()
