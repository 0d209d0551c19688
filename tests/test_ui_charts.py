"""The job page on finished jobs, in headless Chromium: the job list's loss, the charts (ticks,
labels, widths, the value under the cursor), long paths, a merge job, a 400 px wide screen, and
jobs compared. The fixtures (a real `deepe api`, Debian's chromium) are test_ui.py's."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from deepe_tasks import Event, EventKind, Job, JobStatus
from tests import test_ui
from tests.helpers import Worker, wait_for
from tests.test_ui import card, plots, screenshot, sign_in

pytestmark = pytest.mark.e2e
# test_ui's fixtures, bound here: this module gets an API server of its own, and the same browser setup
api_url, browser = test_ui.api_url, test_ui.browser

STEPS = 20  # enough that uPlot's own ticks fall at 2.5, 7.5, ...


@pytest.fixture(scope="module")
def trained(worker: Worker, tiny_model: Path, colors_data: Path) -> Job:
    """A finished sft-demo job of 20 steps, evaluated on a held-out quarter of its data every 5."""
    from deepe_tasks import submit

    job = submit("sft-demo", {"MODEL_PATH": str(tiny_model), "DATASET_PATH": str(colors_data), "MAX_STEPS": STEPS,
                              "BATCH_SIZE": 4, "MAX_SEQ_LENGTH": 64, "LORA_RANK": 4, "LEARNING_RATE": 5e-3,
                              "EVAL_SPLIT": 0.25, "EVAL_STEPS": 5})
    assert job.wait(timeout=300) is JobStatus.SUCCEEDED, job.info()
    return job


def step_logs(job: Job) -> list[Event]:
    return [e for e in job.events() if e.kind is EventKind.LOG and "loss" in e.metrics and e.step is not None]


def open_job(page: Any, job: Job) -> None:
    page.goto(page.url.split("#")[0] + f"#/jobs/{job.id}")
    page.wait_for_selector("#job-phase:has-text('succeeded')")  # its whole stream was read


def cards(page: Any) -> list[str]:
    """The titles of the job page's summary cards; the summary holds nothing but cards."""
    assert page.evaluate("() => [...document.querySelector('.summary').childNodes].every((n) => n.nodeType === 1)")
    return list(page.locator(".summary > div > b").all_inner_texts())


def readout(page: Any, metric: str) -> tuple[int, dict[str, float]]:
    """The step and the values the chart's title shows: `step 12 · loss 4.71 · eval loss 4.8`."""
    text = page.inner_text(f'[data-metric="{metric}"] h3 [data-readout]')
    head, *parts = text.split(" · ")
    values = {name: float(v) for name, v in (p.rsplit(" ", 1) for p in parts)}
    return int(head.removeprefix("step ")), values


def test_the_job_list_shows_the_loss_of_the_last_step_labelled_as_such(
        api_url: str, browser: Any, trained: Job) -> None:
    # Given a finished job whose run average (train_loss) differs from its last step's loss
    last = step_logs(trained)[-1]
    train_loss = trained.info()["metrics"]["train_loss"]
    assert f"{train_loss:.4f}" != f"{last.metrics['loss']:.4f}"
    # When the job list shows it
    page = sign_in(browser, api_url)
    row = page.locator(f'[data-job="{trained.id}"]')
    row.wait_for()
    # Then its loss column shows the last step's loss, and says so
    assert row.locator("td").nth(5).inner_text() == f"{last.metrics['loss']:.4f}"
    assert page.locator("#jobs-table thead th").nth(5).inner_text().lower() == "last loss"
    assert row.locator("td").nth(5).get_attribute("title") == f"the loss at step {last.step}"
    # and the job's page the same, with its step, among its cards (and nothing else)
    open_job(page, trained)
    assert card(page, "last loss").inner_text() == f"{last.metrics['loss']:.4f} (step {last.step})"
    assert cards(page) == ["state", "method", "phase", "progress", "ETA", "last loss", "eval loss", "devices",
                           "attempts", "worker", "output", "MLflow"]
    page.close()


def test_the_charts_count_whole_steps_fill_their_cards_and_read_the_value_under_the_cursor(
        api_url: str, browser: Any, trained: Job) -> None:
    logs = {e.step: e.metrics["loss"] for e in step_logs(trained)}
    evals = {e.step: e.metrics["eval_loss"] for e in trained.events() if e.kind is EventKind.EVAL}
    page = sign_in(browser, api_url)
    open_job(page, trained)
    # The loss chart holds the eval loss beside the training loss, and the summary the last one
    chart = page.locator('[data-metric="loss"]')
    wait_for(lambda: chart.get_attribute("data-points2") == str(len(evals)), timeout=30)
    assert len(evals) == STEPS // 5 and chart.get_attribute("data-points") == str(STEPS)
    shown = page.inner_text("#job-eval")
    assert shown.endswith(f"(step {STEPS})") and float(shown.split()[0]) == pytest.approx(evals[STEPS], rel=1e-3)
    drawn = plots(page)
    assert set(drawn) == {"loss", "learning_rate", "grad_norm"}
    for metric, p in drawn.items():
        # Steps are whole numbers; the value labels differ and fit; the chart fills its card
        assert all(re.fullmatch(r"\d+", v) for v in p["x"] if v), (metric, p["x"])
        assert len(set(p["y"])) == len(p["y"]) and p["widest"] <= p["room"], (metric, p)
        assert p["inner"] - 2 <= p["width"] <= p["inner"], (metric, p)
        assert "--" not in page.inner_text(f'[data-metric="{metric}"]')  # no legend waiting for a hover
    # Away from the chart, its title reads the last step's values
    step, values = readout(page, "loss")
    assert step == STEPS and values == pytest.approx({"loss": logs[STEPS], "eval loss": evals[STEPS]}, rel=1e-3)
    # Under the cursor, the values of the step under it, and back to the last step as it leaves
    box = page.locator('[data-metric="loss"] .u-over').bounding_box()
    seen = []
    for share in (0.3, 0.7):
        page.mouse.move(box["x"] + box["width"] * share, box["y"] + box["height"] / 2)
        step, values = readout(page, "loss")
        assert values["loss"] == pytest.approx(logs[step], rel=1e-3)
        seen.append(step)
    assert 1 < seen[0] < seen[1] < STEPS, seen
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] + 120)
    wait_for(lambda: readout(page, "loss")[0] == STEPS, timeout=5)
    page.close()


def test_a_long_output_path_wraps_inside_its_card(api_url: str, browser: Any, trained: Job) -> None:
    page = sign_in(browser, api_url)
    open_job(page, trained)
    output = trained.info()["output_dir"]
    shown = card(page, "output")
    assert shown.inner_text() == output and len(output) > 40
    widths = shown.evaluate("s => [s.parentElement.scrollWidth, s.parentElement.clientWidth]")
    assert widths[0] <= widths[1], widths
    page.close()


def test_a_merge_says_which_job_it_merged_and_shows_no_empty_metrics(
        api_url: str, browser: Any, trained: Job) -> None:
    from deepe_tasks import merge

    # Given a merge of the trained job, done
    merged = merge(trained.id)
    assert merged.wait(timeout=300) is JobStatus.SUCCEEDED, merged.info()
    # When its page is open
    page = sign_in(browser, api_url)
    open_job(page, merged)
    # Then it has no Metrics heading over nothing, and names the job it merged, with a link
    assert page.locator("#charts > *").count() == 0
    assert "Metrics" not in [h.inner_text() for h in page.locator("h2").all() if h.is_visible()]
    link = card(page, "merged from").locator("a")
    assert link.inner_text() == trained.id[:12] and link.get_attribute("href") == f"#/jobs/{trained.id}"
    assert card(page, "output").inner_text() == merged.info()["output_dir"]
    assert cards(page) == ["state", "method", "merged from", "phase", "devices", "attempts", "worker", "output",
                           "MLflow"]
    assert not page.is_visible("#cancel-save")  # a merge has no partial model to save
    # The link leads to the merged job's own page
    link.click()
    page.wait_for_selector('[data-metric="loss"]')
    assert page.url.endswith(f"#/jobs/{trained.id}")
    page.close()


def test_at_400_px_wide_no_page_scrolls_sideways(
        api_url: str, browser: Any, trained: Job, tmp_path: Path) -> None:
    page = sign_in(browser, api_url, width=400, height=800)
    wide = "() => document.documentElement.scrollWidth - document.documentElement.clientWidth"
    page.wait_for_selector(f'[data-job="{trained.id}"]')
    assert page.evaluate(wide) == 0, "the job list"
    open_job(page, trained)
    page.wait_for_selector('[data-metric="grad_norm"]')
    assert page.evaluate(wide) == 0, "the job page"
    for metric, p in plots(page).items():
        assert p["inner"] - 2 <= p["width"] <= p["inner"], (metric, p)
    screenshot(page, tmp_path, "job-page-narrow.png")
    page.click('nav a[href="#/submit"]')
    page.wait_for_selector("#submit-form[data-method]")
    assert page.evaluate(wide) == 0, "the submit form"
    page.click('nav a[href="#/queues"]')
    page.wait_for_selector("#workers-table tbody tr")
    assert page.evaluate(wide) == 0, "the queues"
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
    page = sign_in(browser, api_url, height=1000)
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
    screenshot(page, tmp_path, "compare.png")
    # On a narrow screen the chart fits its card, and the page does not scroll sideways
    page.set_viewport_size({"width": 400, "height": 1000})
    wait_for(lambda: plots(page)["compare-chart"]["width"] <= plots(page)["compare-chart"]["inner"], timeout=5)
    assert page.evaluate("() => document.documentElement.scrollWidth - document.documentElement.clientWidth") == 0
    page.close()

