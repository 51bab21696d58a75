"""QEMU ``guestfwd=...-cmd:`` helper: relay one guest connection to a port on 127.0.0.1.

QEMU (slirp) starts this once per guest connection with the connection on stdin/stdout. The
target host is fixed to 127.0.0.1: the guest can reach the ports the test forwards and nothing
else. Nothing is written to stderr (it is the guest's connection too).
"""

from __future__ import annotations

import os
import socket
import sys
import threading


def _pump(read: int, write: socket.socket) -> None:
    try:
        while data := os.read(read, 65536):
            write.sendall(data)
    except OSError:
        pass
    finally:
        try:
            write.shutdown(socket.SHUT_WR)
        except OSError:
            pass


def main() -> int:
    if len(sys.argv) != 2 or not sys.argv[1].isdigit() or not 0 < int(sys.argv[1]) < 65536:
        return 2
    try:
        sock = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=10)
    except OSError:
        return 1
    sock.settimeout(None)
    threading.Thread(target=_pump, args=(0, sock), daemon=True).start()
    try:
        while data := sock.recv(65536):
            view = memoryview(data)
            while view:
                view = view[os.write(1, view):]
    except OSError:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
