"""The three floors, read from every module's imports (top level and inside functions alike).

Ground floor: ``crowdfl/`` (the core) imports no role, no simulator, no bench. First floor: the
roles ``agent/``, ``edge_server/``, ``coordinator/`` side by side, each importing only the core
and itself. Top floor: ``crowdfl_sim/`` (the demo and the ``crowdfl`` command) and ``bench/``,
which may import anything below; nothing below imports them.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CORE = "crowdfl"
ROLES = ("agent", "edge_server", "coordinator")
TOP = ("crowdfl_sim", "bench")
FIRST_PARTY = (CORE, *ROLES, *TOP, "tests")


def _package_of(module: str) -> str:
    return module.split(".", 1)[0]


def imported_packages(path: Path, own_package: str | None = None) -> set[tuple[str, int]]:
    """(first-party top-level package, line) for every import in the file, relative ones resolved."""
    tree = ast.parse(path.read_text(), str(path))
    own = (own_package,) if own_package else path.relative_to(REPO).parts
    found: set[tuple[str, int]] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: inside the file's own top-level package (climbing out is an ImportError)
                names = [own[0]]
            else:
                names = [node.module or ""]
        else:
            continue
        for name in names:
            pkg = _package_of(name)
            if pkg in FIRST_PARTY:
                found.add((pkg, node.lineno))
    return found


def modules(package: str) -> list[Path]:
    return sorted(p for p in (REPO / package).rglob("*.py") if "node_modules" not in p.parts)


def allowed(package: str) -> set[str]:
    if package == CORE:
        return {CORE}
    if package in ROLES:
        return {CORE, package}
    return {CORE, *ROLES, *TOP, "tests"}  # the top floor; benches reuse the real-part harness of tests/support


@pytest.mark.parametrize("package", [CORE, *ROLES, *TOP])
def test_no_import_climbs_a_floor(package: str) -> None:
    files = modules(package)
    assert files, f"no modules under {package}/"
    bad = [
        f"{p.relative_to(REPO)}:{line} imports {imported}"
        for p in files
        for imported, line in sorted(imported_packages(p))
        if imported not in allowed(package)
    ]
    assert not bad, "imports from a higher floor or a sibling role:\n" + "\n".join(bad)


def test_the_checker_sees_hidden_imports(tmp_path: Path) -> None:
    """The rule is only as good as the parser: imports hidden in a function or a try count too."""
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import numpy\n"
        "def f():\n    from agent.sources import X\n"
        "    try:\n        import crowdfl_sim.demo as d\n    except ImportError:\n        pass\n"
        "from .task import y\n"
    )
    found = imported_packages(probe, own_package="crowdfl")
    assert found == {("agent", 3), ("crowdfl_sim", 5), ("crowdfl", 8)}


def test_the_device_reads_its_kinds_without_the_generator() -> None:
    """The agent's modules take the device kinds from crowdfl.devices; the generator is loaded only
    inside the simulated source (a device with real plugs never imports it)."""
    for p in modules("agent"):
        tree = ast.parse(p.read_text())
        for node in tree.body:  # module level only
            if isinstance(node, ast.ImportFrom) and node.module == "crowdfl.household":
                pytest.fail(f"{p.relative_to(REPO)}:{node.lineno} imports the household generator at module level")
