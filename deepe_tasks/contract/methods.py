"""Methods: the built-in ones shipped in the package and the user's store (DEEPE_METHOD_STORE);
naming, listing, creating from the template, and pinning by sha256."""

from __future__ import annotations

import ast
import difflib
import hashlib
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deepe_tasks.contract.parsing import parse
from deepe_tasks.core.errors import MethodContractError, MethodExists, MethodNotFound

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
TEMPLATE = "custom-template.py"
BUILTIN = Path(__file__).resolve().parent.parent / "builtin"  # SFT-Demo, GRPO-Demo and the templates
BEGIN_MARKER = "#============ from here add your own train code"
END_MARKER = "#============ end here with your own train code"


@dataclass(frozen=True)
class Method:
    name: str
    path: Path
    source: str
    builtin: bool = False
    problem: str = ""  # why the file cannot be used (not UTF-8, unreadable); its source is then ""

    @property
    def kind(self) -> str:
        return "built-in" if self.builtin else "store"

    @property
    def sha256(self) -> str:
        return sha256_of(self.source)

    @property
    def description(self) -> str:
        return f"(unusable: {self.problem})" if self.problem else describe(self.source)


def sha256_of(source: str) -> str:
    return hashlib.sha256(source.encode()).hexdigest()


def describe(source: str) -> str:
    """The first line of the method's module docstring, or an empty string."""
    try:
        doc = ast.get_docstring(parse(source)) or ""
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return "(syntax error)"
    return doc.strip().splitlines()[0] if doc.strip() else ""


def _is_method_file(path: Path) -> bool:
    return path.suffix == ".py" and "template" not in path.stem and bool(NAME_RE.match(path.stem))


def read_source(path: Path) -> tuple[str, str]:
    """(the file's text, "") or ("", why it cannot be read): one bad file in the store must not
    break the listing of every other."""
    try:
        return path.read_text(encoding="utf-8"), ""
    except UnicodeDecodeError as e:
        return "", (f"the file is not UTF-8 text (byte 0x{e.object[e.start]:02X} at offset {e.start}); save it "
                    "as UTF-8")
    except OSError as e:
        return "", f"the file cannot be read ({e.strerror or e}); check its permissions"


def _in(folder: Path, builtin: bool) -> dict[str, Method]:
    if not folder.is_dir():
        return {}
    found = {}
    for path in sorted(folder.glob("*.py")):
        if _is_method_file(path):
            source, problem = read_source(path)
            found[path.stem] = Method(path.stem, path, source, builtin, problem)
    return found


def list_methods(store: Path) -> list[Method]:
    """The built-in methods and the store's, by name; a store method of a built-in's name wins."""
    found = {**_in(BUILTIN, True), **_in(store, False)}
    return [found[name] for name in sorted(found)]


def _check_name(name: str) -> None:
    if name.endswith(".py"):
        stem = Path(name).stem
        raise MethodNotFound(
            f"{name!r} is a file path; submit takes a method's name: its file name without .py, in the method "
            f"store (DEEPE_METHOD_STORE). Give {stem!r} if the file is in the store, or copy it there first "
            f"(`cp {name} $DEEPE_METHOD_STORE/`); `deepe run-local` runs a file where it is."
        )
    if not NAME_RE.match(name) or "template" in name:
        raise MethodNotFound(
            f"{name!r} is not a method name: use lower-case letters, digits, '-' and '_', starting with a "
            "letter or digit, such as 'sft-demo' or 'custom01'."
        )


def load_method(store: Path, name: str) -> Method:
    """Resolve a method by name, in the store and then among the built-ins; nothing else can be named."""
    _check_name(name)
    for folder, builtin in ((store, False), (BUILTIN, True)):
        path = folder / f"{name}.py"
        if path.is_file():
            source, problem = read_source(path)
            if problem:
                raise MethodContractError(f"The method {name!r} ({path}) cannot be used: {problem}.")
            return Method(name, path, source, builtin)
    names = [m.name for m in list_methods(store)]
    meant = difflib.get_close_matches(name.lower().replace("_", "-"), names, n=1, cutoff=0.75) or \
        difflib.get_close_matches(name, names, n=1, cutoff=0.75)
    if meant:
        raise MethodNotFound(f"There is no method {name!r}: did you mean {meant[0]!r}? (`deepe methods list` "
                             f"lists them all; `deepe methods new {name}` creates a new one.)")
    raise MethodNotFound(
        f"There is no method {name!r} in the store {store} (DEEPE_METHOD_STORE) or among the built-in ones; "
        f"known methods: {', '.join(names)}. Create one with `deepe methods new {name}`, or point "
        "DEEPE_METHOD_STORE at the folder that holds it."
    )


def new_method(store: Path, name: str) -> Path:
    """Copy the custom template to ``<store>/<name>.py``; never overwrite."""
    _check_name(name)
    target = store / f"{name}.py"
    if (BUILTIN / f"{name}.py").is_file():
        raise MethodExists(f"{name!r} is a built-in method; pick another name for yours (a file of that name in "
                           "the store would take its place).")
    if target.exists():
        raise MethodExists(f"{target} already exists; pick another name or edit that file.")
    store.mkdir(parents=True, exist_ok=True)
    template = store / TEMPLATE if (store / TEMPLATE).is_file() else BUILTIN / TEMPLATE
    shutil.copyfile(template, target)
    return target


def file_kind(source: str) -> str:
    """"deepe" for a method of this contract; "DeepExtension" for a DeepExtension custom method."""
    from deepe_tasks.contract.deepext import is_deepextension

    return "DeepExtension" if is_deepextension(source) else "deepe"


def describe_method(method: Method) -> dict[str, Any]:
    """What `deepe methods show` and `GET /methods/{name}` tell: the method and its parameters."""
    from deepe_tasks.contract.declared import declared_params
    from deepe_tasks.contract.params import TrainParams

    platform = [{"name": name, "type": _type_name(info.annotation), "default": None if info.is_required() else
                 info.default, "help": info.description or "", "declared_by": "platform"}
                for name, info in TrainParams.model_fields.items()]
    description = method.description
    try:
        own = [{**d.as_dict(), "declared_by": "method"} for d in declared_params(method.source).values()]
    except MethodContractError as e:  # listed with the reason, as a file that is not UTF-8 is
        own, description = [], f"(unusable: {e})"
    return {"name": method.name, "kind": method.kind, "file_kind": file_kind(method.source), "path": str(method.path),
            "description": description, "sha256": method.sha256, "params": platform + own}


def _type_name(annotation: Any) -> str:
    return str(getattr(annotation, "__name__", annotation)).replace("typing.", "").replace("NoneType", "None")
