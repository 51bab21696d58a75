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


# what a write looks like in the coordinator: a session transaction, a row added, merged or deleted,
# bytes put in the store, a message published, a chain transaction (every one goes through contracts)
_WRITE_CALLS = frozenset({"begin", "add", "add_all", "merge", "delete", "commit", "flush", "put", "publish", "execute"})
_WRITE_NAMES = frozenset({"contracts", "insert", "update", "delete", "IntegrityError"})


def writes_in(path: Path) -> list[str]:
    """Every spelling of a write in a module: the calls above, any mention of the chain or of
    SQL's insert/update/delete, any attribute set outside ``__init__`` (a row's attribute set inside
    a session is how the ORM updates) and any item set on ``self`` except the spec cache."""
    tree = ast.parse(path.read_text(), str(path))
    found: list[str] = []
    inits = {id(n) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) and f.name == "__init__" for n in ast.walk(f)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in _WRITE_CALLS:
            found.append(f"{node.lineno}: .{node.func.attr}(…)")
        elif isinstance(node, ast.Name) and node.id in _WRITE_NAMES or isinstance(node, ast.Attribute) and node.attr in _WRITE_NAMES:
            found.append(f"{node.lineno}: {getattr(node, 'id', getattr(node, 'attr', ''))}")
        elif isinstance(node, ast.alias) and node.name in _WRITE_NAMES:
            found.append(f"imports {node.name}")
        elif isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)) and id(node) not in inits:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                text = ast.unparse(t)
                # a local dict being built is not a write; an attribute set (an ORM row's) or an item of self's is
                if isinstance(t, ast.Attribute) or isinstance(t, ast.Subscript) and text.startswith("self.") and not text.startswith("self._specs["):
                    found.append(f"{node.lineno}: {text} = …")
    return sorted(found, key=lambda f: int(f.split(":")[0]) if f[0].isdigit() else 0)


def test_the_coordinators_views_write_nothing() -> None:
    """coordinator/views.py serves the API and the dashboard: reads only (its one state, the spec
    cache, is filled from the database and never changes a row)."""
    assert writes_in(REPO / "coordinator" / "views.py") == []


def test_the_write_checker_sees_writes(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text(
        "class V:\n"
        "    def __init__(self, s):\n        self.s = s\n"
        "    def a(self):\n        with self.sessions.begin() as s:\n            pass\n"
        "    def b(self, row):\n        row.status = 'done'\n"
        "    def c(self):\n        return self.store.put(b'x')\n"
        "    def d(self):\n        return self.contracts.is_claimed(1)\n"
        "    def e(self, k):\n        self._specs[k] = 1\n        self.cache[k] = 2\n"
    )
    found = writes_in(probe)
    assert [f.split(":")[0] for f in found] == ["5", "8", "10", "12", "15"], found
