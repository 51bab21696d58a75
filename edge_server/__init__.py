"""The MEC edge server: ingest noisy features, train the deeper layers per customer, submit updates."""

import sys

# The core and the agent run on Python 3.10 (JetPack); the servers are built and tested on 3.11+.
if sys.version_info < (3, 11):
    raise ImportError(f"the edge server needs Python 3.11 or newer (this is {sys.version.split()[0]}); only the agent runs on 3.10")
