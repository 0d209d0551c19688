"""An lm-evaluation-harness task file (`deepe eval TARGET --lm-eval TASK_YAML`), checked where it
is read: at submit (where that machine can read it) and on the worker before lm-eval sees it.

Only what runs offline passes: one task (not a group); a dataset of local files
(``dataset_path: json`` — or csv, parquet, text, arrow — with ``dataset_kwargs.data_files``, a
path relative to the task file's folder); metrics lm-eval computes itself (``acc``, ``acc_norm``,
``perplexity``, ``exact_match``, ``bleu``, ... or a ``!function`` of the task's folder). Any other
metric name (or ``hf_evaluate: true``) makes lm-eval call ``evaluate.load``, a hub download, and
is refused, naming it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

from deepe_tasks.core import validate
from deepe_tasks.core.errors import InvalidParams

SUFFIXES = (".yaml", ".yml")
LOCAL_BUILDERS = frozenset({"json", "csv", "parquet", "text", "arrow"})
# lm-eval 0.4's registered metrics (lm_eval.api.registry.metric_registry): computed in-process.
LOCAL_METRICS = frozenset({
    "acc", "acc_all", "acc_bytes", "acc_mutual_info", "acc_norm", "bits_per_byte", "bleu", "brier_score", "bypass",
    "byte_perplexity", "chrf", "chrf++", "exact_match", "f1", "likelihood", "mcc", "perplexity", "ter",
    "word_perplexity",
})
FUNCTION = "!function "
MAX_INCLUDES = 8
MAX_BYTES = 1 << 20  # a task file is a few lines; a bigger one is not a task file

Read = Callable[[str], "str | None"]  # the text of a file, by its path relative to the task's folder


def _loader() -> Any:
    import yaml

    class Loader(yaml.SafeLoader):  # type: ignore[misc]
        pass

    # lm-eval imports `!function module.name` from the task's folder; here it is only named.
    Loader.add_constructor("!function", lambda loader, node: FUNCTION + str(loader.construct_scalar(node)))
    return Loader


def parse(name: str, read: Read, shown: str, depth: int = 0) -> dict[str, Any]:
    """The task file ``name`` (relative to its folder) as lm-eval reads it: ``include:``d files
    merged under its own keys. ``shown`` names it in messages."""
    import yaml

    text = read(name)
    if text is None:
        raise InvalidParams(f"--lm-eval {shown}: {name} does not exist; give the path of a task YAML file (with its "
                            "dataset beside it).")
    if len(text) > MAX_BYTES:
        raise InvalidParams(f"--lm-eval {shown}: {name} is over {MAX_BYTES} bytes, too big for a task file; give "
                            "the task's YAML, not its data.")
    try:
        config = yaml.load(text, Loader=_loader())  # noqa: S506 (a SafeLoader with one added tag)
    except yaml.YAMLError as e:
        raise InvalidParams(f"--lm-eval {shown}: {name} is not valid YAML ({str(e).splitlines()[0]}); fix the "
                            "file (lm-eval's task format).") from None
    if not isinstance(config, dict):
        raise InvalidParams(f"--lm-eval {shown}: {name} holds a {type(config).__name__}, not a mapping; a task "
                            "file maps keys (task, dataset_path, output_type, ...) to values.")
    includes = config.pop("include", None)
    if includes is None:
        return config
    if depth >= MAX_INCLUDES:
        raise InvalidParams(f"--lm-eval {shown}: includes nest deeper than {MAX_INCLUDES}; remove the cycle.")
    merged: dict[str, Any] = {}
    for included in includes if isinstance(includes, list) else [includes]:
        base = str(PurePosixPath(name).parent / str(included))
        merged.update({k: v for k, v in parse(base, read, shown, depth + 1).items() if k != "task_list"})
    return {**merged, **config}


def check(config: dict[str, Any], shown: str) -> tuple[str, list[str]]:
    """(the task's name, the data files it names, as written) of a task that runs offline; else
    InvalidParams naming what does not, and the fix."""
    task = config.get("task")
    if isinstance(task, list) or "group" in config and not isinstance(task, str):
        raise InvalidParams(f"--lm-eval {shown} is a group of tasks; give the YAML file of one task.")
    if not isinstance(task, str) or not task.strip():
        raise InvalidParams(f"--lm-eval {shown} names no task; add `task: my_task` to it.")
    source = config.get("dataset_path")
    if source not in LOCAL_BUILDERS:
        raise InvalidParams(f"--lm-eval {shown}: dataset_path {source!r} is not a local file format, and workers "
                            "cannot reach the Hugging Face hub; use `dataset_path: json` (or csv, parquet, text, "
                            "arrow) with `dataset_kwargs: {data_files: {test: FILE}}`, FILE relative to the task file.")
    kwargs = config.get("dataset_kwargs")
    files = _files(kwargs.get("data_files") if isinstance(kwargs, dict) else None)
    if not files:
        raise InvalidParams(f"--lm-eval {shown}: dataset_path {source} needs its files; add `dataset_kwargs: "
                            "{data_files: {test: FILE}}`, FILE relative to the task file.")
    for metric in config.get("metric_list") or []:
        name = metric.get("metric") if isinstance(metric, dict) else None
        if not isinstance(name, str):
            raise InvalidParams(f"--lm-eval {shown}: metric_list has an entry with no metric name ({metric!r}); "
                                "give each entry `metric: NAME`.")
        if metric.get("hf_evaluate") or not (name in LOCAL_METRICS or name.startswith(FUNCTION)):
            raise InvalidParams(f"--lm-eval {shown}: the metric {name!r} is not one lm-eval computes itself, so it "
                                "would be downloaded from the Hugging Face hub (evaluate.load), which workers "
                                f"cannot reach; use one of {sorted(LOCAL_METRICS)}, or a !function of the task's "
                                "folder.")
    return task, files


def _files(value: Any) -> list[str]:
    """Every path of a ``data_files`` value: one path, a list, or a mapping of splits to either."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [v for item in value for v in _files(item)]
    if isinstance(value, dict):
        return [v for item in value.values() for v in _files(item)]
    return []


def with_files(config: dict[str, Any], resolve: Callable[[str], str]) -> dict[str, Any]:
    """``config`` with each data file replaced by ``resolve(file)`` (an absolute path)."""

    def swap(value: Any) -> Any:
        if isinstance(value, str):
            return resolve(value)
        if isinstance(value, list):
            return [swap(v) for v in value]
        if isinstance(value, dict):
            return {k: swap(v) for k, v in value.items()}
        return value

    kwargs = dict(config["dataset_kwargs"])
    kwargs["data_files"] = swap(kwargs["data_files"])
    return {**config, "dataset_kwargs": kwargs}


def data_file(folder: Path, file: str, shown: str, storage_root: Path, input_roots: list[Path] | None) -> Path:
    """The data file ``file`` a task file at ``shown`` names (relative to its ``folder``), refused
    when the input-path rule forbids it (``input_roots``: None, no bound) or it is not there."""
    path = folder / Path(file).expanduser()
    if input_roots is not None:
        problem = validate.input_path_allowed(path, storage_root, input_roots, name=f"data file {file!r} of {shown}")
        if problem:
            raise InvalidParams(problem)
    if not path.exists():
        raise InvalidParams(f"--lm-eval {shown}: its data file {file!r} resolves to {path.resolve()}, which does not "
                            "exist; give data_files relative to the task file's folder.")
    return path
