"""The unit tier: no Redis (the session points deepe at a port nothing listens on), no worker,
no training library. `pytest tests/unit` runs it alone, in seconds."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import pytest

HEAVY = ("torch", "transformers", "trl", "peft", "datasets")


@pytest.fixture(scope="session", autouse=True)
def _stays_light() -> Iterator[None]:
    yield
    if os.environ.get("DEEPE_REDIS_URL") == "redis://127.0.0.1:9/0":  # the unit tier run alone
        heavy = [m for m in HEAVY if m in sys.modules]
        assert not heavy, f"a unit test imported {', '.join(heavy)}: it belongs in another tier"
