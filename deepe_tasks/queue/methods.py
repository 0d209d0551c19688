"""The method store: naming, listing, pinning by sha256, and the static contract check."""

from __future__ import annotations

import ast
import hashlib
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from deepe_tasks.core.errors import MethodExists, MethodNotFound

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
TEMPLATE = "custom-template.py"
LOCAL_TEST_TEMPLATE = "run_local_train_test_template.py"
BEGIN_MARKER = "#============ from here add your own train code"
END_MARKER = "#============ end here with your own train code"
REQUIRED_NAMES = ("model", "tokenizer", "trainer")


@dataclass(frozen=True)
class Method:
    name: str
    path: Path
    source: str

    @property
    def sha256(self) -> str:
        return sha256_of(self.source)

    @property
    def description(self) -> str:
        return describe(self.source)


def sha256_of(source: str) -> str:
    return hashlib.sha256(source.encode()).hexdigest()


def describe(source: str) -> str:
    """The first line of the method's module docstring, or an empty string."""
    try:
        doc = ast.get_docstring(ast.parse(source)) or ""
    except SyntaxError:
        return "(syntax error)"
    return doc.strip().splitlines()[0] if doc.strip() else ""


def _is_method_file(path: Path) -> bool:
    return path.suffix == ".py" and "template" not in path.stem and bool(NAME_RE.match(path.stem))


def list_methods(store: Path) -> list[Method]:
    if not store.is_dir():
        return []
    return [
        Method(p.stem, p, p.read_text(encoding="utf-8"))
        for p in sorted(store.glob("*.py"))
        if _is_method_file(p)
    ]


def load_method(store: Path, name: str) -> Method:
    """Resolve a method by name; nothing outside the store can be named."""
    if not NAME_RE.match(name) or "template" in name:
        raise MethodNotFound(
            f"{name!r} is not a method name: use the file stem of a method in the store "
            "(lower-case letters, digits, '-' and '_', such as 'sft-demo' or 'custom01')."
        )
    path = store / f"{name}.py"
    if not path.is_file():
        known = ", ".join(m.name for m in list_methods(store)) or "none"
        raise MethodNotFound(
            f"There is no method {name!r} in {store}; known methods: {known}. "
            f"Create one with `deepe methods new {name}`."
        )
    return Method(name, path, path.read_text(encoding="utf-8"))


def new_method(store: Path, name: str) -> Path:
    """Copy the custom template to ``<store>/<name>.py``; never overwrite."""
    if not NAME_RE.match(name) or "template" in name:
        raise MethodNotFound(
            f"{name!r} is not a valid method name: use lower-case letters, digits, '-' and '_', "
            "starting with a letter or digit, such as 'custom01'."
        )
    target = store / f"{name}.py"
    if target.exists():
        raise MethodExists(f"{target} already exists; pick another name or edit that file.")
    template = store / TEMPLATE
    if not template.is_file():
        raise MethodNotFound(f"The template {template} is missing; restore it from the repository.")
    shutil.copyfile(template, target)
    return target


@dataclass
class CheckReport:
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


def _call_name(node: ast.Call) -> str:
    func = node.func
    if isinstance(func, ast.Attribute):
        return func.attr
    if isinstance(func, ast.Name):
        return func.id
    return ""


def check_source(source: str, filename: str = "<method>") -> CheckReport:
    """Check a method against the contract without running it."""
    report = CheckReport()
    try:
        tree = ast.parse(source, filename=filename)
    except SyntaxError as e:
        report.errors.append(f"Syntax error at line {e.lineno}: {e.msg}; fix that line.")
        return report

    assigned: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            assigned.add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
            assigned.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            assigned.update((a.asname or a.name).split(".")[0] for a in node.names)
    for name in REQUIRED_NAMES:
        if name not in assigned:
            report.errors.append(
                f"The method never defines `{name}`; define `model`, `tokenizer` and `trainer` "
                "between the marker lines."
            )

    trainer_calls = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _call_name(node)
        receiver = node.func.value if isinstance(node.func, ast.Attribute) else None
        if name == "train" and isinstance(receiver, ast.Name) and "trainer" in receiver.id.lower():
            report.errors.append(
                f"Line {node.lineno} calls `{receiver.id}.train()`; remove it: the platform calls "
                "trainer.train() itself, with resume and cancel."
            )
        elif name in ("save_pretrained", "save_model", "push_to_hub"):
            report.errors.append(
                f"Line {node.lineno} calls `{name}()`; remove it: the platform saves the model "
                "and tokenizer atomically to OUTPUT_DIR."
            )
        elif name.endswith("Trainer"):
            trainer_calls.append(node)
    for node in trainer_calls:
        kwargs = {kw.arg: kw.value for kw in node.keywords}
        cbs = kwargs.get("callbacks")
        if cbs is None or "callback" not in {n.id for n in ast.walk(cbs) if isinstance(n, ast.Name)}:
            report.warnings.append(
                f"Line {node.lineno} builds `{_call_name(node)}` without `callbacks=[callback]`; "
                "the platform attaches it anyway, but pass it so local runs match."
            )
    return report
