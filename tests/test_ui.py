"""The job page (/ui/ of `deepe api`) in headless Chromium: sign in, submit, live charts, reload, cancel.

The API runs as a real `deepe api` process, the job on a real worker; Playwright drives
Debian's chromium (a browser download of Playwright's own cannot work here). The charts, the
job list and the layout of finished jobs are in test_ui_charts.py, which uses the fixtures here.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from deepe_tasks import EventKind, Job, JobStatus
from deepe_tasks.core import keys
from deepe_tasks.fixtures.embedded import free_port
from tests.helpers import ROOT, SLOW_METHOD, Worker, wait_for, write_method

pytestmark = pytest.mark.e2e

TOKEN = "ui-test-token"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# What the project's probe found Chromium needs on these machines: no sandbox as root, and no
# background connections (the closed network refuses them, slowly).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
RED = "rgb(192, 54, 44)"  # --bad in app.css: the Cancel button's border while it can cancel
# Every chart the page draws, kept in window.__plots as uPlot builds it, so that the tests read
# what uPlot drew on its canvas: the tick labels, the axis room, the width.
PLOTS_HOOK = """(() => {
  const plots = window.__plots = [];
  let real;
  Object.defineProperty(window, "uPlot", { configurable: true, get: () => real,
    set: (v) => { real = new Proxy(v, { construct: (t, a, n) => { const u = Reflect.construct(t, a, n); plots.push(u); return u; } }); } });
})()"""
# Each chart on the page now: its card's width inside the padding, and each axis's labels; for
# the value axis, the widest label and the room uPlot left it (beyond that it is cut off).
PLOTS = """() => window.__plots.filter((u) => u.root.isConnected).map((u) => {
  const box = u.root.parentElement, style = getComputedStyle(box), y = u.axes[1];
  const ctx = document.createElement("canvas").getContext("2d");
  ctx.font = y.font[0];
  return { metric: box.dataset.metric || box.id, width: u.width,
           inner: box.clientWidth - parseFloat(style.paddingLeft) - parseFloat(style.paddingRight),
           x: u.axes[0]._values.map(String), y: y._values.map(String),
           widest: Math.max(...y._values.map((v) => ctx.measureText(String(v)).width)) / devicePixelRatio,
           room: y._size - y.ticks.size - y.gap };
})"""


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


def sign_in(browser: Any, api_url: str, width: int = 1280, height: int = 900) -> Any:
    """A new browser context (no stored token or method) on the job list, signed in."""
    page = browser.new_page(viewport={"width": width, "height": height})
    page.add_init_script(PLOTS_HOOK)
    page.goto(f"{api_url}/ui/")
    page.fill("#login-token", TOKEN)
    page.click("#login-submit")
    page.wait_for_selector("#jobs-table")
    return page


def plots(page: Any) -> dict[str, dict[str, Any]]:
    return {p["metric"]: p for p in page.evaluate(PLOTS)}


def card(page: Any, label: str) -> Any:
    """The value in the job page's summary card titled ``label``."""
    title = page.locator("b", has_text=re.compile(f"^{label}$"))
    return page.locator(".summary > div", has=title).locator("span").first


def screenshot(page: Any, tmp_path: Path, name: str) -> None:
    """Kept in tmp_path; copied into docs/ with DEEPE_UPDATE_SCREENSHOT=1."""
    page.screenshot(path=str(tmp_path / name), full_page=True)
    if os.environ.get("DEEPE_UPDATE_SCREENSHOT"):
        shutil.copy(tmp_path / name, ROOT / "docs" / name)


def submit_from_form(page: Any, method: str, values: dict[str, Any], queue: str) -> Job:
    """Fill the submit form for ``method`` (the fields it shows) and submit; the job it opens."""
    page.select_option("#method", method)
    page.wait_for_selector(f'#submit-form[data-method="{method}"]')
    for name, value in values.items():
        if page.locator(f"#param-{name}").count():
            page.fill(f"#param-{name}", str(value))
    page.fill("#queue", queue)
    page.click("#submit")
    page.wait_for_url("**/ui/#/jobs/*")
    return Job(page.url.rsplit("/", 1)[1])


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
    page.add_init_script(PLOTS_HOOK)
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

    # Submit from the form: the method's parameters, the queue. A learning rate of 2e-4 over
    # 1,000 steps moves by 2e-7 a step: its chart's labels need five digits to differ.
    page.click('nav a[href="#/submit"]')
    values = {**sft_params, "MAX_STEPS": 1000, "LEARNING_RATE": 2e-4, "PromptInputColumn": "instruction",
              "PromptOutputColumn": "output", "step_sleep": 0.4}
    job = submit_from_form(page, "slowui", values, "ui-q")
    assert job.info()["params"]["MAX_STEPS"] == 1000

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
    # The learning rate's tick labels all differ, and none is wider than the room its axis has
    lr = plots(page)["learning_rate"]
    assert len(lr["y"]) >= 2 and len(set(lr["y"])) == len(lr["y"]), lr["y"]
    assert lr["widest"] <= lr["room"], lr
    screenshot(page, tmp_path, "job-page.png")

    # Cancel from the page, confirmed: the job stops at its next step, and the page shows it
    page.click("#cancel")
    page.click("#confirm-yes")
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


def test_cancel_asks_first_and_cancel_and_save_ends_showing_the_partial_model_it_published(
        api_url: str, browser: Any, workers: list[Worker], tmp_path: Path, store: Path,
        sft_params: dict[str, Any], r: redis.Redis) -> None:
    from deepe_tasks import submit

    write_method(store, "slowui", SLOW_METHOD)
    workers.append(Worker("ui-save", tmp_path / "worker.log").start())
    # Given a job that trains, on its page
    job = submit("slowui", {**sft_params, "MAX_STEPS": 1000, "PromptInputColumn": "instruction",
                            "PromptOutputColumn": "output", "step_sleep": 0.4}, queue="ui-save")
    page = sign_in(browser, api_url)
    page.goto(page.url.split("#")[0] + f"#/jobs/{job.id}")
    wait_for(lambda: points(page) >= 1 or job.status().is_final, timeout=180)
    wait_for(lambda: page.inner_text("#job-state") == "running", timeout=15)
    # When Cancel is pressed, it asks first; "No" leaves the job running, and asks nothing of it
    page.click("#cancel")
    assert page.is_visible("#confirm") and "not saved" in page.inner_text("#confirm-text")
    page.click("#confirm-no")
    assert not page.is_visible("#confirm")
    assert r.get(keys.cancel(job.id)) is None and job.status() is JobStatus.RUNNING
    # "Cancel and save the model", confirmed: the job stops at its next step and saves its model
    page.evaluate("""() => { window.__notices = [];
      new MutationObserver(() => window.__notices.push(document.getElementById("action-result").textContent))
        .observe(document.getElementById("action-result"), { childList: true, characterData: true, subtree: true }); }""")
    page.click("#cancel-save")
    assert "partial model" in page.inner_text("#confirm-text")
    page.click("#confirm-yes")
    assert job.wait(timeout=120) is JobStatus.CANCELLED
    page.wait_for_selector("#job-state:has-text('cancelled')", timeout=30_000)
    # Then the page said it was asked, and says so no more; the output card shows the partial model
    assert "Asked: it stops at its next step and saves its model." in page.evaluate("window.__notices")
    assert page.inner_text("#action-result") == ""
    output_dir = job.info()["output_dir"]
    assert any(Path(output_dir).glob("*.safetensors")), output_dir
    assert card(page, "output").inner_text() == f"{output_dir} (partial model)"
    # and the buttons that can do nothing more look it: grey, not red
    for button in ("#cancel", "#cancel-save"):
        assert page.locator(button).is_disabled()
        colours = page.eval_on_selector(button, "b => [getComputedStyle(b).borderColor, getComputedStyle(b).color]")
        assert RED not in colours, (button, colours)
    screenshot(page, tmp_path, "job-page-cancelled.png")
    page.close()


def test_the_submit_form_opens_on_sft_demo_then_on_the_method_last_submitted(
        api_url: str, browser: Any, store: Path, sft_params: dict[str, Any]) -> None:
    write_method(store, "slowui", SLOW_METHOD)
    # Given a browser that never submitted a job, and methods of which sft-demo is not the first
    page = sign_in(browser, api_url)
    page.click('nav a[href="#/submit"]')
    page.wait_for_selector("#param-MODEL_PATH")
    names = page.eval_on_selector_all("#method option", "options => options.map((o) => o.value)")
    assert names[0] != "sft-demo" and "slowui" in names
    # Then the form opens on sft-demo
    assert page.input_value("#method") == "sft-demo"
    assert page.get_attribute("#submit-form", "data-method") == "sft-demo"
    # When a job of another method is submitted from it (to a queue no worker takes: it waits)
    job = submit_from_form(page, "slowui", {**sft_params, "PromptInputColumn": "instruction",
                                            "PromptOutputColumn": "output"}, "ui-idle")
    try:
        # Then the form opens on that method: next time, and after a reload
        for again in (lambda: page.click('nav a[href="#/submit"]'), page.reload):
            again()
            page.wait_for_selector("#param-MODEL_PATH")
            assert page.input_value("#method") == "slowui"
            assert page.get_attribute("#submit-form", "data-method") == "slowui"
    finally:
        assert job.cancel() is JobStatus.CANCELLED
    page.close()


def test_the_page_needs_no_token_to_load_but_the_api_refuses_without_one(api_url: str) -> None:
    page = httpx.get(f"{api_url}/ui/", timeout=10)
    assert page.status_code == 200 and "deepe" in page.text and "uPlot" in page.text or "uplot" in page.text
    assert httpx.get(f"{api_url}/ui/vendor/uplot/LICENSE", timeout=10).status_code == 200
    assert httpx.get(f"{api_url}/jobs", timeout=10).status_code == 401
    assert httpx.get(f"{api_url}/queues", timeout=10).status_code == 401
    assert httpx.get(f"{api_url}/queues", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10).status_code == 200


