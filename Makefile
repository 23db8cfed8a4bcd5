# Developer shortcuts. The README's two commands are what users run.
PYTHON ?= python3

.PHONY: install test test-fast golden engine ci bench

install:
	$(PYTHON) -m pip install -e '.[test]'

# Everything, the engine tests included (needs a running Docker engine:
# `bash .ci/install-docker.sh` starts one).
test:
	$(PYTHON) -m pytest

# Without the engine.
test-fast:
	$(PYTHON) -m pytest -m 'not engine'

engine:
	$(PYTHON) -m pytest -m engine

# Rewrite tests/golden from the current render; read the diff before committing.
golden:
	-$(PYTHON) -m pytest tests/test_render_golden.py --update-golden -q -k test_golden
	git --no-pager diff --stat -- tests/golden

ci:
	bash .ci/run

# Performance figures (issue 7): merge vs cat, bytes per model byte, no-op up,
# warm build, --help, image overhead. Needs root and a Docker engine.
bench:
	$(PYTHON) -m bench.benchmark
