"""A wall-clock shim for fault tests (what libfaketime does, for one Python process).

Loaded by Python at start-up when this folder is first on PYTHONPATH. With
``CROWDFL_FAKE_CLOCK_FILE=<file>`` set, ``time.time()`` and ``time.time_ns()`` return the real
wall clock plus the number of seconds written in ``<file>`` (re-read at most every 50 ms, so a
test can jump the clock forward and back while the process runs). ``time.monotonic()`` is left
alone, as a real ``settimeofday`` / NTP step leaves CLOCK_MONOTONIC alone: code that measures
intervals on the monotonic clock must not notice the jump, code that reads the wall clock must
cope with it.
"""

import os
import time

_FILE = os.environ.get("CROWDFL_FAKE_CLOCK_FILE")

if _FILE:
    _real_time, _real_time_ns, _monotonic = time.time, time.time_ns, time.monotonic
    _state = {"checked": -1.0, "offset": 0.0}

    def _offset() -> float:
        now = _monotonic()
        if now - _state["checked"] > 0.05:
            _state["checked"] = now
            try:
                with open(_FILE, encoding="ascii") as fh:
                    _state["offset"] = float(fh.read().strip() or 0.0)
            except (OSError, ValueError):
                pass
        return _state["offset"]

    def _time() -> float:
        return _real_time() + _offset()

    def _time_ns() -> int:
        return _real_time_ns() + int(_offset() * 1e9)

    time.time = _time
    time.time_ns = _time_ns
