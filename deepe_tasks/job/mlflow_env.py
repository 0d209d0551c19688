"""A method's own MLflow run (``report_to="mlflow"``) beside deepe's, when DEEPE_MLFLOW_URI is set.

deepe's run of a job is fed from its event stream by the workers (`worker/tracking.py`) and is
the same whatever the method does. A method that asks transformers for MLflow as well gets a
second, separate run, made by transformers' ``MLflowCallback`` in the job process. That callback
reads its settings from the environment when training begins, so this module sets them for the
job process before the method runs:

- ``MLFLOW_TRACKING_URI`` = DEEPE_MLFLOW_URI and ``MLFLOW_EXPERIMENT_NAME`` =
  DEEPE_MLFLOW_EXPERIMENT, unless the worker's environment sets them (or
  ``MLFLOW_EXPERIMENT_ID``) already: what the user set wins;
- ``MLFLOW_TAGS``, the user's own tags (if any) plus ``deepe.job_id``, ``deepe.attempt`` and
  ``deepe.source=method``, so the method's run is found by its job id;
- short MLflow client retries and timeouts (where deepe chose the server), so that a tracking
  server that is down delays a step by seconds, not minutes.

A method may still set any of these itself (``os.environ`` before it builds its trainer).
Each attempt of the job makes its own run of the method. And the method's tracking never fails
the job: an error in any of the callback's hooks is logged once, ends the callback's run if it
can, and turns the callback off for the rest of the attempt; training goes on.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
from collections.abc import Callable, MutableMapping
from typing import Any

from deepe_tasks.core.records import JobSpec
from deepe_tasks.core.settings import get_settings

log = logging.getLogger(__name__)

SOURCE_TAG = "deepe.source"


def prepare(spec: JobSpec, environ: MutableMapping[str, str] | None = None) -> None:
    """Set the job process's MLflow environment (see the module); nothing without DEEPE_MLFLOW_URI."""
    env = os.environ if environ is None else environ
    settings = get_settings()
    if not settings.mlflow_uri:
        return
    if "MLFLOW_TRACKING_URI" not in env:
        env["MLFLOW_TRACKING_URI"] = settings.mlflow_uri
        env.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        env.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    if "MLFLOW_EXPERIMENT_NAME" not in env and "MLFLOW_EXPERIMENT_ID" not in env:
        env["MLFLOW_EXPERIMENT_NAME"] = settings.mlflow_experiment
    env["MLFLOW_TAGS"] = json.dumps({**_user_tags(env.get("MLFLOW_TAGS")), "deepe.job_id": spec.job_id,
                                     "deepe.attempt": str(spec.attempt), SOURCE_TAG: "method"})
    guard()


def _user_tags(raw: str | None) -> dict[str, Any]:
    if not raw:
        return {}
    try:
        tags = json.loads(raw)
    except ValueError:
        tags = None
    if isinstance(tags, dict):
        return tags
    log.warning("MLFLOW_TAGS is not a JSON object, so the method's MLflow run gets deepe's tags only; "
                "set it to JSON such as '{\"team\": \"nlp\"}'.")
    return {}


def guard() -> None:
    """Make transformers' MLflowCallback unable to fail the job (see the module)."""
    try:
        from transformers.integrations import integration_utils
    except ImportError:  # no training stack here: nothing reports to MLflow
        return
    cls: Any = integration_utils.MLflowCallback
    if getattr(cls, "_deepe_guarded", False):
        return
    for name, hook in list(vars(cls).items()):
        if name.startswith("on_") and callable(hook):
            setattr(cls, name, _guarded(hook))
    cls._deepe_guarded = True


def _guarded(hook: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(hook)
    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        if getattr(self, "_deepe_off", False):
            return None
        try:
            return hook(self, *args, **kwargs)
        except Exception as e:
            self._deepe_off = True
            log.warning("the method's own MLflow run (report_to=\"mlflow\") failed in %s and is turned off for "
                        "this attempt (%s: %s); the job goes on, and deepe's run of it is unaffected. Check that "
                        "MLFLOW_TRACKING_URI answers.", hook.__name__, type(e).__name__, str(e)[:300])
            _end_quietly(self)
            return None
    return call


def _end_quietly(callback: Any) -> None:
    """End the run the callback started, if the server lets it; never raise."""
    mlflow = getattr(callback, "_ml_flow", None)
    if mlflow is None or not getattr(callback, "_auto_end_run", False):
        return
    with contextlib.suppress(Exception):
        if mlflow.active_run() is not None:
            mlflow.end_run(status="FAILED")
    callback._auto_end_run = False  # its __del__ must not try again
