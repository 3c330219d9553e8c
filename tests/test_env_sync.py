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


def _makefile_llama_flags() -> list[str]:
    text = (REPO_ROOT / "Makefile").read_text()
    line = next(l for l in text.splitlines() if l.startswith("LLAMA_CMAKE_ARGS"))
    return line.split(":=", 1)[1].split()


def test_llama_cpp_is_built_portably_the_same_way_everywhere():
    """make setup and environment.yml build llama-cpp-python with the same portable flags: no
    native tuning, never AVX-512 or AMX (the SIGILL class of crash), and never from pip's cache."""
    flags = _makefile_llama_flags()
    assert "-DGGML_NATIVE=OFF" in flags and "-DGGML_AVX2=ON" in flags
    for off in ("GGML_AVX512", "GGML_AMX_TILE", "GGML_AMX_INT8", "GGML_AMX_BF16"):
        assert f"-D{off}=OFF" in flags, off
    env_line = next(l for l in (REPO_ROOT / "environment.yml").read_text().splitlines()
                    if "llama-cpp-python" in l and "==" in l)
    env_flags = ["-D" + part.split("cmake.define.", 1)[1] for part in env_line.split()
                 if part.startswith("--config-settings=cmake.define.")]
    assert env_flags == flags
    make = (REPO_ROOT / "Makefile").read_text()
    install = [l for l in make.splitlines() if "--no-binary llama-cpp-python" in l]
    assert install and all("--no-cache-dir" in make for _ in install)
    assert 'CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)"' in make
    assert "make test" in (REPO_ROOT / ".ci" / "run").read_text()
