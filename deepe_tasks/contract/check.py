"""The static contract check of a method: what `deepe methods check` reports, and what submit
refuses, without running it.

The platform runs a method file from top to bottom in a module whose ``__name__`` is not
``"__main__"``, then trains and saves itself. So the check follows the statements that run at
the top level (not function bodies, not the main guard) to find `model`, `tokenizer` and
`trainer`, and looks everywhere for calls the platform makes itself.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from enum import Enum

from deepe_tasks.contract.declared import declared_params
from deepe_tasks.contract.deepext import TRAINING_FUNCTION, is_deepextension
from deepe_tasks.contract.hardware import gpu_settings, has_cuda
from deepe_tasks.contract.parsing import parse
from deepe_tasks.core.errors import MethodContractError

REQUIRED_NAMES = ("model", "tokenizer", "trainer")
SAVE_CALLS = ("save_pretrained", "save_model", "push_to_hub")
# Calls that write files: with OUTPUT_DIR in their arguments, they write into it.
WRITE_CALLS = frozenset({"open", "save", "save_to_disk", "to_json", "to_csv", "to_parquet", "copy", "copy2",
                         "copyfile", "copytree", "move", "makedirs", "mkdir", "write_text", "write_bytes",
                         "dump", "save_file", "savefig", "touch"})
HUB_CALLS = frozenset({"from_pretrained", "load_dataset"})
DATA_FILES = (".json", ".jsonl", ".csv", ".parquet", ".txt", ".arrow", ".safetensors", ".bin")
HUB_ONLY_CALLS = frozenset({"hf_hub_download", "snapshot_download"})


class Problem(str, Enum):
    """What kind of thing a finding is: the runner acts on the kind, never on the wording."""

    SYNTAX = "syntax"  # the file does not parse
    MISSING_NAME = "missing-name"  # `model`, `tokenizer` or `trainer` is never defined at the top level
    HIDDEN_NAME = "hidden-name"  # ... only inside a function or behind the main guard
    PLATFORM_CALL = "platform-call"  # it trains or saves itself, which the platform does
    WRITES_OUTPUT = "writes-output"  # it writes into OUTPUT_DIR, which the platform replaces
    DECLARATION = "declaration"  # its METHOD_PARAMS is not in the documented form
    NO_CALLBACK = "no-callback"  # warning: a trainer built without `callbacks=[callback]`
    HUB_DOWNLOAD = "hub-download"  # warning: a model or dataset named by a hub id
    NEEDS_GPU = "needs-gpu"  # warning: bf16 (TRL's default too), fp16 or 4-bit on a machine without CUDA


WARNINGS = frozenset({Problem.NO_CALLBACK, Problem.HUB_DOWNLOAD, Problem.NEEDS_GPU})


@dataclass(frozen=True)
class Finding:
    problem: Problem
    message: str
    line: int | None = None


@dataclass
class CheckReport:
    findings: list[Finding] = field(default_factory=list)

    @property
    def errors(self) -> list[str]:
        return [f.message for f in self.findings if f.problem not in WARNINGS]

    @property
    def warnings(self) -> list[str]:
        return [f.message for f in self.findings if f.problem in WARNINGS]

    @property
    def ok(self) -> bool:
        return not self.errors

    def of(self, *problems: Problem) -> list[Finding]:
        return [f for f in self.findings if f.problem in problems]

    def add(self, problem: Problem, message: str, line: int | None = None) -> None:
        self.findings.append(Finding(problem, message, line))


def check_source(source: str, filename: str = "<method>", *, gpu: bool | None = None) -> CheckReport:
    """Check a method against the contract without running it.

    ``gpu``: whether the machine that runs it has CUDA (default: this one). In a DeepExtension
    file, the calls inside `training()` are not checked: the platform never calls it.
    """
    skip_functions = frozenset({TRAINING_FUNCTION}) if is_deepextension(source) else frozenset()
    report = CheckReport()
    try:
        tree = parse(source, filename)
    except SyntaxError as e:
        report.add(Problem.SYNTAX, f"Syntax error at line {e.lineno}: {e.msg}; fix that line.", e.lineno)
        return report
    _check_names(tree, report)
    try:
        declared_params(source)
    except MethodContractError as e:
        report.add(Problem.DECLARATION, str(e))
    nodes = _walk_skipping(tree, skip_functions)
    trainers = _trainer_names(nodes)
    for node in nodes:
        if isinstance(node, ast.Call):
            _check_call(node, trainers, report)
    _check_callbacks(nodes, report)
    if not (has_cuda() if gpu is None else gpu):
        for line, message in gpu_settings(nodes):
            report.add(Problem.NEEDS_GPU, message, line)
    return report


def _walk_skipping(tree: ast.AST, skip: frozenset[str]) -> list[ast.AST]:
    out: list[ast.AST] = []
    todo = [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name in skip:
            continue
        out.append(node)
        todo.extend(ast.iter_child_nodes(node))
    return sorted(out, key=lambda n: (getattr(n, "lineno", 0), getattr(n, "col_offset", 0)))


def is_main_guard(node: ast.AST) -> bool:
    """``if __name__ == "__main__":``"""
    if not isinstance(node, ast.If) or not isinstance(node.test, ast.Compare):
        return False
    parts = [node.test.left, *node.test.comparators]
    return (any(isinstance(p, ast.Name) and p.id == "__name__" for p in parts)
            and any(isinstance(p, ast.Constant) and p.value == "__main__" for p in parts))


def _bound_names(node: ast.AST) -> set[str]:
    """Names a statement binds in the scope it runs in (not inside nested functions)."""
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return {node.name}
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return {(a.asname or a.name).split(".")[0] for a in node.names}
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}


def _top_level(body: list[ast.stmt]) -> tuple[set[str], dict[str, tuple[str, int]]]:
    """(names bound by what runs at import, {name: (where, line)} for names bound only in a
    function body or behind the main guard)."""
    runs: set[str] = set()
    hidden: dict[str, tuple[str, int]] = {}
    for stmt in body:
        if isinstance(stmt, ast.If) and is_main_guard(stmt):
            for name in {n for s in stmt.body for n in _all_bound(s)}:
                hidden.setdefault(name, ('the `if __name__ == "__main__":` block', stmt.lineno))
            inner, more = _top_level(stmt.orelse)
            runs |= inner
            hidden.update({k: v for k, v in more.items() if k not in hidden})
        elif isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)):
            runs.add(stmt.name)
            for name in _all_bound(stmt) - {stmt.name}:
                hidden.setdefault(name, (f"the function `{stmt.name}()`", stmt.lineno))
        else:
            runs |= _bound_names(stmt)
    return runs, hidden


def _all_bound(node: ast.AST) -> set[str]:
    names: set[str] = set()
    for n in ast.walk(node):
        if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store):
            names.add(n.id)
        elif isinstance(n, (ast.Import, ast.ImportFrom)):
            names |= _bound_names(n)
        elif isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(n.name)
    return names


def _called_globals(body: list[ast.stmt]) -> set[str]:
    """Names that functions called at the top level bind with `global` (`def build(): global model`)."""
    functions = {s.name: s for s in body if isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef))}
    top = [s for s in body if not isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
           and not (isinstance(s, ast.If) and is_main_guard(s))]
    called = {n.func.id for s in top for n in ast.walk(s) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    return {name for f in called if f in functions for g in ast.walk(functions[f]) if isinstance(g, ast.Global)
            for name in g.names}


def _check_names(tree: ast.Module, report: CheckReport) -> None:
    runs, hidden = _top_level(tree.body)
    runs |= _called_globals(tree.body)
    places: dict[tuple[str, int], list[str]] = {}
    for name in REQUIRED_NAMES:
        if name in runs:
            continue
        if name in hidden:
            places.setdefault(hidden[name], []).append(f"`{name}`")
        else:
            report.add(Problem.MISSING_NAME, f"The method never defines `{name}`; define `model`, `tokenizer` and "
                                             "`trainer` between the marker lines.")
    for (where, line), names in places.items():
        listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
        verb = "is" if len(names) == 1 else "are"
        report.add(Problem.HIDDEN_NAME,
                   f"{listed} {verb} defined only inside {where} (line {line}), which the platform never runs: it "
                   "runs the file from top to bottom and never calls your functions. Move that code to the top "
                   "level, out of the function and the main guard.", line)


def call_name(node: ast.Call) -> str:
    func = node.func
    if isinstance(func, ast.Attribute):
        return func.attr
    if isinstance(func, ast.Name):
        return func.id
    return ""


def _trainer_names(nodes: list[ast.AST]) -> set[str]:
    """Names that hold a trainer: assigned from a `…Trainer(…)` call, or named like one."""
    names = {n.id for n in nodes if isinstance(n, ast.Name) and "trainer" in n.id.lower()}
    for node in nodes:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call) and \
                call_name(node.value).endswith("Trainer"):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    return names


def _mentions_output_dir(node: ast.AST) -> bool:
    return any((isinstance(n, ast.Name) and n.id == "OUTPUT_DIR")
               or (isinstance(n, ast.Attribute) and n.attr == "OUTPUT_DIR") for n in ast.walk(node))


def _check_call(node: ast.Call, trainers: set[str], report: CheckReport) -> None:
    name = call_name(node)
    receiver = node.func.value if isinstance(node.func, ast.Attribute) else None
    if name == "train" and receiver is not None and (
            (isinstance(receiver, ast.Name) and receiver.id in trainers)
            or (isinstance(receiver, ast.Call) and call_name(receiver).endswith("Trainer"))):
        shown = receiver.id if isinstance(receiver, ast.Name) else f"{call_name(receiver)}(…)"
        report.add(Problem.PLATFORM_CALL, f"Line {node.lineno} calls `{shown}.train()`; remove it: the platform "
                                          "calls trainer.train() itself, with resume and cancel.", node.lineno)
    elif name in SAVE_CALLS:
        report.add(Problem.PLATFORM_CALL, f"Line {node.lineno} calls `{name}()`; remove it: the platform saves "
                                          "the model and tokenizer atomically to OUTPUT_DIR.", node.lineno)
    elif name in WRITE_CALLS and _mentions_output_dir(node):
        report.add(Problem.WRITES_OUTPUT, f"Line {node.lineno} writes into OUTPUT_DIR (`{name}()`); the platform "
                                          "replaces that folder with the published model, so the file would be "
                                          "lost. Write it under `trainer.args.output_dir` (the job folder) instead.",
                   node.lineno)
    elif name in HUB_ONLY_CALLS or (name in HUB_CALLS and _hub_id(node)):
        report.add(Problem.HUB_DOWNLOAD, f"Line {node.lineno} downloads from a model hub (`{name}()`"
                                         + (f" of {_hub_id(node)!r}" if _hub_id(node) else "") + "); workers "
                                         "usually cannot reach one. Use MODEL_PATH and DATASET_PATH, which point "
                                         "at shared storage.", node.lineno)


def _hub_id(node: ast.Call) -> str | None:
    """The first argument when it is a literal that looks like `org/name` rather than a path."""
    if not node.args or not isinstance(node.args[0], ast.Constant) or not isinstance(node.args[0].value, str):
        return None
    value = node.args[0].value
    looks_like_path = value.startswith(("/", ".", "~")) or value.endswith(DATA_FILES)
    return value if value.count("/") == 1 and not looks_like_path else None


def _check_callbacks(nodes: list[ast.AST], report: CheckReport) -> None:
    for node in nodes:
        if not isinstance(node, ast.Call) or not call_name(node).endswith("Trainer"):
            continue
        cbs = {kw.arg: kw.value for kw in node.keywords}.get("callbacks")
        if cbs is None or "callback" not in {n.id for n in ast.walk(cbs) if isinstance(n, ast.Name)}:
            report.add(Problem.NO_CALLBACK, f"Line {node.lineno} builds `{call_name(node)}` without "
                                            "`callbacks=[callback]`; the platform attaches it anyway, but pass it "
                                            "so local runs match.", node.lineno)
