VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install demo test test-slow lint bench clean data browser postgres docs

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e '.[test,interop,ray,postgres]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/asyncfl compare --preset quickstart --out runs/quickstart

test: install browser postgres lint
	$(PY) -m pytest -q -m "not slow"

# ruff: lint and formatting (settings in pyproject.toml)
lint: install
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench

# Debian's Chromium, for the test that opens the server's dashboard headless
browser:
	@command -v chromium >/dev/null || ($(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium)

# Debian's PostgreSQL server binaries, for the multi-process server's tests: each test session
# starts a throwaway cluster of its own (asyncfl.cluster.postgres), never the package's service
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null || \
		($(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq postgresql)

# the API reference, from the docstrings (pdoc): build/api/index.html; tests/test_api_reference.py
# builds it too and fails on any warning
docs: install
	$(PY) docs/api_reference.py build/api

test-slow: install browser postgres
	$(PY) -m pytest -q -m slow

# Fashion-MNIST (60k + 10k images) from Debian's package, where it is missing
FASHION := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
data:
	test -e $(FASHION) || ($(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q dataset-fashion-mnist)

clean:
	rm -rf runs .pytest_cache build/api
