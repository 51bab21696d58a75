"""The manufacturer's coordinator: tasks, selection, robust aggregation, reputation, chain anchoring."""

import sys

# The core and the agent run on Python 3.10 (JetPack); the servers are built and tested on 3.11+.
if sys.version_info < (3, 11):
    raise ImportError(f"the coordinator needs Python 3.11 or newer (this is {sys.version.split()[0]}); only the agent runs on 3.10")
