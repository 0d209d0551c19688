"""The MLflow environment a job process gives a method that sets report_to="mlflow" itself (the
end-to-end tests, with a real server and real training, are in tests/test_mlflow.py)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from deepe_tasks.core.records import JobSpec
from deepe_tasks.core.settings import get_settings
from deepe_tasks.job import mlflow_env

SPEC = JobSpec(job_id="job-1", method="m", method_sha256="0" * 64, source="", params={}, storage_root="/x", attempt=2)


@pytest.fixture
def settings(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("DEEPE_MLFLOW_URI", "http://mlflow.internal:5000")
    monkeypatch.setenv("DEEPE_MLFLOW_EXPERIMENT", "team")
    monkeypatch.setattr(mlflow_env, "guard", lambda: None)  # the callback's guard needs transformers
    get_settings.cache_clear()
    yield
    monkeypatch.undo()
    get_settings.cache_clear()


def test_the_platforms_server_experiment_and_the_jobs_tags_are_given_where_the_user_set_none(settings: None) -> None:
    env: dict[str, str] = {}
    mlflow_env.prepare(SPEC, env)
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow.internal:5000" and env["MLFLOW_EXPERIMENT_NAME"] == "team"
    assert json.loads(env["MLFLOW_TAGS"]) == {"deepe.job_id": "job-1", "deepe.attempt": "2", "deepe.source": "method"}
    assert env["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "1"


def test_what_the_user_set_wins_and_their_tags_are_kept(settings: None) -> None:
    env = {"MLFLOW_TRACKING_URI": "http://theirs", "MLFLOW_EXPERIMENT_ID": "7", "MLFLOW_TAGS": '{"team": "nlp"}'}
    mlflow_env.prepare(SPEC, env)
    assert env["MLFLOW_TRACKING_URI"] == "http://theirs" and "MLFLOW_EXPERIMENT_NAME" not in env
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in env  # their server, their client settings
    assert json.loads(env["MLFLOW_TAGS"])["team"] == "nlp" and json.loads(env["MLFLOW_TAGS"])["deepe.job_id"] == "job-1"


def test_tags_that_are_not_json_are_replaced_by_deepes_with_a_warning(settings: None,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    env = {"MLFLOW_TAGS": "team=nlp"}
    mlflow_env.prepare(SPEC, env)
    assert json.loads(env["MLFLOW_TAGS"])["deepe.job_id"] == "job-1"
    assert "MLFLOW_TAGS is not a JSON object" in caplog.text


def test_nothing_is_set_without_deepe_mlflow_uri(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DEEPE_MLFLOW_URI", raising=False)
    get_settings.cache_clear()
    env: dict[str, str] = {}
    mlflow_env.prepare(SPEC, env)
    assert env == {}
    get_settings.cache_clear()
