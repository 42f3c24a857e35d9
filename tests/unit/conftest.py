"""Shared helpers of the unit tests (pure: no root, no kernel objects)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from scenarios import schema


@pytest.fixture
def tiny_data() -> dict:
    """The shipped `tiny` scenario as plain data, to mutate per test."""
    return yaml.safe_load((schema.SCENARIO_DIR / "tiny.yaml").read_text())


@pytest.fixture
def write_scenario(tmp_path):
    """write_scenario(data_or_text, name="bad.yaml") -> path (str) of a scenario file."""

    def write(content, name: str = "bad.yaml") -> str:
        path = Path(tmp_path) / name
        text = content if isinstance(content, str) else yaml.safe_dump(content, sort_keys=False)
        path.write_text(text)
        return str(path)

    return write
