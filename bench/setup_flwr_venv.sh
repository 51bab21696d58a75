#!/usr/bin/env bash
# Builds bench/.venv-flwr: Flower + numpy only, kept apart from the project venv because flwr's
# protobuf/grpcio pins may clash with TensorFlow's. bench/aggregation.py runs in this venv and
# imports crowdfl's coordinator/aggregation.py by path (it needs nothing but numpy).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="$here/.venv-flwr"
python="${PYTHON:-python3}"
FLWR_VERSION="${FLWR_VERSION:-1.42.0}"
NUMPY_VERSION="${NUMPY_VERSION:-2.4.6}"
if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet "flwr==$FLWR_VERSION" "numpy==$NUMPY_VERSION" threadpoolctl
"$venv/bin/python" -c "import flwr, numpy; print('flwr', flwr.__version__, 'numpy', numpy.__version__)"
