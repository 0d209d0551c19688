"""The static contract check of a method: what `deepe methods check` reports, without running it."""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from enum import Enum

REQUIRED_NAMES = ("model", "tokenizer", "trainer")


class Problem(str, Enum):
    """What kind of thing a finding is: the runner acts on the kind, never on the wording."""

    SYNTAX = "syntax"  # the file does not parse
    MISSING_NAME = "missing-name"  # `model`, `tokenizer` or `trainer` is never defined
    PLATFORM_CALL = "platform-call"  # it trains or saves itself, which the platform does
    NO_CALLBACK = "no-callback"  # a warning: a trainer built without `callbacks=[callback]`


@dataclass(frozen=True)
class Finding:
    problem: Problem
    message: str
    line: int | None = None


@dataclass
class CheckReport:
    findings: list[Finding] = field(default_factory=list)

    WARNINGS = frozenset({Problem.NO_CALLBACK})

    @property
    def errors(self) -> list[str]:
        return [f.message for f in self.findings if f.problem not in self.WARNINGS]

    @property
    def warnings(self) -> list[str]:
        return [f.message for f in self.findings if f.problem in self.WARNINGS]

    @property
    def ok(self) -> bool:
        return not self.errors

    def of(self, *problems: Problem) -> list[Finding]:
        return [f for f in self.findings if f.problem in problems]

    def add(self, problem: Problem, message: str, line: int | None = None) -> None:
        self.findings.append(Finding(problem, message, line))


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
        report.add(Problem.SYNTAX, f"Syntax error at line {e.lineno}: {e.msg}; fix that line.", e.lineno)
        return report
    _check_names(tree, report)
    _check_calls(tree, report)
    return report


def _check_names(tree: ast.AST, report: CheckReport) -> None:
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
            report.add(Problem.MISSING_NAME, f"The method never defines `{name}`; define `model`, `tokenizer` and "
                                             "`trainer` between the marker lines.")


def _check_calls(tree: ast.AST, report: CheckReport) -> None:
    trainer_calls = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _call_name(node)
        receiver = node.func.value if isinstance(node.func, ast.Attribute) else None
        if name == "train" and isinstance(receiver, ast.Name) and "trainer" in receiver.id.lower():
            report.add(Problem.PLATFORM_CALL, f"Line {node.lineno} calls `{receiver.id}.train()`; remove it: the "
                                              "platform calls trainer.train() itself, with resume and cancel.",
                       node.lineno)
        elif name in ("save_pretrained", "save_model", "push_to_hub"):
            report.add(Problem.PLATFORM_CALL, f"Line {node.lineno} calls `{name}()`; remove it: the platform saves "
                                              "the model and tokenizer atomically to OUTPUT_DIR.", node.lineno)
        elif name.endswith("Trainer"):
            trainer_calls.append(node)
    for node in trainer_calls:
        kwargs = {kw.arg: kw.value for kw in node.keywords}
        cbs = kwargs.get("callbacks")
        if cbs is None or "callback" not in {n.id for n in ast.walk(cbs) if isinstance(n, ast.Name)}:
            report.add(Problem.NO_CALLBACK, f"Line {node.lineno} builds `{_call_name(node)}` without "
                                            "`callbacks=[callback]`; the platform attaches it anyway, but pass it "
                                            "so local runs match.", node.lineno)
