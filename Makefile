# Corral: two commands on a fresh machine — `make run` and `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run test unit integration fault bench contracts lint clean help

help:  ## list the targets
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

run: $(STAMP)  ## embedded nats-server + every service + the demo workload (simulated model)
	$(VENV)/bin/corral demo

test: $(STAMP)  ## the whole suite: unit, integration (real nats-server) and fault tests
	$(PY) -m pytest -q

unit: $(STAMP)  ## fast tests, no server
	$(PY) -m pytest -q -m "not integration"

integration: $(STAMP)  ## tests on a real nats-server
	$(PY) -m pytest -q -m "integration and not fault"

fault: $(STAMP)  ## kills and restarts processes
	$(PY) -m pytest -q -m fault

bench: $(STAMP)  ## pipeline vs a raw JetStream floor, then guard, budget, breakers and the kit's per-message cost (reports, asserts nothing)
	$(PY) -m tests.bench
	$(PY) -m tests.bench.guard
	$(PY) -m tests.bench.budget
	$(PY) -m tests.bench.breakers
	$(PY) -m tests.bench.consume

contracts: $(STAMP)  ## regenerate contracts/schemas from the code
	$(VENV)/bin/corral contracts

clean:  ## remove the environment and local data
	rm -rf $(VENV) .data
