"""A method's own parameters, declared in one place in its file and read without running it.

    METHOD_PARAMS = {
        "temperature": (float, 0.7, "sampling temperature, 0 to 2"),
    }

Each entry is NAME: (type, default, help), with NAME plain ASCII (``NAME``) and type one of int,
float, bool, str or Path (pathlib's: an input file or folder, resolved under DEEPE_STORAGE and
held to the same rule as DATASET_PATH). A declared parameter is validated at submit like a
platform parameter (a CLI string becomes its type), gets its default when not given, and
reaches the method in ``params`` (a Path as the absolute path, a string).
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import Field, FiniteFloat, TypeAdapter, ValidationError

from deepe_tasks.contract.parsing import parse
from deepe_tasks.core.errors import InvalidParams, MethodContractError
from deepe_tasks.core.validate import MAX_INT_BITS, shown

DECLARATION = "METHOD_PARAMS"
MAX_NAME = 64
NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")
INT64 = Annotated[int, Field(ge=-(2**MAX_INT_BITS), le=2**MAX_INT_BITS - 1)]
# What each type's value is checked as: no infinite float, no integer past 64 bits.
TYPES: dict[str, Any] = {"int": INT64, "float": FiniteFloat, "bool": bool, "str": str, "Path": str}
PATH = "Path"


@dataclass(frozen=True)
class Declared:
    name: str
    type: str
    default: Any
    help: str

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "type": self.type, "default": self.default, "help": self.help}


def declared_params(source: str) -> dict[str, Declared]:
    """The parameters a method declares in ``METHOD_PARAMS``; {} when it declares none.

    Raises MethodContractError for a declaration that is not in the documented form.
    """
    try:
        tree = parse(source)
    except SyntaxError:
        return {}
    for stmt in tree.body:
        if isinstance(stmt, ast.Assign) and any(isinstance(t, ast.Name) and t.id == DECLARATION
                                                for t in stmt.targets):
            return _read(stmt)
    return {}


def _read(stmt: ast.Assign) -> dict[str, Declared]:
    line = stmt.lineno
    form = (f"{DECLARATION} at line {line} must be a dict of NAME: (type, default, help), with type int, "
            "float, bool or str, and literal values, such as {\"temperature\": (float, 0.7, \"sampling "
            "temperature\")}.")
    if not isinstance(stmt.value, ast.Dict):
        raise MethodContractError(form)
    out: dict[str, Declared] = {}
    for key, value in zip(stmt.value.keys, stmt.value.values):
        if not (isinstance(key, ast.Constant) and isinstance(key.value, str) and isinstance(value, ast.Tuple)
                and len(value.elts) == 3):
            raise MethodContractError(form)
        kind, default, help_ = value.elts
        type_name = kind.id if isinstance(kind, ast.Name) else getattr(kind, "value", None)
        try:
            default_value, help_text = ast.literal_eval(default), ast.literal_eval(help_)
        except ValueError:
            raise MethodContractError(form) from None
        if type_name not in TYPES or not isinstance(help_text, str):
            raise MethodContractError(form)
        name = key.value
        # A name reaches an HTML form, a CLI flag (-p NAME=value) and a log line: ASCII letters,
        # digits, '_', '-' and '.', starting with a letter or '_' (no quote, space, '=' or '<').
        if not (NAME.fullmatch(name) and len(name) <= MAX_NAME):
            raise MethodContractError(f"{DECLARATION} at line {line} declares the name {shown(name, 40)}; a "
                                      f"parameter's name must be ASCII letters, digits, '_', '-' and '.', starting "
                                      f"with a letter or '_', at most {MAX_NAME} characters, such as "
                                      "\"temperature\" or \"max-new-tokens\"; rename it.")
        out[name] = Declared(name, str(type_name), default_value, help_text)
    return out


def apply_declared(values: dict[str, Any], declared: dict[str, Declared]) -> dict[str, Any]:
    """The declared parameters, converted to their types, with defaults for those not given."""
    out: dict[str, Any] = {}
    for name, spec in declared.items():
        if name not in values or values[name] is None:
            out[name] = spec.default
            continue
        try:
            out[name] = TypeAdapter(TYPES[spec.type]).validate_python(values[name])
        except ValidationError as e:
            reason = e.errors()[0]["msg"]
            raise InvalidParams(f"{name}={shown(values[name])} is not valid ({reason}); allowed: {spec.type}, "
                                f"{spec.help}.") from e
    return out
