"""The MEC edge server: ingest noisy features, train the deeper layers per customer, submit updates."""
