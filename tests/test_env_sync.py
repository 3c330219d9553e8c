"""pyproject.toml and environment.yml pin the same versions."""
from __future__ import annotations

import re
import tomllib

from brewslm_helpers.paths import REPO_ROOT


def _pins(lines):
    pins = {}
    for line in lines:
        m = re.match(r"^\s*([A-Za-z0-9_.\-]+)(\[[^\]]*\])?\s*==\s*([^\s;#]+)", line)
        if m:
            pins[m.group(1).lower().replace("_", "-")] = m.group(3)
    return pins


def test_pyproject_and_environment_pin_the_same_versions():
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    py_pins = _pins(project["dependencies"] + project["optional-dependencies"]["test"])
    env_lines = [l.strip().lstrip("- ").strip() for l in (REPO_ROOT / "environment.yml").read_text().splitlines()]
    env_pins = _pins(env_lines)
    assert len(py_pins) == len(project["dependencies"]) + len(project["optional-dependencies"]["test"]), \
        "every dependency must be pinned with =="
    assert py_pins == env_pins
    assert py_pins["torch"] == "2.13.0"
    assert any(l.startswith("python=3.11") for l in env_lines)
