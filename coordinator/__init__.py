"""The manufacturer's coordinator: tasks, selection, robust aggregation, reputation, chain anchoring."""
