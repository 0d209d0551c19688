"""Path parameters on an object store (``DEEPE_STORAGE=s3://bucket/prefix``), at submit.

A path may be given relative to the store or as a URL inside it. For the checks that submit
makes (the same as on a folder) the paths are resolved under this machine's local copy of the
store's layout; the record then keeps URLs, which every worker understands whatever its disk.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from deepe_tasks.core.errors import InvalidJobState, InvalidParams
from deepe_tasks.core.fences import MANIFEST
from deepe_tasks.core.objects import ObjectStore, StorageError, check_once
from deepe_tasks.core.settings import is_remote
from deepe_tasks.core.storage import MERGED_SUFFIX, foreign_owner, model_owner

OUTPUTS = ("OUTPUT_DIR",)


def to_relative(raw: dict[str, Any], names: list[str], storage_url: str | None) -> dict[str, Any]:
    """``raw`` with every URL inside the store, among ``names``, made relative to it; a URL
    elsewhere is refused with the fix."""
    out = dict(raw)
    for name in names:
        value = raw.get(name)
        if not (isinstance(value, str) and is_remote(value)):
            continue
        if storage_url is None:
            raise InvalidParams(f"{name}={value!r} is a URL, but DEEPE_STORAGE is a folder; give a path under it, or "
                                "run deepe with DEEPE_STORAGE set to the object store (s3://bucket/prefix).")
        store_rel = ObjectStore.relative(storage_url, value)
        if store_rel is None or not store_rel:
            raise InvalidParams(f"{name}={value!r} is outside DEEPE_STORAGE={storage_url}; give a path inside it "
                                f"(relative, or {storage_url}/…), copying the files there first if need be.")
        out[name] = store_rel
    return out


def to_urls(values: dict[str, Any], names: list[str], local_root: Path, storage_url: str) -> dict[str, Any]:
    """The resolved paths among ``names`` that lie under ``local_root``, as URLs of the store."""
    out = {}
    for name in names:
        value = values.get(name)
        if isinstance(value, str) and Path(value).is_relative_to(local_root):
            rel = Path(value).relative_to(local_root).as_posix()
            out[name] = f"{storage_url}/{rel}" if rel != "." else storage_url
    return out


def inputs_on_store(given: dict[str, Any], urls: dict[str, Any], storage_url: str) -> None:
    """Refuse a MODEL_PATH with no model on the store, or a DATASET_PATH with nothing there."""
    store = ObjectStore(storage_url)
    problems = []
    model = urls.get("MODEL_PATH")
    if isinstance(model, str):
        rel = store.rel_of(model) or ""
        manifest = store.read_json(f"{rel}/{MANIFEST}")
        files = manifest.get("files") if manifest else None
        folder = f"{rel}/{files}" if isinstance(files, str) and files else rel
        if not any(store.exists(f"{folder}/{name}") for name in ("config.json", "adapter_config.json")):
            problems.append(f"MODEL_PATH={given.get('MODEL_PATH')!r} resolves to {model}, where the store holds no "
                            "config.json; upload the folder that save_pretrained wrote there.")
    for name in ("DATASET_PATH", "EVAL_DATASET_PATH"):
        data = urls.get(name)
        if isinstance(data, str) and not store.files(store.rel_of(data) or ""):
            problems.append(f"{name}={given.get(name)!r} resolves to {data}, where the store holds no object; "
                            "upload the dataset file (JSON, JSONL, CSV, Parquet) or folder there.")
    if problems:
        raise InvalidParams(" ".join(problems) + " If this machine cannot read the store, set DEEPE_CHECK_PATHS=false.")


def output_owner(storage_url: str, output_url: str) -> str | None:
    """The job whose model is published at ``output_url`` on the store; None if none is."""
    store = ObjectStore(storage_url)
    manifest = store.read_json(f"{store.rel_of(output_url) or ''}/{MANIFEST}")
    return None if manifest is None else str(manifest.get("job"))


def published_files(output_dir: str, storage_url: str | None,
                    budget: float | None = None) -> tuple[dict[str, Any], dict[str, int]] | None:
    """The ``deepe.json`` of the model published at ``output_dir`` and its files (name: bytes);
    None if no model is there. A model exists when and only when its deepe.json does: on a store
    its files are under the key deepe.json names (one read, one listing, each tried for
    ``budget`` seconds), on a folder they are the folder's other files."""
    if is_remote(output_dir):
        inside = storage_url is not None and ObjectStore.relative(storage_url, output_dir) is not None
        store = ObjectStore(storage_url if inside and storage_url else "/".join(output_dir.split("/", 3)[:3]), budget)
        rel = store.rel_of(output_dir) or ""
        manifest = store.read_json(f"{rel}/{MANIFEST}")
        if manifest is None:
            return None
        key = manifest.get("files")
        folder = f"{rel}/{key}" if isinstance(key, str) and key else rel
        return manifest, {name: int(info.get("size") or 0) for name, info in store.files(folder).items()
                          if name not in ("", MANIFEST)}
    root = Path(output_dir)
    try:
        data = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except ValueError:
        data = None  # there, so a model, though its manifest cannot be read
    files = {p.relative_to(root).as_posix(): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}
    files.pop(MANIFEST, None)
    return (data if isinstance(data, dict) else {}), files


def check_store(storage_url: str) -> None:
    """Refuse to submit to a store that is not there or not writable (checked once a minute)."""
    try:
        check_once(storage_url)
    except StorageError as e:
        raise InvalidParams(str(e)) from e


def refuse_taken(output: str, storage_root: Path, job_id: str, storage_url: str | None) -> None:
    """Refuse an OUTPUT_DIR where publishing would replace or nest in another job's model."""
    if storage_url is not None:
        owner = output_owner(storage_url, output)
        problem = None if owner is None or owner == job_id else f"{output} holds the model of job {owner}"
    else:
        problem = foreign_owner(Path(output), storage_root, job_id)
    if problem is not None:
        raise InvalidParams(f"OUTPUT_DIR {output} cannot take the model of job {job_id}: {problem}. Choose another "
                            "OUTPUT_DIR, or delete that model first.")


def _merged_already(job_id: str, target: str, merge_job: str) -> InvalidJobState:
    return InvalidJobState(f"Job {job_id} was merged already: its merged model is at {target} (merge job {merge_job}). "
                           "Use that model, or merge again with --force (force=true over HTTP) to replace it.")


def merge_target(storage_url: str, job_id: str, adapter_url: str, *, check: bool, force: bool = False) -> str:
    """Where a merge of job ``job_id``'s adapter at ``adapter_url`` publishes on the store."""
    target = f"{adapter_url.rstrip('/')}{MERGED_SUFFIX}"
    if not check:
        return target
    store = ObjectStore(storage_url)
    rel = store.rel_of(adapter_url)
    manifest = store.read_json(f"{rel}/{MANIFEST}") if rel is not None else None
    files = manifest.get("files") if manifest else None
    if not isinstance(files, str) or not files:
        raise InvalidParams(f"The model of job {job_id} is not at {adapter_url} (no deepe.json there). Merge a job "
                            "whose model is on this DEEPE_STORAGE, or set DEEPE_CHECK_PATHS=false to let the worker look.")
    if not store.exists(f"{rel}/{files}/adapter_config.json"):
        raise InvalidJobState(f"The model of job {job_id} at {adapter_url} is already a complete model (it has no "
                              "LoRA adapter): there is nothing to merge. Use it as it is.")
    owner = store.read_json(f"{store.rel_of(target)}/{MANIFEST}")
    if owner is not None and owner.get("merged_from") != job_id:
        raise InvalidParams(f"The merged model of job {job_id} would go to {target}, but the model of job "
                            f"{owner.get('job')} is there. Move it away, then merge again.")
    if owner is not None and not force:
        raise _merged_already(job_id, target, str(owner.get("job")))
    return target


def folder_merge_target(job_id: str, adapter_dir: str, storage_root: Path, *, check: bool,
                        force: bool = False) -> Path:
    """Where a merge of job ``job_id``'s adapter publishes on a folder; refused with the fix where it cannot."""
    adapter = Path(adapter_dir)
    if check and not (adapter / "adapter_config.json").exists():
        if (adapter / "config.json").exists():
            raise InvalidJobState(f"The model of job {job_id} at {adapter} is already a complete model (it has no "
                                  "LoRA adapter): there is nothing to merge. Use that folder as it is.")
        raise InvalidParams(f"The model of job {job_id} is not at {adapter} on this machine. Merge from a machine "
                            "that mounts DEEPE_STORAGE, or set DEEPE_CHECK_PATHS=false to let the worker look.")
    target = adapter.parent / f"{adapter.name}{MERGED_SUFFIX}"
    problem = foreign_owner(target, storage_root, "(the merge)", job_id) if check else None
    if problem is not None:
        raise InvalidParams(f"The merged model of job {job_id} would go to {target}, but {problem}. Move that "
                            "folder away, then merge again.")
    owner = model_owner(target) if check else None
    if owner is not None and not force:
        raise _merged_already(job_id, str(target), owner[0])
    return target
