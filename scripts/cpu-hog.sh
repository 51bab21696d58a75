#!/usr/bin/env bash
# Run a command beside N busy loops (default: one per core), so that tests meet a loaded machine:
#
#   scripts/cpu-hog.sh -- .venv/bin/python -m pytest -m realpart tests/faults
#   scripts/cpu-hog.sh -n 2 -- make test
#
# The loops are `yes > /dev/null`, in their own process group; they are killed when the command
# ends, fails or is interrupted. Exits with the command's exit code.
set -euo pipefail

n="$(nproc)"
while [ $# -gt 0 ]; do
  case "$1" in
    -n) n="$2"; shift 2 ;;
    --) shift; break ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) break ;;
  esac
done
[ $# -gt 0 ] || { echo "usage: $0 [-n N] -- command..." >&2; exit 2; }

pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT INT TERM
for _ in $(seq "$n"); do
  yes > /dev/null &
  pids+=("$!")
done
echo "cpu-hog: $n busy loop(s) running (pids ${pids[*]})" >&2
start=$(date +%s)
set +e
"$@"
rc=$?
set -e
echo "cpu-hog: command exited with $rc after $(( $(date +%s) - start )) s" >&2
exit "$rc"
