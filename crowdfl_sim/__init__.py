"""Running all roles on one machine with the embedded parts (amqtt, eth-tester, SQLite, a local store)."""
