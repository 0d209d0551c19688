"""The method store: naming, listing, creating from the template, and pinning by sha256."""

from __future__ import annotations

import ast
import hashlib
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from deepe_tasks.core.errors import MethodExists, MethodNotFound

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
TEMPLATE = "custom-template.py"
BEGIN_MARKER = "#============ from here add your own train code"
END_MARKER = "#============ end here with your own train code"


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


def _check_name(name: str) -> None:
    if not NAME_RE.match(name) or "template" in name:
        raise MethodNotFound(
            f"{name!r} is not a method name: use lower-case letters, digits, '-' and '_', starting with a "
            "letter or digit, such as 'sft-demo' or 'custom01'."
        )


def load_method(store: Path, name: str) -> Method:
    """Resolve a method by name; nothing outside the store can be named."""
    _check_name(name)
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
    _check_name(name)
    target = store / f"{name}.py"
    if target.exists():
        raise MethodExists(f"{target} already exists; pick another name or edit that file.")
    template = store / TEMPLATE
    if not template.is_file():
        raise MethodNotFound(f"The template {template} is missing; restore it from the repository.")
    shutil.copyfile(template, target)
    return target
