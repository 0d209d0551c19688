"""`deepe eval TARGET --lm-eval TASK_YAML`, the submit side: the task file and the data it names
checked where this machine can read them (`contract.lmeval_task` says what passes), and the
parameters the worker reads them by.

The task file's folder travels as ``LM_EVAL_DIR`` (a folder on the storage, or a URL on an
object store, which the worker fetches into its cache like any input), the file's name as
``LM_EVAL_TASK``; the data files the task names are relative to that folder (or absolute paths,
on a folder storage, inside it or DEEPE_INPUT_ROOTS).
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Any

from deepe_tasks.contract import lmeval_task as task_file
from deepe_tasks.core.errors import InvalidParams
from deepe_tasks.core.objects import ObjectStore
from deepe_tasks.core.settings import Settings, is_remote


def lmeval_task(value: str, resolved: str, settings: Settings) -> dict[str, Any]:
    """The parameters of an lm-eval task file given as ``value`` (``resolved``: as the record
    keeps a path), refused with the fix where it cannot run offline."""
    folder, _, name = resolved.rstrip("/").rpartition("/")
    if not name.endswith(task_file.SUFFIXES):
        raise InvalidParams(f"--lm-eval {value}: give the task's YAML file (.yaml or .yml), with its dataset in the "
                            "same folder.")
    params = {"LM_EVAL_DIR": folder, "LM_EVAL_TASK": name}
    if not settings.check_paths:
        return params
    if is_remote(resolved):
        _on_store(value, folder, name, settings)
    else:
        _on_folder(value, Path(folder), name, settings)
    return params


def _on_folder(value: str, folder: Path, name: str, settings: Settings) -> None:
    def read(rel: str) -> str | None:
        path = folder / rel
        return path.read_text(encoding="utf-8", errors="replace") if path.is_file() else None

    if not (folder / name).is_file():
        raise InvalidParams(f"--lm-eval {value}: {folder / name} does not exist; give the path of a task YAML file "
                            "(with its dataset beside it).")
    _, files = task_file.check(task_file.parse(name, read, value), value)
    for file in files:
        task_file.data_file(folder, file, value, settings.storage_root, settings.input_root_list)


def _on_store(value: str, folder: str, name: str, settings: Settings) -> None:
    assert settings.storage_url is not None
    store = ObjectStore(settings.storage_url)
    rel = store.rel_of(folder) or ""

    def read(path: str) -> str | None:
        data = store.read_bytes(f"{rel}/{path}")
        return None if data is None else data.decode("utf-8", errors="replace")

    _, files = task_file.check(task_file.parse(name, read, value), value)
    for file in files:
        parts = PurePosixPath(file).parts
        if PurePosixPath(file).is_absolute() or ".." in parts:
            raise InvalidParams(f"--lm-eval {value}: its data file {file!r} is outside the task file's folder, which "
                                "is what a worker fetches from the object store; put it in that folder and name it "
                                "relative to it.")
        if not store.files(f"{rel}/{file}"):
            raise InvalidParams(f"--lm-eval {value}: its data file {file!r} is not on the store ({folder}/{file}); "
                                "upload it beside the task file.")
