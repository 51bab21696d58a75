"""What every role's command needs at start-up: logging that reads well in journald, and signals."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path


def setup_logging(verbose: bool = False) -> None:
    """Plain lines on stderr; journald adds time and unit itself, so leave the timestamp out there."""
    under_journald = bool(os.environ.get("JOURNAL_STREAM"))
    fmt = "%(levelname)s %(name)s: %(message)s" if under_journald else "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format=fmt, stream=sys.stderr)
    for noisy in ("werkzeug", "amqtt", "transitions", "web3", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def stop_on_signals() -> threading.Event:
    """An event set by SIGTERM or SIGINT, so the main loop can flush and close cleanly."""
    stop = threading.Event()

    def _handler(signum: int, _frame: object) -> None:
        logging.getLogger("crowdfl").info("received %s; shutting down", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, _handler)
    signal.signal(signal.SIGINT, _handler)
    return stop


def add_config_option(parser: argparse.ArgumentParser, subparsers: list[argparse.ArgumentParser], help_text: str) -> None:
    """``--config`` before or after the subcommand; ``$CROWDFL_CONFIG`` (set by the units) is the default."""
    env = os.environ.get("CROWDFL_CONFIG")
    help_text += f" (default: $CROWDFL_CONFIG, now {env!r}; unset: the built-in defaults)" if env else " (default: $CROWDFL_CONFIG; unset: the built-in defaults)"
    parser.add_argument("--config", type=Path, default=Path(env) if env else None, help=help_text)
    for sub in subparsers:
        sub.add_argument("--config", type=Path, default=argparse.SUPPRESS, help=help_text)
