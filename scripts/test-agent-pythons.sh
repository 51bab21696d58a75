#!/usr/bin/env bash
# The device agent and the core it imports on every Python a board may have: 3.10 (NVIDIA JetPack 6,
# Ubuntu 22.04), 3.11 (Debian 12, Raspberry Pi OS bookworm, the SD image), 3.12 and 3.13.
#
#   scripts/test-agent-pythons.sh [VERSION ...]        (default: 3.10 3.11 3.12 3.13)
#
# For each interpreter: a venv with the crowdfl wheel installed as `.[agent]` (what a device runs:
# LiteRT, numpy, paho-mqtt, cryptography; tomli on 3.10) plus pytest, hypothesis and pycryptodome
# (the envelope compatibility reference), then tests/agent and tests/crowdfl without the real
# parts. No TensorFlow is installed, so the few agent tests that design a task (the coordinator's
# TensorFlow side) skip; the full venv runs them. The venvs are cached in
# .cache/agent-pythons/<version>-<hash of the requirements>; only the wheel is reinstalled.
#
# Interpreters are looked up as $PYENV_ROOT/versions/<VERSION>.*/bin/python (~/.pyenv by default),
# then python<VERSION> on PATH. A missing one is skipped with a message, or fails when CI=true.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
VERSIONS=("$@")
((${#VERSIONS[@]})) || VERSIONS=(3.10 3.11 3.12 3.13)
CACHE=$REPO/.cache/agent-pythons
BUILD_PY=${CROWDFL_BUILD_PYTHON:-$REPO/.venv/bin/python}
[[ -x $BUILD_PY ]] || BUILD_PY=python3
TEST_DEPS=(pytest hypothesis "pycryptodome>=3.20")

log() { printf 'agent-pythons: %s\n' "$*" >&2; }

find_python() {
    local v=$1 root=${PYENV_ROOT:-$HOME/.pyenv} cand
    for cand in $(ls -d "$root/versions/$v".* 2>/dev/null | sort -V -r); do
        if [[ -x $cand/bin/python ]]; then echo "$cand/bin/python"; return 0; fi
    done
    command -v "python$v" 2>/dev/null && return 0
    return 1
}

# One wheel for every interpreter (pure Python), built from a clean copy of the sources.
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp -r --parents setup.cfg pyproject.toml README.md crowdfl agent edge_server coordinator "$work/"
find "$work" -name '__pycache__' -prune -exec rm -rf {} +
"$BUILD_PY" -m pip wheel -q --no-deps --no-build-isolation -w "$work/dist" "$work" >&2
wheel=$(ls "$work"/dist/crowdfl-*.whl)
req_hash=$( { sed -n '/^install_requires/,/^$/p;/^agent =/,/^[a-z]/p' setup.cfg; printf '%s\n' "${TEST_DEPS[@]}"; } | sha256sum | cut -c1-12)

failed=()
for v in "${VERSIONS[@]}"; do
    if ! py=$(find_python "$v"); then
        if [[ ${CI:-} == true ]]; then
            log "Python $v not found (CI=true: failing)"; failed+=("$v (missing)"); continue
        fi
        log "Python $v not found: skipped (install it, e.g. pyenv install $v)"; continue
    fi
    venv=$CACHE/$v-$req_hash
    if [[ ! -f $venv/.ready ]]; then
        log "Python $v ($py): creating $venv"
        rm -rf "$venv"
        "$py" -m venv "$venv"
        "$venv/bin/pip" install -q --disable-pip-version-check "$wheel[agent]" "${TEST_DEPS[@]}" >&2
        touch "$venv/.ready"
    else
        "$venv/bin/pip" install -q --disable-pip-version-check --no-deps --force-reinstall "$wheel" >&2
    fi
    "$venv/bin/pip" check >&2
    # the device venv must stay free of the servers' stacks
    "$venv/bin/python" - <<'PY'
import importlib.util
bad = [m for m in ("tensorflow", "web3", "flask", "sqlalchemy") if importlib.util.find_spec(m)]
assert not bad, f"server packages in the agent venv: {bad}"
PY
    log "Python $v: $("$venv/bin/python" -c 'import sys, ai_edge_litert, numpy; print(sys.version.split()[0], "numpy", numpy.__version__)')"
    if ! (cd "$REPO" && "$venv/bin/python" -m pytest -q -p no:cacheprovider -m "not realpart and not slow" tests/agent tests/crowdfl); then
        failed+=("$v")
    fi
done
if ((${#failed[@]})); then
    log "FAILED on: ${failed[*]}"
    exit 1
fi
log "agent + core tests passed on: ${VERSIONS[*]}"
