"""What ships: the agent never imports the sandbox, and `make image` needs no test setup.

The image leaves pykubeproxy.sandbox out (the Dockerfile removes it; tests/image checks the
image). Here the agent's import graph is followed from its entry point through every
``import`` in the package, those inside functions included (the agent imports its heavier
modules late), and must not reach the sandbox.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "pykubeproxy"
ENTRY_POINTS = ("pykubeproxy.cli", "pykubeproxy.__main__")


def module_path(name: str) -> Path | None:
    relative = Path(*name.split("."))
    for candidate in (REPO / relative.with_suffix(".py"), REPO / relative / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


def imports_of(name: str) -> set[str]:
    """The pykubeproxy modules a module imports, anywhere in its code."""
    path = module_path(name)
    assert path is not None, name
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {n for n in found if n.startswith("pykubeproxy") and module_path(n) is not None}


def agent_modules() -> set[str]:
    seen: set[str] = set()
    todo = list(ENTRY_POINTS)
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(imports_of(name))
    return seen


def test_the_agent_never_imports_the_sandbox() -> None:
    modules = agent_modules()
    assert {"pykubeproxy.kube", "pykubeproxy.iptables.applier", "pykubeproxy.ipvs.applier"} <= (
        modules
    )
    assert not [m for m in modules if m.startswith("pykubeproxy.sandbox")]


def test_make_image_needs_docker_and_python_only() -> None:
    """`make image` builds its wheelhouse with a venv of its own, not the test setup."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    plan = subprocess.run(
        ["make", "--dry-run", "--always-make", "-C", str(REPO), "image"],
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    assert plan.returncode == 0, plan.stderr
    assert "install-system-deps" not in plan.stdout and "[dev]" not in plan.stdout
    assert "python3 -m venv build/venv" in plan.stdout and "docker build" in plan.stdout
