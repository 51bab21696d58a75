"""crowdfl shared core: wire messages, envelopes, identities, config.

Imported by all three roles (agent, edge_server, coordinator); it must never import TensorFlow.
"""

__version__ = "0.1.0"
