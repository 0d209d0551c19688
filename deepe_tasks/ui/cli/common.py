"""What every `deepe` command shares: the Typer apps, exit codes, options and error output."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.text import Text

from deepe_tasks.core.errors import InvalidParams

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="deepe: queue LLM fine-tuning jobs on GPU workers and follow them.")
methods_app = typer.Typer(no_args_is_help=True, help="List, create and check training methods.")
app.add_typer(methods_app, name="methods")
# Piped or redirected, lines are not cut at 80 columns: a script gets whole ids and paths.
console = Console() if sys.stdout.isatty() else Console(width=1000)
err = Console(stderr=True, soft_wrap=True)

ParamOpt = Annotated[list[str] | None, typer.Option("--param", "-p", help="KEY=VALUE, repeatable.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def show_error(message: str) -> None:
    err.print(Text("error: ", style="red") + Text(message))


def fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    show_error(message)
    raise typer.Exit(code)


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def parse_kv(pairs: list[str] | None, params_file: Path | None) -> dict[str, Any]:
    params: dict[str, Any] = {}
    if params_file is not None:
        try:
            loaded = json.loads(params_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:  # a UnicodeDecodeError too: the file is not UTF-8
            raise InvalidParams(f"Could not read the parameters file {params_file}: {e}; give a JSON object of "
                                "KEY: value.") from None
        if not isinstance(loaded, dict):
            raise InvalidParams(f"The parameters file {params_file} holds a {type(loaded).__name__}, not a JSON "
                                "object; give an object of KEY: value.")
        params.update(loaded)
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise InvalidParams(f"-p {pair!r} is not KEY=VALUE; write it as -p MAX_STEPS=100.")
        params[key.strip()] = value
    return params
