# The two commands a newcomer needs:  `make demo`  and  `make test`.
# Both run `make setup` first; set-up is idempotent (a second run takes seconds).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.d2kd-setup-stamp
SETUP_INPUTS := setup.py Makefile d2kd/compat/provision.py d2kd/compat/detectron2_C_standin.py

.PHONY: setup demo test collect-env clean-venv

setup: $(STAMP)

$(STAMP): $(SETUP_INPUTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check "setuptools<81" wheel
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[test]"
	$(PY) -m d2kd.compat.provision
	$(PY) -m d2kd.collect_env
	touch $(STAMP)

demo: setup
	$(PY) tools/demo.py

test: setup
	$(PY) -m pytest -q tests

collect-env: setup
	$(PY) -m d2kd.collect_env

clean-venv:
	rm -rf $(VENV) build
