# Thin wrappers; every target works on a fresh clone. The venv lives in .venv at the repo root.
VENV       := .venv
PY         := $(VENV)/bin/python
STAMP      := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
BENCH_STAMP:= $(VENV)/.installed-bench
RUFF       := $(VENV)/bin/ruff
PEER_VENV  := .venv-img2dataset
PEER_STAMP := $(PEER_VENV)/.installed

.PHONY: install install-test install-bench lint test test-slow bench demo clean

install: $(STAMP)

$(STAMP): requirements.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $(STAMP)

# Test-only: PyTorch + timm, the reference InceptionV4 for the weight-conversion test, and ruff (never in
# requirements.txt).
install-test: $(TEST_STAMP)

$(TEST_STAMP): $(STAMP) requirements-test.txt
	$(PY) -m pip install --quiet -r requirements-test.txt
	touch $(TEST_STAMP)

# Bench-only: tf-keras, for the legacy ImageDataGenerator baseline; and img2dataset, the crawl's peer, in a venv of
# its own (it would replace .venv's pinned pandas and OpenCV).
install-bench: $(BENCH_STAMP) $(PEER_STAMP)

$(BENCH_STAMP): $(STAMP) requirements-bench.txt
	$(PY) -m pip install --quiet -r requirements-bench.txt
	touch $(BENCH_STAMP)

$(PEER_STAMP): requirements-img2dataset.txt
	test -x $(PEER_VENV)/bin/python || python3 -m venv $(PEER_VENV)
	$(PEER_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(PEER_VENV)/bin/python -m pip install --quiet -r requirements-img2dataset.txt
	touch $(PEER_STAMP)

# ruff, pinned in requirements-test.txt, with the settings of pyproject.toml.
lint: install-test $(RUFF)
	$(RUFF) check .

# A venv whose test stamp predates ruff's pin gets ruff here (order-only: the stamp's age does not matter).
$(RUFF): | $(TEST_STAMP)
	$(PY) -m pip install --quiet -r requirements-test.txt

test: install-test install-bench
	$(PY) -m pytest -m "not slow" -q

# Exit status 5 (no test collected) is not a failure: the slow set may be empty in a trimmed checkout.
test-slow: install-test install-bench
	$(PY) -m pytest -m slow -q || test $$? -eq 5

bench: install-bench
	$(PY) -m bench

demo: install
	$(PY) -m demo

clean:
	rm -rf $(VENV) $(PEER_VENV) .pytest_cache
