"""Test-wide fixtures: the real-part harnesses (mosquitto, PostgreSQL) are plugins usable everywhere."""

pytest_plugins = ("tests.support.mosquitto", "tests.support.postgres")
