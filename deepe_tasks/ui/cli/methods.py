"""`deepe methods …` and `deepe run-local`: the method store and a local test run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from deepe_tasks.core.settings import get_settings
from deepe_tasks.ui.cli.common import (
    EXIT_FAILED,
    EXIT_USAGE,
    JsonOpt,
    ParamOpt,
    app,
    console,
    err,
    methods_app,
    parse_kv,
    print_json,
)


@methods_app.command("list")
def methods_list(as_json: JsonOpt = False) -> None:
    """Show the built-in methods and those in the store (DEEPE_METHOD_STORE), with descriptions."""
    from deepe_tasks.contract.methods import list_methods

    found = list_methods(get_settings().method_root)
    if as_json:
        print_json([{"name": m.name, "kind": m.kind, "description": m.description,
                     "sha256": None if m.problem else m.sha256, "path": str(m.path), "problem": m.problem or None}
                    for m in found])
        return
    table = Table("method", "kind", "description", "sha256")
    for m in found:
        # A file that cannot be read is listed with the reason, never a traceback that hides the rest.
        table.add_row(m.name, m.kind, Text(m.description, style="red" if m.problem else ""),
                      "-" if m.problem else m.sha256[:12])
    console.print(table)


@methods_app.command("show")
def methods_show(name: str, as_json: JsonOpt = False) -> None:
    """Show a method: where it is, what kind of file it is, and the parameters it takes."""
    from deepe_tasks.contract.methods import describe_method, load_method

    info = describe_method(load_method(get_settings().method_root, name))
    if as_json:
        print_json(info)
        return
    # As Text, never markup: a docstring or a help text may hold "[/]".
    console.print(Text(info["name"], style="bold") + Text(f" ({info['kind']}, {info['file_kind']} file) {info['path']}"),
                  highlight=False, soft_wrap=True)
    if info["description"]:
        console.print(Text(info["description"]), highlight=False, soft_wrap=True)
    table = Table("parameter", "type", "default", "what", title="parameters")
    for p in info["params"]:
        table.add_row(Text(p["name"]), p["type"], Text(repr(p["default"])), Text(p["help"]))
    console.print(table)


@methods_app.command("new")
def methods_new(name: str) -> None:
    """Copy the custom template to NAME.py in the method store (never overwrites)."""
    from deepe_tasks.contract.methods import new_method

    path = new_method(get_settings().method_root, name)
    console.print(Text(f"Created {path}. Paste your training code between the marker lines, then "
                       f"`deepe methods check {name}`."), soft_wrap=True)


@methods_app.command("check")
def methods_check(name: str) -> None:
    """Check a method against the contract without running it."""
    from deepe_tasks.contract.check import check_source
    from deepe_tasks.contract.methods import file_kind, load_method

    method = load_method(get_settings().method_root, name)
    report = check_source(method.source, method.path.name)
    console.print(f"{name}: a {file_kind(method.source)} method file ({method.path})", highlight=False, soft_wrap=True,
                  markup=False)
    for line in report.errors:
        console.print(Text("error: ", style="red") + Text(line), soft_wrap=True)
    for line in report.warnings:
        console.print(Text("warning: ", style="yellow") + Text(line), soft_wrap=True)
    if not report.ok:
        raise typer.Exit(EXIT_FAILED)
    console.print(f"{name}: OK ({method.sha256[:12]})")


@app.command("run-local")
def run_local_cmd(
    method: Annotated[str, typer.Argument(help="A method name in the store, or a path to a .py file.")],
    param: ParamOpt = None,
    params_file: Annotated[Path | None, typer.Option(help="A JSON file of parameters.")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Also print tracebacks.")] = False,
) -> None:
    """Run a method in this process through the worker's runner: no queue, no Redis."""
    from deepe_tasks.core.errors import DeepeError
    from deepe_tasks.ui.local import find_method_file, run_local

    try:
        params = parse_kv(param, params_file)
        code = run_local(find_method_file(method), params,
                         echo=lambda line: console.print(line, highlight=False, markup=False), verbose=verbose)
    except DeepeError as e:  # a wrong method or parameter: one line, as docs/methods.md says
        err.print(Text("FAILED: ", style="red") + Text(str(e)))
        raise typer.Exit(EXIT_USAGE) from None
    raise typer.Exit(code)
