"""The committed contracts/build/*.json are exactly what the pinned solc makes of contracts/src."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.realparts import require_real_part

REPO = Path(__file__).resolve().parents[2]
CONTRACTS = REPO / "contracts"
BUILD = CONTRACTS / "build"
PINNED_SOLC = "0.8.37"
ARTIFACTS = ("Registry", "CrowdTasks", "ReentrantPayout")


def _missing(reason: str) -> None:
    """A missing toolchain skips locally but fails in CI, where .ci/run must have installed it."""
    require_real_part("solc (npm)", False, f"{reason}; install with `npm ci --prefix contracts`")


def _artifact(name: str) -> dict:  # type: ignore[type-arg]
    return json.loads((BUILD / f"{name}.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize("name", ARTIFACTS)
def test_artifact_matches_current_sources(name: str) -> None:
    """Cheap staleness check that needs no node: the recorded source hashes are current."""
    art = _artifact(name)
    sources = sorted(p.name for p in (CONTRACTS / "src").glob("*.sol"))
    assert sorted(Path(k).name for k in art["sources"]) == sources
    for rel, digest in art["sources"].items():
        assert hashlib.sha256((CONTRACTS / rel).read_bytes()).hexdigest() == digest, f"{rel} changed: rebuild"
    assert art["sourceSha256"] == art["sources"][f"src/{name}.sol"]
    assert art["compiler"]["version"].startswith(f"{PINNED_SOLC}+")
    assert art["settings"] == {"evmVersion": "london", "optimizer": {"enabled": True, "runs": 200}}


def _opcodes(code: bytes) -> list[int]:
    """Opcodes of runtime code, skipping PUSH data and the trailing CBOR metadata."""
    meta_len = int.from_bytes(code[-2:], "big") + 2
    code = code[:-meta_len]
    ops, i = [], 0
    while i < len(code):
        op = code[i]
        ops.append(op)
        i += 1 + (op - 0x5F if 0x60 <= op <= 0x7F else 0)
    return ops


@pytest.mark.parametrize("name", ARTIFACTS)
def test_bytecode_is_london(name: str) -> None:
    """PUSH0 (0x5f, Shanghai) would not run on the EthereumJS Clique chain."""
    runtime = bytes.fromhex(_artifact(name)["deployedBytecode"][2:])
    assert 0x5F not in _opcodes(runtime)


def test_solc_is_pinned_exactly() -> None:
    package = json.loads((CONTRACTS / "package.json").read_text())
    lock = json.loads((CONTRACTS / "package-lock.json").read_text())
    assert package["devDependencies"]["solc"] == PINNED_SOLC
    assert lock["packages"]["node_modules/solc"]["version"] == PINNED_SOLC


def test_recompile_is_byte_identical(tmp_path: Path) -> None:
    node = shutil.which("node")
    if node is None:
        _missing("node is not installed")
    if not (CONTRACTS / "node_modules" / "solc" / "soljson.js").is_file():
        _missing("contracts/node_modules/solc is missing")
    assert node is not None
    result = subprocess.run(
        [node, str(CONTRACTS / "compile.js"), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    built = sorted(p.name for p in tmp_path.glob("*.json"))
    assert built == sorted(f"{n}.json" for n in ARTIFACTS)
    for file in built:
        assert (tmp_path / file).read_bytes() == (BUILD / file).read_bytes(), f"{file} differs: run compile.js"
