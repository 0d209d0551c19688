"""Operations: Flower, routing, priorities, scaling, deployment files and secrets."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from deepe_tasks import EventKind, JobStatus, submit
from deepe_tasks.fixtures.embedded import free_port
from tests.helpers import SLOW_METHOD, Worker, run_cli, wait_for, write_method

ROOT = Path(__file__).resolve().parent.parent


def start(workers: list[Worker], queues: str, tmp_path: Path, **env: str) -> Worker:
    w = Worker(queues, tmp_path / f"worker-{queues}-{len(workers)}.log", env=env).start()
    workers.append(w)
    return w


def quick(sft_params: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {**sft_params, "MAX_STEPS": 1, **extra}


# ---- Flower -------------------------------------------------------------------------------

class Flower:
    """A real Flower (`celery -A deepe_tasks flower`) with basic auth, on a free port."""

    def __init__(self, log: Path) -> None:
        self.port = free_port()
        self.auth = "Basic " + base64.b64encode(b"ops:s3cret").decode()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "deepe_tasks", "flower", f"--port={self.port}",
             "--address=127.0.0.1", "--basic-auth=ops:s3cret"],
            stdout=log.open("wb"), stderr=subprocess.STDOUT)

    def get(self, path: str, auth: bool = True) -> Any:
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}")
        if auth:
            request.add_header("Authorization", self.auth)
        with urllib.request.urlopen(request, timeout=10) as response:
            body = response.read().decode()
        return json.loads(body) if path.startswith("/api") else body

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=20)


@pytest.mark.e2e
def test_flower_shows_the_job_its_progress_and_the_worker(workers: list[Worker], tmp_path: Path, store: Path,
                                                          sft_params: dict[str, Any]) -> None:
    write_method(store, "slow", SLOW_METHOD)
    flower = Flower(tmp_path / "flower.log")
    try:
        wait_for(lambda: _answers(flower), timeout=60)
        worker = start(workers, "flower-q", tmp_path)
        job = submit("slow", {**sft_params, "MAX_STEPS": 16, "PromptInputColumn": "instruction",
                              "PromptOutputColumn": "output", "HF_TOKEN": "hf_secret_value"}, queue="flower-q")
        # While it trains: PROGRESS with step figures, and the worker online
        info = wait_for(lambda: _state(flower, job.id, "PROGRESS"), timeout=120)
        figures = json.loads(info["result"])
        assert 1 <= figures["step"] <= 16 and figures["max_steps"] == 16 and figures["loss"] > 0
        workers_seen = flower.get("/api/workers?refresh=1")
        assert worker.hostname in workers_seen
        # The task shows its method and masked parameters
        assert info["name"] == "deepe.train"
        assert "'method': 'slow'" in info["kwargs"] and "'HF_TOKEN': '***'" in info["kwargs"]
        assert "hf_secret_value" not in json.dumps(info)
        # And the task list's columns show the job id, the method and the parameters, not only the task name
        headers = re.findall(r'<th data-column="(\w+)"', flower.get("/tasks"))
        assert headers[:4] == ["name", "uuid", "state", "kwargs"] and "worker" in headers, headers
        assert job.wait(timeout=120) is JobStatus.SUCCEEDED
        done = wait_for(lambda: _state(flower, job.id, "SUCCESS"), timeout=30)
        assert done["state"] == "SUCCESS"
        # Prometheus metrics
        metrics = flower.get("/metrics", auth=False)
        assert "flower_events_total" in metrics and 'type="task-progress"' in metrics
        with pytest.raises(urllib.error.HTTPError):
            flower.get("/api/workers", auth=False)
    finally:
        flower.stop()


def _answers(flower: Flower) -> bool:
    try:
        flower.get("/healthcheck", auth=False)
        return True
    except OSError:
        return False


def _state(flower: Flower, task_id: str, state: str) -> dict[str, Any] | None:
    try:
        info = flower.get(f"/api/task/info/{task_id}")
    except OSError:
        return None
    return info if info.get("state") == state else None


# ---- routing, priorities, scaling ----------------------------------------------------------

@pytest.mark.e2e
def test_workers_receive_only_the_jobs_of_their_queues(workers: list[Worker], tmp_path: Path,
                                                       sft_params: dict[str, Any]) -> None:
    a = start(workers, "route-a", tmp_path)
    b = start(workers, "route-b", tmp_path)
    jobs = {q: [submit("sft-demo", quick(sft_params), queue=q) for _ in range(2)] for q in ("route-a", "route-b")}
    for q, worker in (("route-a", a), ("route-b", b)):
        for job in jobs[q]:
            assert job.wait(timeout=180) is JobStatus.SUCCEEDED
            assert job.info()["worker"] == worker.hostname


@pytest.mark.e2e
def test_a_higher_priority_job_queued_later_starts_first(workers: list[Worker], tmp_path: Path, store: Path,
                                                         sft_params: dict[str, Any]) -> None:
    write_method(store, "slow", SLOW_METHOD)
    start(workers, "prio-q", tmp_path)
    busy = submit("slow", {**sft_params, "MAX_STEPS": 12, "PromptInputColumn": "instruction",
                           "PromptOutputColumn": "output"}, queue="prio-q")
    wait_for(lambda: busy.status() is JobStatus.RUNNING, timeout=60)
    low = [submit("sft-demo", quick(sft_params), queue="prio-q", priority=5) for _ in range(3)]
    high = submit("sft-demo", quick(sft_params), queue="prio-q", priority=0)
    # `deepe queues` shows them waiting, the priority-0 one first
    shown = json.loads(run_cli("queues", "--queue", "prio-q", "--json").stdout)
    prio = next(q for q in shown if q["name"] == "prio-q")
    assert prio["length"] == 4 and prio["waiting"][0] == {"id": high.id, "priority": 0}
    assert [w["id"] for w in prio["waiting"][1:]] == [j.id for j in low]
    assert prio["running"] == [busy.id] and prio["workers"]
    for job in [busy, high, *low]:
        assert job.wait(timeout=240) is JobStatus.SUCCEEDED
    order = sorted([high, *low], key=lambda j: j.info()["started_at"])
    assert order[0].id == high.id


@pytest.mark.e2e
def test_three_workers_drain_twelve_jobs_each_run_exactly_once(workers: list[Worker], tmp_path: Path,
                                                               sft_params: dict[str, Any]) -> None:
    for _ in range(3):
        start(workers, "scale-q", tmp_path)
    jobs = [submit("sft-demo", quick(sft_params), queue="scale-q") for _ in range(12)]
    for job in jobs:
        assert job.wait(timeout=400) is JobStatus.SUCCEEDED
    for job in jobs:
        assert [e.kind for e in job.events()].count(EventKind.STARTED) == 1
        assert job.info()["attempts"] == 1
    assert {j.info()["worker"] for j in jobs} == {w.hostname for w in workers}


# ---- security ------------------------------------------------------------------------------

@pytest.mark.e2e
def test_secrets_never_reach_events_manifest_or_info(worker: Worker, sft_params: dict[str, Any]) -> None:
    job = submit("sft-demo", {**sft_params, "WANDB_API_KEY": "k-123456", "db_password": "pw-654321"})
    assert job.wait(timeout=180) is JobStatus.SUCCEEDED
    manifest = (Path(job.info()["output_dir"]) / "deepe.json").read_text()
    streams = json.dumps([e.model_dump() for e in job.events()])
    for text in (manifest, streams, json.dumps(job.info())):
        assert "k-123456" not in text and "pw-654321" not in text
    assert json.loads(manifest)["params"]["WANDB_API_KEY"] == "***"


@pytest.mark.e2e
def test_a_password_protected_redis_works_end_to_end(tmp_path: Path, sft_params: dict[str, Any],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from deepe_tasks.core.settings import get_settings
    from deepe_tasks.fixtures.embedded import RedisServer

    with RedisServer(folder=tmp_path / "redis", password="pa55word") as server:
        monkeypatch.setenv("DEEPE_REDIS_URL", server.url)
        get_settings.cache_clear()
        w = Worker("gpu", tmp_path / "worker.log", env={"DEEPE_REDIS_URL": server.url})
        try:
            w.start()
            job = submit("sft-demo", quick(sft_params))
            assert job.wait(timeout=180) is JobStatus.SUCCEEDED
        finally:
            w.stop()
            monkeypatch.undo()
            get_settings.cache_clear()
    env = {**os.environ, "DEEPE_REDIS_URL": "redis://:wrong@127.0.0.1:1/0"}
    result = subprocess.run([sys.executable, "-m", "deepe_tasks", "jobs"], env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2 and "redis://:**@127.0.0.1:1/0" in result.stderr and "wrong" not in result.stderr


def test_tls_urls_get_certificate_checks() -> None:
    from deepe_tasks.core.broker import make_app
    from deepe_tasks.core.settings import Settings

    settings = Settings(redis_url="rediss://:pw@redis:6380/0", redis_ca_certs=Path("/etc/ca.pem"))
    conf = make_app(settings).conf
    expected = {"ssl_cert_reqs": "required", "ssl_ca_certs": "/etc/ca.pem"}
    assert conf.broker_use_ssl == expected and conf.redis_backend_use_ssl == expected
    assert make_app(Settings(redis_url="redis://redis:6379/0")).conf.broker_use_ssl is None


def test_a_plain_url_gets_connections_that_follow_its_name_over_tls_too() -> None:
    import redis

    from deepe_tasks.core.connection import FollowsTheName, SSLFollowsTheName, connect

    tls = connect("rediss://:pw@redis:6380/0", ssl_ca_certs="/etc/ca.pem").connection_pool
    assert tls.connection_class is SSLFollowsTheName
    made = tls.make_connection()  # (not connected)
    assert isinstance(made, redis.SSLConnection) and made.ca_certs == "/etc/ca.pem"
    assert connect("redis://redis:6379/0").connection_pool.connection_class is FollowsTheName
    assert connect("unix:///run/redis.sock").connection_pool.connection_class is redis.UnixDomainSocketConnection


# ---- deployment files ----------------------------------------------------------------------

def test_the_compose_file_validates_against_the_compose_spec() -> None:
    result = subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
                             str(ROOT / "docker-compose.yml")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert "ports" not in services["redis"]  # not published on the host
    assert "--basic-auth" in " ".join(services["flower"]["command"])
    assert services["worker"]["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"
    assert services["worker"]["stop_grace_period"]


def test_the_gpu_override_gives_each_worker_its_own_gpu(tmp_path: Path) -> None:
    out = tmp_path / "docker-compose.gpus.yml"
    made = subprocess.run([sys.executable, str(ROOT / "scripts/compose_gpus.py"), "--gpus", "0,1,2,3", "--out", str(out)],
                          capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    result = subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
                             str(out)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    services = yaml.safe_load(out.read_text())["services"]
    assert services.pop("worker") == {"deploy": {"replicas": 0}}  # the plain worker does not also run
    devices = {name: s["deploy"]["resources"]["reservations"]["devices"] for name, s in services.items()}
    assert devices == {f"worker-gpu{i}": [{"driver": "nvidia", "device_ids": [str(i)], "capabilities": ["gpu"]}]
                       for i in range(4)}  # one device each, and no `count` that would share one
    assert all(s["deploy"]["replicas"] == 1 and s["stop_grace_period"] for s in services.values())
    names = [s["command"][s["command"].index("--name") + 1] for s in services.values()]
    assert len(set(names)) == 4 and all(s["command"][:2] == ["deepe", "worker"] for s in services.values())
    # The container sees its one GPU as device 0, whatever DEEPE_GPUS the env file holds
    assert all(s["command"][s["command"].index("--gpus") + 1] == "0" for s in services.values())
    # Both files merged as compose merges them (mappings key by key): still a valid file, and no
    # two services that run share a GPU
    merged = merge_compose(yaml.safe_load((ROOT / "docker-compose.yml").read_text()), yaml.safe_load(out.read_text()))
    (tmp_path / "merged.yml").write_text(yaml.safe_dump(merged))
    result = subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
                             str(tmp_path / "merged.yml")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    running = {name: s for name, s in merged["services"].items() if s.get("deploy", {}).get("replicas", 1) != 0}
    assert "worker" not in running and {"redis", "flower", "api"} <= set(running)
    reserved = [d for s in running.values() for d in s.get("deploy", {}).get("resources", {})
                .get("reservations", {}).get("devices", [])]
    assert sorted(i for d in reserved for i in d["device_ids"]) == ["0", "1", "2", "3"]
    assert not [d for d in reserved if "count" in d]
    refused = subprocess.run([sys.executable, str(ROOT / "scripts/compose_gpus.py"), "--gpus", "0,0", "--out",
                              str(out)], capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "distinct GPU indexes" in refused.stderr


def test_the_gpu_override_can_give_each_worker_a_group_of_gpus_for_multi_device_jobs(tmp_path: Path) -> None:
    out = tmp_path / "docker-compose.gpus.yml"
    script = [sys.executable, str(ROOT / "scripts/compose_gpus.py"), "--gpus", "0,1,2,3", "--out", str(out)]
    made = subprocess.run([*script, "--per-worker", "2"], capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    services = yaml.safe_load(out.read_text())["services"]
    services.pop("worker")
    assert {name: s["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] for name, s in services.items()} \
        == {"worker-gpu0-1": ["0", "1"], "worker-gpu2-3": ["2", "3"]}
    # Inside its container a worker sees its two GPUs as 0 and 1, and owns both: it runs 2-device jobs
    assert all(s["command"][s["command"].index("--gpus") + 1] == "0,1" for s in services.values())
    uneven = subprocess.run([*script, "--per-worker", "3"], capture_output=True, text=True, timeout=60)
    assert uneven.returncode != 0 and "do not split into workers of 3" in uneven.stderr


def merge_compose(base: Any, override: Any) -> Any:
    """Compose's merge of an override, enough for these files: mappings merge key by key, any
    other value is replaced."""
    if isinstance(base, dict) and isinstance(override, dict):
        return {**base, **{k: merge_compose(base.get(k), v) for k, v in override.items()}}
    return override


def test_the_gpu_override_for_all_gpus_takes_the_ones_nvidia_smi_lists(tmp_path: Path) -> None:
    fake = tmp_path / "bin" / "nvidia-smi"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100 (UUID: GPU-a)'\necho 'GPU 1: NVIDIA H100 (UUID: GPU-b)'\n")
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{fake.parent}{os.pathsep}{os.environ['PATH']}"}
    out = tmp_path / "docker-compose.gpus.yml"
    run = [sys.executable, str(ROOT / "scripts/compose_gpus.py"), "--gpus", "all", "--out", str(out)]
    made = subprocess.run(run, env=env, capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    assert set(yaml.safe_load(out.read_text())["services"]) == {"worker", "worker-gpu0", "worker-gpu1"}
    fake.write_text("#!/bin/sh\necho 'No devices were found'\n")  # no GPU: no file without workers
    out.unlink()
    refused = subprocess.run(run, env=env, capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "lists no GPU" in refused.stderr and not out.exists()


def compose_volume_target(entry: Any) -> str:
    """A service volume's path in the container: the key by which Compose merges a service's volumes."""
    return str(entry["target"]) if isinstance(entry, dict) else str(entry).split(":")[1]


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?error}, enough for these files."""
    import re

    def one(m: re.Match[str]) -> str:
        name, op, rest = m.group(1), m.group(2) or "", m.group(3) or ""
        if env.get(name):
            return env[name]
        assert op != ":?", f"{name} is required: {rest}"
        return rest

    return re.sub(r"\$\{(\w+)(:[-?])?([^}]*)\}", one, value)


def test_the_s3_override_runs_the_workers_and_the_api_on_the_store_without_the_shared_volume(tmp_path: Path) -> None:
    from deepe_tasks.core.settings import Settings

    path = ROOT / "docker-compose.s3.yml"
    result = subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
                             str(path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    base, override = yaml.safe_load((ROOT / "docker-compose.yml").read_text()), yaml.safe_load(path.read_text())
    assert set(override["services"]) == {"worker", "api"}  # the two that mount the storage; Flower does not
    # Merged as compose merges them; a service's volumes merge by their target path, so the
    # override's /data entries replace the shared volume's
    merged = merge_compose(base, override)
    for name, service in override["services"].items():
        by_target = {compose_volume_target(v): v for v in base["services"][name]["volumes"]}
        by_target.update({compose_volume_target(v): v for v in service["volumes"]})
        merged["services"][name]["volumes"] = list(by_target.values())
    (tmp_path / "merged.yml").write_text(yaml.safe_dump(merged))
    result = subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
                             str(tmp_path / "merged.yml")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    caches = []
    for name in ("worker", "api"):
        service = merged["services"][name]
        mounted = {compose_volume_target(v): str(v).split(":")[0] for v in service["volumes"]}
        assert "deepe-storage" not in mounted.values(), name  # no shared storage left
        assert mounted["/app/method_store"] == "./method_store"  # the rest kept
        env = service["environment"]
        assert env["DEEPE_REDIS_URL"] == base["services"][name]["environment"]["DEEPE_REDIS_URL"]
        # An s3:// store, whose bucket the env file must give (the same for workers and submitters)
        assert env["DEEPE_STORAGE"].startswith("s3://") and ":?" in env["DEEPE_STORAGE"]
        storage = interpolate(env["DEEPE_STORAGE"], {"DEEPE_S3_BUCKET": "my-bucket/deepe"})
        assert Settings(storage=storage).storage_url == "s3://my-bucket/deepe"
        with pytest.raises(AssertionError, match="DEEPE_S3_BUCKET is required"):
            interpolate(env["DEEPE_STORAGE"], {})
        # AWS settings passed through from the environment or the env file, never written here
        aws = {k: v for k, v in env.items() if k.startswith("AWS_")}
        assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "AWS_ENDPOINT_URL_S3"} <= set(aws)
        assert all(v is None for v in aws.values()), aws
        # The cache on a named volume of its own
        cache = env["DEEPE_CACHE_DIR"]
        assert mounted[cache] in override["volumes"]
        caches.append(mounted[cache])
        assert float(interpolate(str(env["DEEPE_CACHE_GB"]), {})) > 0
    assert len(set(caches)) == 2  # the worker and the API do not share one cache
    # The worker is otherwise the base file's: its GPU, its grace, its command
    for key in ("command", "deploy", "stop_signal", "stop_grace_period", "env_file", "image"):
        assert merged["services"]["worker"][key] == base["services"]["worker"][key]


def test_every_deepe_setting_in_the_deployment_files_is_one_deepe_reads() -> None:
    """A misspelt DEEPE_* in the env example, compose or k8s files would be silently ignored."""
    import re

    from deepe_tasks.core.settings import Settings

    known = {f"DEEPE_{name.upper()}" for name in Settings.model_fields}
    # Used by compose itself, not by deepe: the image, the worker's queues flag, ports, grace, and
    # the S3 override's bucket (DEEPE_STORAGE is s3:// and it).
    compose_only = {"DEEPE_IMAGE", "DEEPE_WORKER_QUEUES", "DEEPE_STOP_GRACE", "DEEPE_API_PORT", "DEEPE_S3_BUCKET"}
    files = [ROOT / "config/deepe.env.example", ROOT / "docker-compose.yml", ROOT / "docker-compose.s3.yml",
             *sorted((ROOT / "deploy").rglob("*.yaml"))]
    named = {m for f in files for m in re.findall(r"\bDEEPE_[A-Z0-9_]+", f.read_text())}
    assert named, "no DEEPE_ settings found: the check would pass on nothing"
    assert named - known - compose_only == set()


def k8s_documents(name: str = "*.yaml") -> list[dict[str, Any]]:
    return [doc for path in sorted((ROOT / "deploy/k8s").glob(name))
            for doc in yaml.safe_load_all(path.read_text()) if doc]


def scaled_jobs(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The workers' ScaledJobs: keda-scaledjob.yaml's (a shared folder) and keda-scaledjob-s3.yaml's."""
    found = [d for d in docs if d["kind"] == "ScaledJob"]
    assert found, "no ScaledJob found: the checks would pass on nothing"
    return found


def worker_job(scaled: dict[str, Any]) -> dict[str, Any]:
    """The Kubernetes Job that KEDA makes of a ScaledJob's jobTargetRef."""
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "deepe-worker-x"},
            "spec": scaled["spec"]["jobTargetRef"]}


def test_the_kubernetes_manifests_validate_against_the_kubernetes_schemas() -> None:
    import kubernetes_validate

    docs = k8s_documents()
    core = [d for d in docs if not d["apiVersion"].startswith("keda.sh/")]
    assert {d["kind"] for d in core} >= {"StatefulSet", "Service", "ConfigMap", "Secret", "PersistentVolumeClaim"}
    jobs = [worker_job(s) for s in scaled_jobs(docs)]  # KEDA's CRDs are not in the schemas, but the Job it makes is
    assert len(jobs) == 2  # on a shared folder, and on S3
    for doc in [*core, *jobs]:
        kubernetes_validate.validate(doc, "1.33.0", strict=True)
    for job in jobs:
        pod = job["spec"]["template"]["spec"]
        assert pod["terminationGracePeriodSeconds"] >= 300 and pod["restartPolicy"] == "Never"
        assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    job = jobs[0]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate({**job, "spec": {**job["spec"], "parallelism": "many"}}, "1.33.0", strict=True)


def test_keda_runs_one_job_per_pod_on_every_priority_list_and_never_scales_in_a_busy_worker() -> None:
    docs = k8s_documents()
    assert not [d for d in docs if d["kind"] in ("ScaledObject", "Deployment") and "worker" in d["metadata"]["name"]]
    for scaled in scaled_jobs(docs):
        check_scaled_job(scaled, docs)


def check_scaled_job(scaled: dict[str, Any], docs: list[dict[str, Any]]) -> None:
    from deepe_tasks.core.broker import priority_lists
    from deepe_tasks.ui.cli.common import app as cli_app

    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    # Each pod is a worker that ends with its job (so KEDA never removes a busy one), or idles out
    command = scaled["spec"]["jobTargetRef"]["template"]["spec"]["containers"][0]["command"]
    assert command[:2] == ["deepe", "worker"] and "--one-job" in command and "--idle-exit" in command
    from typer.testing import CliRunner

    helped = CliRunner().invoke(cli_app, ["worker", "--help"])
    assert "--one-job" in helped.output and "--idle-exit" in helped.output  # the flags exist
    # Every waiting job counts, whatever its priority: a trigger per list, summed
    lists = [t["metadata"]["listName"] for t in scaled["spec"]["triggers"]]
    assert sorted(lists) == sorted(name for _, name in priority_lists("gpu"))
    assert scaled["spec"]["scalingStrategy"] == {"strategy": "accurate", "multipleScalersCalculation": "sum"}
    # KEDA's default rollout deletes the running Jobs whenever the ScaledJob changes
    assert scaled["spec"]["rollout"] == {"strategy": "gradual"}
    # A failed pod gets a replacement, whose worker's reaper requeues the job the failed one lost
    assert scaled["spec"]["jobTargetRef"]["backoffLimit"] >= 1
    auth = next(d for d in docs if d["kind"] == "TriggerAuthentication")
    assert {t["authenticationRef"]["name"] for t in scaled["spec"]["triggers"]} == {auth["metadata"]["name"]}


def test_the_s3_scaledjob_has_no_shared_storage_and_aws_credentials_from_a_secret() -> None:
    """keda-scaledjob-s3.yaml: keda-scaledjob.yaml with the store instead of the claim, and nothing else changed."""
    import copy

    from deepe_tasks.core.settings import Settings

    docs = k8s_documents("keda-scaledjob-s3.yaml")
    # No claim, and no Secret holding credentials in the file: it is made apart (or IRSA replaces it)
    assert sorted(d["kind"] for d in docs) == ["ScaledJob", "TriggerAuthentication"]
    (s3,) = scaled_jobs(docs)
    folder_docs = k8s_documents("keda-scaledjob.yaml")
    (folder,) = scaled_jobs(folder_docs)
    pod = s3["spec"]["jobTargetRef"]["template"]["spec"]
    (container,) = pod["containers"]
    assert not [v for v in pod["volumes"] if "persistentVolumeClaim" in v]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert "/data" not in mounts
    env = {e["name"]: e for e in container["env"]}
    # The store: an s3:// URL, overriding the config map's folder (env wins over envFrom)
    assert env["DEEPE_STORAGE"]["value"].startswith("s3://")
    assert Settings(storage=env["DEEPE_STORAGE"]["value"]).storage_url == env["DEEPE_STORAGE"]["value"]
    assert {"configMapRef": {"name": "deepe-config"}} in container["envFrom"]
    # Credentials from a Secret, never literal values
    credentials = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"}
    assert not [name for name, e in env.items() if name in credentials and "value" in e]
    from_secrets = {r["secretRef"]["name"] for r in container["envFrom"] if "secretRef" in r}
    from_secrets |= {e["valueFrom"]["secretKeyRef"]["name"] for name, e in env.items()
                     if name.startswith("AWS_") and "secretKeyRef" in e.get("valueFrom", {})}
    assert from_secrets == {"deepe-s3"}
    # DEEPE_CACHE_DIR on an emptyDir bounded above DEEPE_CACHE_GB, whose size the pod requests
    cache = volumes[mounts[env["DEEPE_CACHE_DIR"]["value"]]]
    limit = cache["emptyDir"]["sizeLimit"]
    assert limit.endswith("Gi") and float(limit[:-2]) > float(env["DEEPE_CACHE_GB"]["value"])
    assert container["resources"]["requests"]["ephemeral-storage"] == limit
    assert volumes["shm"] == {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}}

    def rest(scaled: dict[str, Any]) -> dict[str, Any]:
        """The ScaledJob without its storage: the env, the mounts, the volumes and disk request."""
        scaled = copy.deepcopy(scaled)
        pod = scaled["spec"]["jobTargetRef"]["template"]["spec"]
        for key in ("env", "envFrom", "volumeMounts"):
            pod["containers"][0].pop(key)
        pod["containers"][0]["resources"]["requests"].pop("ephemeral-storage", None)
        pod.pop("volumes")
        return scaled

    # Everything else is the folder ScaledJob's, name included (apply one or the other): triggers,
    # rollout, scaling, grace, command, resources, and its Redis settings
    assert rest(s3) == rest(folder)
    assert next(d for d in docs if d["kind"] == "TriggerAuthentication") \
        == next(d for d in folder_docs if d["kind"] == "TriggerAuthentication")
    folder_container = folder["spec"]["jobTargetRef"]["template"]["spec"]["containers"][0]
    assert [e for e in container["env"] if e["name"] == "DEEPE_REDIS_URL"] \
        == [e for e in folder_container["env"] if e["name"] == "DEEPE_REDIS_URL"]
