#!/usr/bin/env bash
# Installs the pinned solc (npm, wasm, no download at compile time) into contracts/node_modules.
set -euo pipefail
cd "$(dirname "$0")"
npm ci --no-audit --no-fund
