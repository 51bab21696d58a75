"""A coordinator in its own process for the crash tests: API + round driver + anchoring on an RPC
chain, state in the given database and store. Killed with SIGKILL by the tests, restarted on the
same state. Usage: python -m tests.coordinator.coordinator_proc CONFIG.json"""

from __future__ import annotations

import faulthandler
import json
import logging
import signal
import sys
import time
from pathlib import Path

from coordinator.api import ApiServer, create_app
from coordinator.chain import ChainConfig, ChainError, connect
from coordinator.cli import drive_once
from coordinator.contracts import CrowdContracts
from coordinator.db import make_sessions
from coordinator.service import Coordinator
from coordinator.store import LocalContentStore
from crowdfl.identity import Identity


def main(config_path: str) -> int:
    cfg = json.loads(Path(config_path).read_text())
    faulthandler.register(signal.SIGUSR1)  # a test that times out asks for every thread's stack
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    client = connect(ChainConfig(
        kind="rpc", rpc_url=cfg["rpc_url"], private_key=cfg["private_key"], chain_id=cfg["chain_id"], poa=True,
        gas_price_wei=cfg["gas_price_wei"], receipt_timeout_s=cfg.get("receipt_timeout_s", 15.0), poll_interval_s=0.2,
    ))
    try:
        contracts = CrowdContracts.at(client, cfg["addresses"])
    except ChainError:
        contracts = CrowdContracts.at(client, cfg["addresses"], check=False)
    ident, _ = Identity.load_or_create(Path(cfg["identity"]))
    coord = Coordinator(ident, make_sessions(cfg["db_url"]), LocalContentStore(cfg["store"]), contracts,
                        lambda t, p, r: None, evaluate=lambda w: 0.5)
    api = ApiServer(create_app(coord))
    api.start()
    Path(cfg["port_file"]).write_text(str(api.port))
    while True:  # the serving loop of `crowdfl-coordinator serve` (its error handling too)
        drive_once(coord, cfg.get("round_timeout_s", 3600.0))
        time.sleep(0.1)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1]))
