"""Input at every door (Python, HTTP, the CLI): refused at submit with a sentence that names it,
or accepted and then read back by every route (issue 23, defects 2, 6 and 7). Nothing trains
here (no worker takes QUEUE); tests/test_input_e2e.py follows values to a real worker."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from hypothesis import event, given
from hypothesis import strategies as st

from deepe_tasks import submit
from deepe_tasks.contract.params import TrainParams, near_miss
from deepe_tasks.core import keys
from deepe_tasks.core.errors import DeepeError, InvalidParams, MethodContractError
from deepe_tasks.core.settings import get_settings
from tests.helpers import cli_here

QUEUE = "doors-q"  # nobody consumes it


@pytest.fixture(scope="module")
def params(tiny_model: Path, colors_data: Path) -> dict[str, Any]:
    return {"MODEL_PATH": str(tiny_model), "DATASET_PATH": str(colors_data), "MAX_STEPS": 2}


@pytest.fixture
def in_store(store: Path) -> Iterator[Callable[[str, str | bytes], str]]:
    """Puts a method file in the store for one test (bytes as they are)."""
    written: list[Path] = []

    def put(name: str, source: str | bytes) -> str:
        written.append(store / f"{name}.py")
        written[-1].write_bytes(source if isinstance(source, bytes) else source.encode())
        return name

    yield put
    for path in written:
        path.unlink()


def post(http: TestClient, params: dict[str, Any]) -> Any:
    """POST /jobs with a body as a client writes it (json escapes a lone surrogate as \\udc80)."""
    body = json.dumps({"method": "sft-demo", "params": params, "queue": QUEUE})
    return http.post("/jobs", content=body, headers={"Content-Type": "application/json"})


def jobs_in_redis(r: redis.Redis) -> int:
    return int(r.zcard(keys.JOBS_INDEX))


def assert_readable(http: TestClient, job_id: str) -> None:
    """Every read route answers for the job, and none fails for another's sake."""
    listed = http.get("/jobs?limit=100")
    assert listed.status_code == 200, listed.text[:300]
    assert job_id in [j["id"] for j in listed.json()["jobs"]]
    for path in (f"/jobs/{job_id}", f"/jobs/{job_id}/events?follow=false"):
        answer = http.get(path)
        assert answer.status_code == 200, (path, answer.status_code, answer.text[:300])
    for argv in (["status", job_id], ["status", job_id, "--json"], ["jobs"], ["logs", job_id]):
        done = cli_here(*argv)
        assert done.returncode == 0 and "Traceback" not in done.stderr, (argv, done.stderr[-500:])


# ---- 1. text that is not UTF-8 --------------------------------------------------------------

SURROGATE_CASES: dict[str, tuple[dict[str, Any], str]] = {
    "a custom value": ({"note": "caf\udce9"}, "params['note']"),
    "a custom name": ({"n\udc80te": "x"}, "params name 'n\\udc80te'"),
    "a value in a list": ({"tags": ["ok", "\ud800"]}, "params['tags'][1]"),
    "a name in a nested object": ({"opts": {"k\udfff": 1}}, "params['opts'] name"),
    "OUTPUT_DIR": ({"OUTPUT_DIR": "models/\udc80"}, "params['OUTPUT_DIR']"),
    "DATASET_PATH": ({"DATASET_PATH": "data/\udcff.jsonl"}, "params['DATASET_PATH']"),
}


@pytest.mark.parametrize("label", list(SURROGATE_CASES))
def test_a_lone_surrogate_anywhere_in_the_parameters_is_refused_at_every_door(
        label: str, params: dict[str, Any], http: TestClient, r: redis.Redis) -> None:
    # Given parameters holding a lone surrogate (valid JSON, not UTF-8)
    change, where = SURROGATE_CASES[label]
    bad = {**params, **change}
    before = jobs_in_redis(r)
    # When they are submitted over HTTP and in Python
    answer = post(http, bad)
    # Then both refuse them, naming the parameter, and nothing is queued
    assert answer.status_code == 422, (answer.status_code, answer.text[:300])
    assert where in answer.json()["detail"] and "not valid UTF-8 text" in answer.json()["detail"]
    with pytest.raises(InvalidParams, match="not valid UTF-8 text"):
        submit("sft-demo", bad, queue=QUEUE)
    assert jobs_in_redis(r) == before


def test_a_latin1_byte_on_the_command_line_is_refused_with_exit_2(params: dict[str, Any], r: redis.Redis) -> None:
    # Given `deepe submit -p note=caf<0xE9>` from a Latin-1 terminal (argv bytes, not UTF-8)
    argv = [sys.executable.encode(), b"-m", b"deepe_tasks", b"submit", b"sft-demo", b"--queue", QUEUE.encode(),
            *(a.encode() for k, v in params.items() for a in ("-p", f"{k}={v}")), b"-p", b"note=caf\xe9"]
    before = jobs_in_redis(r)
    # When it runs
    done = subprocess.run(argv, capture_output=True, timeout=120)
    # Then it exits 2 with a sentence naming the parameter and the byte, and queues nothing
    stderr = done.stderr.decode(errors="replace")
    assert done.returncode == 2, (done.returncode, stderr[-500:])
    assert "params['note'] is not valid UTF-8 text" in stderr and "0xE9" in stderr and "Traceback" not in stderr
    assert jobs_in_redis(r) == before


def test_a_record_holding_a_lone_surrogate_is_read_by_every_route(params: dict[str, Any], http: TestClient,
                                                                  r: redis.Redis) -> None:
    # Given a job whose record and events hold lone surrogates, as an older deepe could write them
    job = submit("sft-demo", params, queue=QUEUE)
    poisoned, record = job.id, json.loads(r.hget(keys.job(job.id), "params") or "{}")
    r.hset(keys.job(poisoned), mapping={"params": json.dumps({**record, "note": "\udc80", "k\ud800": ["\udfff"]}),
                                        "metrics": json.dumps({"loss\udc80": 1.0, "[/]": "[/x]"})})
    r.xadd(keys.events(poisoned), {"data": json.dumps({"kind": "log", "job": poisoned, "step": 1, "message": "\udc80",
                                                       "metrics": {"loss": 0.5, "x\udc80": 1}})})
    # When every read route asks for it, Then each answers, with U+FFFD in their place
    assert_readable(http, poisoned)
    record = http.get(f"/jobs/{poisoned}").json()
    assert record["params"]["note"] == "\ufffd" and record["params"]["k\ufffd"] == ["\ufffd"]
    assert record["metrics"] == {"loss\ufffd": 1.0, "[/]": "[/x]"} and record["progress"]["metrics"]["x\ufffd"] == 1
    assert "metric [/]" in cli_here("status", poisoned).stdout  # as text: rich markup would fail on it
    events = http.get(f"/jobs/{poisoned}/events?follow=false").json()
    assert [e["message"] for e in events if e["kind"] == "log"] == ["\ufffd"]
    job.cancel()


# ---- 2. numbers out of range ----------------------------------------------------------------

# name: (a value below the range, one above it)
TYPED = {
    "MAX_SEQ_LENGTH": (7, 1_048_577), "LORA_RANK": (0, 1025), "MAX_INPUT_LENGTH": (0, 1_048_577),
    "MAX_CONTENT_LENGTH": (0, 1_048_577), "MAX_SAMPLES": (-2, 10**9 + 1), "NUM_GENERATIONS": (1, 257),
    "MAX_GRAD_NORM": (0, 1000.5), "MAX_STEPS": (-2, 10**9 + 1), "NUM_EPOCHS": (0, 10_000.5),
    "BATCH_SIZE": (0, 65_537), "GRAD_ACCUM_STEPS": (0, 65_537), "LEARNING_RATE": (0, 1.5), "WARMUP_STEPS": (-1, 10**9 + 1),
}
OUT_OF_RANGE = [(name, value) for name, (low, high) in TYPED.items()
                for value in (low, high, 10**400, -(10**400), "inf", "-inf", "nan", "1e400")]


@pytest.mark.parametrize("name, value", OUT_OF_RANGE, ids=[f"{n}={str(v)[:12]}" for n, v in OUT_OF_RANGE])
def test_every_typed_parameter_refuses_a_value_out_of_its_range_with_the_range(name: str, value: Any,
                                                                               params: dict[str, Any]) -> None:
    # Given a platform parameter outside its range (or not a finite number)
    # When it is submitted, Then it is refused with the parameter's name and what it allows
    with pytest.raises(InvalidParams, match=f"^{name}=.* allowed: ") as refused:
        submit("sft-demo", {**params, name: value}, queue=QUEUE)
    assert len(str(refused.value)) < 400  # a 400-digit number is named, not repeated


# ---- 3. the values of issue 23 over HTTP, and paths -----------------------------------------

HTTP_CASES: dict[str, tuple[dict[str, Any], str]] = {
    "MAX_STEPS=10**400": ({"MAX_STEPS": 10**400}, "integer from 1 to 10**9"),
    "WARMUP_STEPS=10**20": ({"WARMUP_STEPS": 10**20}, "integer from 0 to 10**9"),
    "a JSON Infinity": ({"LEARNING_RATE": float("inf")}, "finite number"),
    "a custom integer past 64 bits": ({"seed": 2**64}, "beyond a 64-bit integer"),
    "a custom NaN": ({"ratio": float("nan")}, "finite number"),
    "a 300-byte folder name in OUTPUT_DIR": ({"OUTPUT_DIR": "models/" + "n" * 300}, "limit of 255"),
    "a 100-character name of 3-byte letters": ({"OUTPUT_DIR": "models/" + "日" * 100}, "300 bytes"),
    "a newline in OUTPUT_DIR": ({"OUTPUT_DIR": "models/a\nb"}, "control character '\\n'"),
    "a tab in DATASET_PATH": ({"DATASET_PATH": "data/a\tb.jsonl"}, "control character '\\t'"),
    "an escape in MODEL_PATH": ({"MODEL_PATH": "base/\x1b[31m"}, "control character '\\x1b'"),
    "DATASET_PATH=/etc/passwd": ({"DATASET_PATH": "/etc/passwd"}, "outside DEEPE_STORAGE"),
    "a relative path out of the storage": ({"DATASET_PATH": "../../../../etc/passwd"}, "outside DEEPE_STORAGE"),
    "MODEL_PATH=/": ({"MODEL_PATH": "/"}, "outside DEEPE_STORAGE"),
}


@pytest.mark.parametrize("label", list(HTTP_CASES))
def test_a_value_out_of_range_or_a_path_no_file_system_or_policy_allows_is_a_422(
        label: str, params: dict[str, Any], http: TestClient) -> None:
    # Given a value that used to be accepted (and fail later) or to give a 500
    change, words = HTTP_CASES[label]
    # When it is submitted, Then the answer is 422 with what is allowed
    answer = post(http, {**params, **change})
    assert answer.status_code == 422 and words in answer.json()["detail"], (answer.status_code, answer.text[:400])


def test_a_symlink_in_the_storage_is_followed_before_the_policy(params: dict[str, Any], storage: Path) -> None:
    # Given a link inside the storage that leads out of it
    link = storage / "data" / "etc-link"
    link.unlink(missing_ok=True)
    link.symlink_to("/etc")
    # When a dataset is named through it, Then it is refused with where it leads
    with pytest.raises(InvalidParams, match="DATASET_PATH=.*it resolves to /etc/passwd.* is outside DEEPE_STORAGE"):
        submit("sft-demo", {**params, "DATASET_PATH": "data/etc-link/passwd"}, queue=QUEUE)
    link.unlink()


def test_an_input_root_lets_a_job_read_outside_the_storage(params: dict[str, Any], colors_data: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a dataset outside the storage
    data = tmp_path / "shared" / "colors.jsonl"
    data.parent.mkdir()
    data.write_bytes(colors_data.read_bytes())
    with pytest.raises(InvalidParams, match="is outside DEEPE_STORAGE"):
        submit("sft-demo", {**params, "DATASET_PATH": str(data)}, queue=QUEUE)
    # When its folder is one of DEEPE_INPUT_ROOTS, Then the same job is accepted
    monkeypatch.setenv("DEEPE_INPUT_ROOTS", f"/nonexistent, {tmp_path / 'shared'}")
    get_settings.cache_clear()
    try:
        job = submit("sft-demo", {**params, "DATASET_PATH": str(data)}, queue=QUEUE)
        assert job.record().params["DATASET_PATH"] == str(data)
        job.cancel()
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()


def test_the_input_path_check_is_a_pure_function_of_the_path_the_storage_and_the_roots(tmp_path: Path) -> None:
    from deepe_tasks.core.validate import input_path_allowed  # what the worker asks too

    # Given a storage, an input root, and a link in the storage to a folder outside both
    storage, root, outside = tmp_path / "storage", tmp_path / "root", tmp_path / "outside"
    for folder in (storage, root, outside):
        folder.mkdir()
    (storage / "out").symlink_to(outside)
    # Then paths inside the storage or the root pass, and every other path is refused
    assert input_path_allowed("data/x.jsonl", storage, []) is None
    assert input_path_allowed(storage / "data", storage, []) is None
    assert input_path_allowed(root / "m", storage, [root]) is None
    for path in ("/etc/shadow", "../outside/x", "out/x", str(root / "m")):
        problem = input_path_allowed(path, storage, [], name="MODEL_PATH")
        assert problem is not None and problem.startswith(f"MODEL_PATH={path!r}") and "DEEPE_INPUT_ROOTS" in problem


DECLARES_A_PATH = '''"""Declares an input file of its own [/] (and text that is not rich markup)."""
from pathlib import Path

METHOD_PARAMS = {"reference": (Path, None, "a file of reference answers")}
model = tokenizer = trainer = None
'''


def test_a_declared_path_parameter_is_resolved_and_held_to_the_same_rule(
        in_store: Callable[[str, str | bytes], str], params: dict[str, Any], storage: Path) -> None:
    # Given a method that declares a Path parameter
    name = in_store("declpath01", DECLARES_A_PATH)
    shown = cli_here("methods", "show", name)
    assert shown.returncode == 0 and "reference" in shown.stdout and "own [/]" in shown.stdout, shown.stderr[-300:]
    # When it is given a relative path, Then the job gets it resolved under the storage
    job = submit(name, {**params, "reference": "data/colors.jsonl"}, queue=QUEUE, check=False)
    assert job.record().params["reference"] == str(storage / "data" / "colors.jsonl")
    job.cancel()
    # And a path outside the storage is refused as DATASET_PATH's would be
    with pytest.raises(InvalidParams, match="reference='/etc/passwd' is outside DEEPE_STORAGE"):
        submit(name, {**params, "reference": "/etc/passwd"}, queue=QUEUE, check=False)


# ---- 4. method files ------------------------------------------------------------------------

def test_a_method_file_that_is_not_utf8_is_listed_with_the_reason_and_refused_by_name(
        in_store: Callable[[str, str | bytes], str], http: TestClient, params: dict[str, Any]) -> None:
    # Given a Latin-1 file in the method store
    latin1_method = in_store("latin01", b'"""Caf\xe9 training."""\nmodel = tokenizer = trainer = None\n')
    # When the methods are listed, Then the others are too, and this one says why it cannot be used
    listed = cli_here("methods", "list")
    assert listed.returncode == 0 and "Traceback" not in listed.stderr, listed.stderr[-500:]
    assert "sft-demo" in listed.stdout and "latin01" in listed.stdout and "not UTF-8 text (byte 0xE9" in listed.stdout
    as_json = {m["name"]: m for m in json.loads(cli_here("methods", "list", "--json").stdout)}
    assert as_json[latin1_method]["problem"].startswith("the file is not UTF-8 text")
    over_http = http.get("/methods")
    assert over_http.status_code == 200
    assert "not UTF-8" in {m["name"]: m for m in over_http.json()}[latin1_method]["description"]
    # And naming it gives a clear error, not a traceback
    for argv in (["methods", "show", latin1_method], ["methods", "check", latin1_method]):
        done = cli_here(*argv)
        assert done.returncode == 2 and "is not UTF-8 text" in done.stderr and "Traceback" not in done.stderr
    assert http.get(f"/methods/{latin1_method}").status_code == 422
    with pytest.raises(MethodContractError, match="save it as UTF-8"):
        submit(latin1_method, params, queue=QUEUE)


QUOTED_NAME = '''"""Declares a name that would break an HTML attribute."""
METHOD_PARAMS = {'a"><img src=x onerror=alert(1)>': (int, 1, "a number")}
model = tokenizer = trainer = None
'''


def test_a_declared_name_with_quotes_or_markup_is_refused_and_never_reaches_the_page(
        in_store: Callable[[str, str | bytes], str], http: TestClient, params: dict[str, Any]) -> None:
    # Given a method declaring a parameter whose name would break out of an HTML attribute
    name = in_store("quote01", QUOTED_NAME)
    # When it is checked or submitted, Then it is refused with what a name must be
    done = cli_here("methods", "check", name)
    assert done.returncode == 1 and "must be ASCII letters, digits" in done.stdout
    with pytest.raises(MethodContractError, match="must be ASCII letters, digits"):
        submit(name, params, queue=QUEUE)
    # And the page's form, built from GET /methods/{name}, never gets the name: only the reason
    shown = http.get(f"/methods/{name}")
    assert shown.status_code == 200 and "must be ASCII letters, digits" in shown.json()["description"]
    assert all(p["declared_by"] == "platform" for p in shown.json()["params"])
    assert http.get("/methods").status_code == 200


# ---- 5. names: long, and the cost of a near miss --------------------------------------------

@pytest.mark.timeout(10)  # a guard against the hang of issue 23 (55 s), not a timing assert
def test_a_one_megabyte_parameter_name_is_refused_at_once(params: dict[str, Any], http: TestClient) -> None:
    key = "k" * 1_000_000
    with pytest.raises(InvalidParams, match="is 1000000 characters long, over the limit of 128"):
        submit("sft-demo", {**params, key: 1}, queue=QUEUE)
    assert near_miss(key, list(TrainParams.model_fields)) is None
    assert near_miss("MAX_STEP" + "x" * 60, list(TrainParams.model_fields)) is None  # longer than any name
    assert near_miss("MAX_STEP", list(TrainParams.model_fields)) == "MAX_STEPS"


@pytest.mark.parametrize("key", ["max_length", "eval_batch_size", "seed", "prompt_suffix", "max_new_tokens"])
def test_common_custom_names_are_no_near_miss(key: str) -> None:
    assert near_miss(key, list(TrainParams.model_fields)) is None  # three or more edits from every name


# ---- 6. any value, through every door -------------------------------------------------------

CHARS = st.one_of(st.characters(), st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF),
                  st.sampled_from("\x00\n\t\x1b\x7f\"'<>&\\/\u2028\ufeff"))
TEXT = st.text(CHARS, max_size=20) | st.text("ab/", min_size=200, max_size=400)
PLATFORM = [n for n in TrainParams.model_fields if n not in ("MODEL_PATH", "DATASET_PATH")]
NAMES = (TEXT | st.from_regex(r"[a-z][a-z0-9_]{0,15}", fullmatch=True) | st.text("ab", min_size=120, max_size=140)
         | st.sampled_from(PLATFORM))
NUMBERS = st.integers() | st.floats() | st.sampled_from([10**400, -(10**400), 2**63, -(2**63) - 1, 10**20])


def _nest(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = {"x": value}
    return value


VALUES = st.recursive(st.none() | st.booleans() | NUMBERS | TEXT,
                      lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
                      max_leaves=6) | st.integers(28, 36).map(_nest)
EXTRA = st.dictionaries(NAMES, VALUES, min_size=1, max_size=3)


@given(extra=EXTRA)
def test_any_value_through_python_is_refused_clearly_or_read_back_by_every_route(
        extra: dict[str, Any], params: dict[str, Any], http: TestClient) -> None:
    # Given any names and values beside valid paths; When they are submitted in Python,
    # Then a DeepeError with a printable sentence, or a job that every read route answers for
    try:
        job = submit("sft-demo", {**params, **extra}, queue=QUEUE)
    except DeepeError as e:
        event("refused")
        assert str(e).endswith((".", ")", "?")) and str(e).encode("utf-8")  # a sentence, printable anywhere
        return
    event("accepted")
    assert_readable(http, job.id)
    job.cancel()


@given(extra=EXTRA)
def test_any_value_through_http_is_refused_clearly_or_read_back_by_every_route(
        extra: dict[str, Any], params: dict[str, Any], http: TestClient) -> None:
    # Given the same; When they are POSTed, Then a 422 that says why, or a 201 and readable routes
    answer = post(http, {**params, **extra})
    assert answer.status_code in (201, 422), (answer.status_code, answer.text[:300])
    event(str(answer.status_code))
    if answer.status_code == 422:
        assert answer.json()["detail"]
        return
    assert_readable(http, answer.json()["id"])
    http.post(f"/jobs/{answer.json()['id']}/cancel")


def test_a_declared_name_with_dashes_or_dots_is_accepted() -> None:
    from deepe_tasks.contract.declared import declared_params

    source = 'METHOD_PARAMS = {"max-new-tokens": (int, 8, "tokens"), "lora.alpha": (float, 16.0, "alpha")}\n'
    assert sorted(declared_params(source)) == ["lora.alpha", "max-new-tokens"]


@pytest.mark.parametrize("field", ["priority", "time_limit", "check", "gpus", "queue"])
def test_a_lone_surrogate_in_any_submit_field_is_a_422_not_a_500(field: str, http: TestClient) -> None:
    body = '{"method": "sft-demo", "params": {}, "' + field + '": "\\udc80"}'
    answer = http.post("/jobs", content=body.encode(), headers={"content-type": "application/json"})
    assert answer.status_code == 422, answer.text
    assert answer.json()["detail"]  # it says what is wrong
