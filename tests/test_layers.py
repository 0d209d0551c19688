"""The layout's rules are enforced: `lint-imports` passes on the package, and fails on a copy
of it with one deliberate upward import, or a training library imported on the submit side."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINT = Path(sys.executable).with_name("lint-imports")


def lint(root: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([str(LINT), "--no-cache", "--config", str(root / "pyproject.toml")], cwd=root, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture
def copy(tmp_path: Path) -> Path:
    shutil.copytree(ROOT / "deepe_tasks", tmp_path / "deepe_tasks", ignore=shutil.ignore_patterns("__pycache__", "static"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def test_the_package_keeps_its_layers() -> None:
    done = lint(ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout


def test_an_upward_import_breaks_the_layers(copy: Path) -> None:
    keys = copy / "deepe_tasks" / "core" / "keys.py"
    keys.write_text(keys.read_text() + "\nfrom deepe_tasks.worker import tasks  # noqa\n")
    done = lint(copy)
    assert done.returncode == 1 and "BROKEN" in done.stdout, done.stdout + done.stderr
    assert "deepe_tasks.core.keys -> deepe_tasks.worker.tasks" in done.stdout


def test_a_training_library_on_the_submit_side_is_refused(copy: Path) -> None:
    client = copy / "deepe_tasks" / "queue" / "client.py"
    client.write_text(client.read_text() + "\n\ndef _late() -> None:\n    import transformers  # noqa\n")
    done = lint(copy)
    assert done.returncode == 1 and "deepe_tasks.queue.client -> transformers" in done.stdout, done.stdout
