"""Run a role's entry point with a wall-clock stack sampler over every thread (bench/scale.py --profile).

cProfile sees only the main thread, and the roles work in theirs (ingest, training, waitress).
Every 5 ms this samples all threads' stacks and counts, per function of crowdfl's own packages,
the samples in which it is on the stack (inclusive) and at the top of crowdfl's frames (self).
Threads blocked in a queue or an idle wait are skipped. Written to OUT at a clean exit.

Usage: python bench/stack_sampler.py OUT MODULE [ARGS...]   (e.g. edge_server.cli run --config X)
"""

from __future__ import annotations

import atexit
import collections
import runpy
import sys
import threading
from pathlib import Path

OURS = ("/crowdfl/", "/edge_server/", "/coordinator/", "/agent/")
IDLE = {("queue.py", "get"), ("threading.py", "wait"), ("selectors.py", "select"), ("socket.py", "accept"),
        ("threading.py", "_wait_for_tstate_lock"), ("socketserver.py", "serve_forever")}


def main() -> None:
    out, module = Path(sys.argv[1]), sys.argv[2]
    sys.argv = [module, *sys.argv[3:]]
    inclusive: collections.Counter[str] = collections.Counter()
    selfish: collections.Counter[str] = collections.Counter()
    total = [0]
    stop = threading.Event()

    def sample() -> None:
        me = threading.get_ident()
        while not stop.wait(0.005):
            for tid, frame in sys._current_frames().items():
                if tid == me:
                    continue
                leaf = (Path(frame.f_code.co_filename).name, frame.f_code.co_name)
                if leaf in IDLE:
                    continue
                total[0] += 1
                seen: set[str] = set()
                top = None
                f = frame
                while f is not None:
                    name = f.f_code.co_filename
                    if any(p in name for p in OURS):
                        key = f"{'/'.join(Path(name).parts[-2:])}:{f.f_code.co_name}"
                        if top is None:
                            top = key
                        seen.add(key)
                    f = f.f_back
                inclusive.update(seen)
                if top is not None:
                    selfish[top] += 1

    def dump() -> None:
        stop.set()
        lines = [f"samples (non-idle thread stacks): {total[0]}", "", "inclusive  self  function"]
        for key, n in inclusive.most_common(60):
            lines.append(f"{n:9d} {selfish.get(key, 0):5d}  {key}")
        out.write_text("\n".join(lines) + "\n")

    threading.Thread(target=sample, daemon=True, name="stack-sampler").start()
    atexit.register(dump)
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
