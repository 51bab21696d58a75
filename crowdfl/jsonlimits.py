"""JSON from outside, parsed only once its size and nesting are known to be safe.

Python's json parser recurses once per nesting level on the C stack. Importing web3 raises the
interpreter's recursion limit to 100,000, so ~160 KB of ``[`` overflows a request thread's stack
and kills the process (SIGSEGV, no log line) before Python can raise RecursionError. The nesting
depth is therefore measured first, without recursion: string contents are cut out and the
brackets counted with a running sum.
"""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np

from .errors import WireError

MAX_JSON_DEPTH = 32
_ESCAPE = re.compile(rb"\\.", re.DOTALL)
_STRING = re.compile(rb'"[^"]*"')
_OPEN = np.zeros(256, np.int8)
_OPEN[[ord("["), ord("{")]] = 1
_OPEN[[ord("]"), ord("}")]] = -1


def json_depth(data: bytes) -> int:
    """The deepest nesting of arrays and objects in ``data`` (0 for a scalar); never recurses."""
    bare = _STRING.sub(b"", _ESCAPE.sub(b"", data))
    if not bare:
        return 0
    steps = _OPEN[np.frombuffer(bare, np.uint8)].astype(np.int64)
    return int(max(0, np.cumsum(steps).max()))


def loads_limited(data: bytes, max_bytes: int, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Parse JSON that is at most ``max_bytes`` long and ``max_depth`` deep, else WireError
    (``too_large``, ``too_deep`` or ``bad_json``). NaN and Infinity are not JSON: refused."""
    if len(data) > max_bytes:
        raise WireError("too_large", f"JSON body of {len(data)} bytes exceeds {max_bytes}")
    depth = json_depth(data)
    if depth > max_depth:
        raise WireError("too_deep", f"JSON nested {depth} levels deep; at most {max_depth} allowed")
    try:
        return json.loads(data, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        raise WireError("bad_json", f"the body is not valid JSON: {str(exc)[:120]}") from None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")
