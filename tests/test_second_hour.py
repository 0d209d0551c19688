"""A user's second hour (issue 29): the rough edges past the first job, met as a user meets
them, from the command line and the HTTP API. (Methods and the job page have their own files:
tests/test_local.py, tests/test_deepextension.py, tests/test_ui.py.)"""

from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

from deepe_tasks import submit
from deepe_tasks.core import devices, jobstore
from deepe_tasks.core.settings import get_settings
from tests.helpers import Worker, cli_here, wait_for


def args(params: dict[str, Any]) -> list[str]:
    return [a for k, v in params.items() for a in ("-p", f"{k}={v}")]


def lonely_queue() -> str:
    return f"lonely-{uuid.uuid4().hex[:8]}"


# ---- workers and queues -----------------------------------------------------------------------

@pytest.mark.e2e
def test_two_workers_on_one_host_are_two_workers(workers: list[Worker], tmp_path: Path, r: redis.Redis,
                                                 sft_params: dict[str, Any]) -> None:
    # Given two workers started on one host the plain way, without --name: one owns two
    # devices, the other one (started second, as the one that used to overwrite it)
    queue = lonely_queue()
    for gpus, log in (("0,1", "pair.log"), ("0", "single.log")):
        command = [sys.executable, "-m", "deepe_tasks", "worker", "--queues", queue, "--gpus", gpus]
        w = Worker(queue, tmp_path / log, command=command)
        w.process.start()
        workers.append(w)
    stale = devices.STALE_AFTER_TTLS * get_settings().lease_ttl
    mine = lambda: [(n, owned) for n, owned, _, qs in devices.live(r, stale) if queue in qs]  # noqa: E731
    wait_for(lambda: len(mine()) == 2, timeout=120)
    names = sorted(n for n, _ in mine())
    # Then each has a name of its own, and the registry keeps both
    assert names[0] != names[1] and all(n.startswith("deepe-") for n in names), names
    assert sorted(owned for _, owned in mine()) == [1, 2]
    # And `deepe queues` lists both, without Celery's duplicate-name warning
    shown = cli_here("queues", "--json")
    assert shown.returncode == 0, shown.stderr
    assert "DuplicateNodenameWarning" not in shown.stderr
    consumers = {w for q in json.loads(shown.stdout) if q["name"] == queue for w in q["workers"]}
    assert consumers == set(names), (consumers, names)
    # And a 2-device job is accepted (it was refused, naming the 2-device worker as owning 1)
    done = cli_here("submit", "sft-demo", *args(sft_params), "--gpus", "2", "--queue", queue, "--json")
    assert done.returncode == 0, done.stderr
    cli_here("cancel", json.loads(done.stdout)["id"])


def test_a_cancelled_queued_job_is_not_listed_as_waiting(r: redis.Redis, sft_params: dict[str, Any],
                                                        http: TestClient) -> None:
    # Given two jobs queued where no worker takes them, one of them then cancelled
    queue = lonely_queue()
    kept = submit("sft-demo", sft_params, queue=queue)
    dropped = submit("sft-demo", sft_params, queue=queue)
    dropped.cancel()
    # Then `deepe queues` and the API's queues list only the one still waiting
    shown = json.loads(cli_here("queues", "--json", "--queue", queue).stdout)
    row = next(q for q in shown if q["name"] == queue)
    assert [w["id"] for w in row["waiting"]] == [kept.id] and row["length"] == 1
    view = next(q for q in http.get("/queues").json()["queues"] if q["name"] == queue)
    assert [w["id"] for w in view["waiting"]] == [kept.id] and view["length"] == 1
    kept.cancel()


def test_submit_says_when_no_worker_consumes_the_queue(r: redis.Redis, sft_params: dict[str, Any],
                                                       http: TestClient) -> None:
    # Given a queue no worker consumes
    queue = lonely_queue()
    # When a job is submitted to it, it is queued all the same, and submit says so in one line
    done = cli_here("submit", "sft-demo", *args(sft_params), "--queue", queue)
    assert done.returncode == 0, done.stderr
    job_id = done.stdout.strip()
    assert jobstore.status(r, job_id).value == "queued"
    line = f"No worker consumes queue {queue!r} now"
    assert line in done.stderr and "the job waits there until one starts" in done.stderr
    assert f"deepe worker --queues {queue}" in done.stderr
    answer = http.post("/jobs", json={"method": "sft-demo", "params": sft_params, "queue": queue})
    assert answer.status_code == 201 and line in answer.json()["notices"][0]
    # And once a worker of that queue is up, nothing is said
    key = devices.entry_key("w@test", uuid.uuid4().hex)
    devices.register(r, key, 1, [queue])
    try:
        quiet = cli_here("submit", "sft-demo", *args(sft_params), "--queue", queue)
        assert quiet.returncode == 0 and "No worker" not in quiet.stderr, quiet.stderr
        # But a 2-device job, which that worker cannot run, is told
        big = cli_here("submit", "sft-demo", *args(sft_params), "--queue", queue, "--gpus", "2")
        assert big.returncode == 2 and "asks for 2 devices" in big.stderr  # refused: a smaller worker is up
    finally:
        devices.unregister(r, key)
    for j in (job_id, answer.json()["id"], quiet.stdout.strip()):
        cli_here("cancel", j)


@pytest.mark.e2e
def test_settings_that_need_a_gpu_are_warned_at_submit_when_the_queues_workers_have_none(
        r: redis.Redis, sft_params: dict[str, Any], worker: Worker, store: Path) -> None:
    from deepe_tasks.core import keys
    from tests.helpers import write_method

    # Given the session's worker on this machine without CUDA: it says so in the registry
    entries = {k: v for k, v in r.hgetall(keys.WORKERS).items() if str(k).startswith(f"{worker.hostname}#")}
    assert entries and all(str(v).endswith(" cpu") for v in entries.values()), entries
    # and a queue whose only worker has no CUDA
    queue = lonely_queue()
    cpu, gpu = devices.entry_key("cpu@test", uuid.uuid4().hex), devices.entry_key("gpu@test", uuid.uuid4().hex)
    devices.register(r, cpu, 1, [queue], cuda=False)
    method = write_method(store, "bf16default", "from trl import SFTConfig, SFTTrainer\nmodel = tokenizer = None\n"
                          "trainer = SFTTrainer(model=model, args=SFTConfig(output_dir='x'), callbacks=[callback])\n")
    submitted = []
    try:
        # When a job asks for a 4-bit base model there, and one's method leaves bf16 to TRL's default
        four_bit = cli_here("submit", "sft-demo", *args({**sft_params, "LOAD_IN_4BIT": "true"}), "--queue", queue)
        bf16 = cli_here("submit", method, *args(sft_params), "--queue", queue)
        submitted += [four_bit.stdout.strip(), bf16.stdout.strip()]
        # Then both are queued, and submit warns of each, naming the fix
        assert four_bit.returncode == 0 and bf16.returncode == 0, four_bit.stderr + bf16.stderr
        said = four_bit.stderr.replace("\n", " ")
        assert f"warning: no worker of queue {queue!r} up now has CUDA: LOAD_IN_4BIT=true asks for a 4-bit" in said
        assert "Set LOAD_IN_4BIT=false" in said
        said = bf16.stderr.replace("\n", " ")
        assert "without bf16= or use_cpu=, so TRL turns bf16 on" in said and "use_cpu=True" in said, said
        assert f"no worker of queue {queue!r} up now has one" in said
        # And once a worker with CUDA takes that queue too, nothing is said
        devices.register(r, gpu, 1, [queue], cuda=True)
        quiet = cli_here("submit", "sft-demo", *args({**sft_params, "LOAD_IN_4BIT": "true"}), "--queue", queue)
        submitted.append(quiet.stdout.strip())
        assert quiet.returncode == 0 and "warning" not in quiet.stderr, quiet.stderr
    finally:
        devices.unregister(r, cpu)
        devices.unregister(r, gpu)
        for job_id in submitted:
            cli_here("cancel", job_id)


# ---- methods by name ------------------------------------------------------------------------

@pytest.mark.parametrize("typed, meant", [("custom1", "custom01"), ("sft_demo", "sft-demo"), ("grpodemo", "grpo-demo")])
def test_a_method_name_typo_gets_did_you_mean(typed: str, meant: str, sft_params: dict[str, Any],
                                             store: Path) -> None:
    (store / "custom01.py").write_text("model = tokenizer = trainer = None\n")
    try:
        done = cli_here("submit", typed, *args(sft_params), "--queue", lonely_queue())
    finally:
        (store / "custom01.py").unlink()
    assert done.returncode == 2
    assert f"There is no method {typed!r}: did you mean {meant!r}?" in done.stderr, done.stderr


def test_a_method_file_path_is_answered_with_what_to_do(sft_params: dict[str, Any]) -> None:
    done = cli_here("submit", "method_store/custom01.py", *args(sft_params))
    assert done.returncode == 2
    said = done.stderr.replace("\n", " ")
    assert "is a file path; submit takes a method's name" in said and "'custom01'" in said, said
    assert "run-local" in said


# ---- ids, durations and logs ------------------------------------------------------------------

def test_a_short_id_prefix_says_four_characters_are_needed(sft_params: dict[str, Any]) -> None:
    job = submit("sft-demo", sft_params, queue=lonely_queue())
    try:
        done = cli_here("status", job.id[:3])
        assert done.returncode == 2
        assert "a prefix of a job id needs at least 4 characters" in done.stderr.replace("\n", " ")
        assert cli_here("status", job.id[:4], "--json").returncode == 0
    finally:
        job.cancel()


def test_an_unknown_job_names_the_retention_as_a_duration() -> None:
    done = cli_here("status", "no-such-job-at-all")
    said = done.stderr.replace("\n", " ")
    assert done.returncode == 2 and "e+0" not in said
    days = get_settings().job_retention / 86400
    assert f"DEEPE_JOB_RETENTION ({days:.0f} days)" in said, said


def test_logs_print_event_ids_only_when_asked(r: redis.Redis, sft_params: dict[str, Any]) -> None:
    job = submit("sft-demo", sft_params, queue=lonely_queue())
    job.cancel()
    ids = [str(e.id) for e in job.events()]
    plain = cli_here("logs", job.id)
    assert plain.returncode == 0 and "queued" in plain.stdout
    assert not any(i in plain.stdout for i in ids), plain.stdout
    for argv in (["logs", job.id, "--ids"], ["logs", job.id, "--ids", "--follow"]):
        shown = cli_here(*argv)
        assert shown.returncode == 0
        first = [line for line in shown.stdout.splitlines() if "queued" in line][0]
        assert first.startswith(f"{ids[0]}  "), shown.stdout
    followed = cli_here("logs", job.id, "--follow")
    assert "cancelled" in followed.stdout and not any(i in followed.stdout for i in ids)


# ---- your own methods do not break the project's checks ----------------------------------------

def test_a_users_own_method_in_method_store_breaks_no_check_of_the_project(tmp_path: Path) -> None:
    import re
    import shutil
    import subprocess

    from tests.helpers import ROOT, SHIPPED_METHOD_FILES, copy_shipped_store

    # Given a method of the user's own in the repository's method_store/, as the README says,
    # with an unused import and a line ruff rejects
    mine = ROOT / "method_store" / f"custom{uuid.uuid4().hex[:6]}.py"
    mine.write_text("import os\nimport sys\nmodel=tokenizer=trainer=None\n")
    try:
        # When the test command's lint runs (the very line of scripts/test.sh)
        script = (ROOT / "scripts" / "test.sh").read_text().replace("\\\n", " ")
        line = next(x for x in script.splitlines() if x.startswith("ruff check"))
        ruff = shutil.which("ruff", path=str(Path(sys.executable).parent))
        assert ruff is not None
        # (its options and the parts of method_store/ it names: the rest is the project's own code)
        argv = [a for a in line.split()[1:] if a in ("check", "concise") or a.startswith(("-", "method_store"))]
        assert any(a.startswith("method_store") for a in argv), line
        linted = subprocess.run([ruff, *argv], cwd=ROOT, capture_output=True, text=True, timeout=120)
        # Then it passes, and the tests' method store holds only what the repository ships
        assert linted.returncode == 0, linted.stdout + linted.stderr
        assert mine.name not in linted.stdout
        copied = copy_shipped_store(tmp_path / "store")
        assert sorted(p.name for p in copied.iterdir()) == sorted(SHIPPED_METHOD_FILES)
        assert not re.search(r"\bmethod_store\b(?!/)", line), line  # no folder-wide lint of the store
    finally:
        mine.unlink()
