"""Schema fuzzing: schemathesis drives every route from the OpenAPI document; no 5xx, ever.

Routes run in-process (ASGI) against the session's Redis; no worker is needed.
"""

from __future__ import annotations

from typing import Any

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis import Case  # noqa: E402

from deepe_tasks.ui.api import create_app  # noqa: E402

TOKEN = "fuzz-token"
app = create_app([TOKEN])
schema = schemathesis.openapi.from_asgi("/openapi.json", app)


# Routes without any input ask Celery's workers (a ping, active_queues: 0.5-1 s each): one
# call says all that fuzzing them could, and is made below.
NO_INPUT = ["/healthz", "/queues"]


@schema.exclude(path=NO_INPUT).parametrize()
def test_no_route_answers_with_a_server_error(case: Case[Any]) -> None:
    if case.path == "/jobs/{job_id}/events":
        case.query = {**(case.query or {}), "follow": "false"}  # a live follow waits for a worker
    response = case.call(headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code < 500, (case.method, case.path, response.status_code, response.text[:500])


class Workflow(schema.as_state_machine()):  # type: ignore[misc]
    """Stateful fuzzing along the links schemathesis infers (submit → read → events → cancel)."""

    def setup(self) -> None:
        # Each scenario starts from the same state of the session's private Redis: the links it
        # follows (the jobs a list returns, a cancel that finds its job queued) then answer alike
        # when Hypothesis runs a scenario again, which it requires of its data ("Inconsistent
        # data generation" otherwise, as CI met once the job view grew a model section).
        import os

        from deepe_tasks.core.connection import get_redis

        assert ":6379/" not in os.environ["DEEPE_REDIS_URL"], "only the session's private Redis is flushed"
        get_redis().flushdb()

    def get_call_kwargs(self, case: Case[Any]) -> dict[str, object]:
        return {"headers": {"Authorization": f"Bearer {TOKEN}"}}

    def before_call(self, case: Case[Any]) -> None:
        if case.path == "/jobs/{job_id}/events":
            case.query = {**(case.query or {}), "follow": "false"}

    def validate_response(self, response: object, case: Case[Any], **kwargs: object) -> None:
        status = getattr(response, "status_code", 0)
        assert status < 500, (case.method, case.path, status, getattr(response, "text", "")[:500])


TestStatefulWorkflow = Workflow.TestCase
TestStatefulWorkflow.settings = settings(settings.default, stateful_step_count=5,
                                         suppress_health_check=list(HealthCheck))


def test_the_routes_without_input_answer_without_a_server_error() -> None:
    from fastapi.testclient import TestClient

    with TestClient(app) as http:
        for path in NO_INPUT:
            response = http.get(path, headers={"Authorization": f"Bearer {TOKEN}"})
            assert response.status_code in (200, 503), (path, response.status_code, response.text[:300])
