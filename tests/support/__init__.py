"""Helpers that start real external parts (mosquitto, PostgreSQL, ...) for the slow tests."""

import pkgutil

import pytest

# The fixture modules are also loaded as pytest plugins (pytest_plugins = ...); have pytest
# rewrite each module of this package on first import, so it does not warn that it could not.
pytest.register_assert_rewrite(
    *(f"{__name__}.{mod.name}" for mod in pkgutil.iter_modules(__path__))
)
