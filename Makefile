# The two commands a newcomer needs:  `make demo`  and  `make test`.
# Both run `make setup` first; set-up is idempotent (a second run takes seconds).
#
# `make test-upstream DETECTRON2_SRC=...` runs the whole test suite once more against the real
# upstream detectron2 (compiled from source) in a second virtualenv; CI (.ci/run) runs both.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.d2kd-setup-stamp

# Exact versions of the embedded environments. setup.py has lower bounds only (installing d2kd
# never replaces a user's torch / detectron2); the pins live here and reach every pip call:
# with -c for the Makefile's own calls, through PIP_CONSTRAINT for d2kd.apps.provision's.
CONSTRAINTS := requirements/constraints.txt
PIP = $(1) -m pip install --quiet --disable-pip-version-check -c $(CONSTRAINTS)

SETUP_INPUTS := setup.py Makefile $(CONSTRAINTS) \
	d2kd/apps/provision/build.py d2kd/apps/provision/detectron2_C_standin.py

.PHONY: setup demo test test-long test-fast lint docs collect-env clean-venv test-upstream setup-upstream \
	clean-upstream

setup: $(STAMP)

$(STAMP): $(SETUP_INPUTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(call PIP,$(PY)) "setuptools<81" wheel
	$(call PIP,$(PY)) -e ".[test,deploy,docs,postgres]"
	PIP_CONSTRAINT="$(CURDIR)/$(CONSTRAINTS)" $(PY) -m d2kd.apps.provision
	$(PY) -m d2kd.apps.collect_env
	touch $(STAMP)

demo: setup
	$(PY) tools/demo.py

# Two pytest-xdist workers, a test file per worker at a time (--dist loadfile: a module's shared
# fixtures are built once). `make test` leaves out the tests marked `long` (end-to-end scenarios
# of tens of seconds: several processes or machines, kill and resume, certify, the documents'
# commands); `make test-long` runs them, and CI runs both.
XDIST := -n 2 --dist loadfile

test: setup
	$(PY) -m pytest -q $(XDIST) -m "not long" tests

test-long: setup
	$(PY) -m pytest -q $(XDIST) -m long tests

# the tests without a training or a subprocess (pytest -m "not slow"), on two workers
test-fast: setup
	$(PY) -m pytest -q -m "not slow" -n 2 tests

# ruff.toml: detectron2's line length (100) and import order; CI runs it
lint: setup
	$(PY) -m ruff check .

# The documentation site (mkdocs.yml: docs/ and the API reference from the docstrings) into
# site/; --strict: a warning (a broken link or anchor, a page not in the nav, a malformed
# docstring) fails the build. The `docs` extra comes with `make setup`, since `make test` builds
# the site too (tests/dev/test_docs_build.py); CI runs it. NO_MKDOCS_2_WARNING: mkdocs-material's
# end-of-life banner (May 2027), printed on every build.
docs: setup
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --site-dir site

collect-env: setup
	$(PY) -m d2kd.apps.collect_env

clean-venv:
	rm -rf $(VENV) build

# ---------------------------------------------------------------------------------------------
# Upstream detectron2 main, compiled (the code paths the pure-Python build never runs: _C, the
# fast COCOeval, ...). DETECTRON2_SRC is anything `pip install` accepts: a git URL (default,
# needs GitHub), a source tarball whose top folder is detectron2/ (CI passes the offline copy
# in ../shared/third_party/), or a source folder. The virtualenv gets the same pinned torch /
# torchvision / setuptools as .venv/, then detectron2 is compiled against them (~75 s on 2 CPU
# cores; --no-build-isolation: its build must see that torch), then d2kd is installed the way
# a user would, with no provisioning step: d2kd must take the detectron2 it finds.
# Idempotent like `make setup`, in two steps: detectron2 is recompiled only when the pins or
# DETECTRON2_SRC change, d2kd is reinstalled when the set-up inputs change.
DETECTRON2_SRC ?= git+https://github.com/facebookresearch/detectron2.git
UPSTREAM_VENV := .venv-upstream
UPSTREAM_PY := $(UPSTREAM_VENV)/bin/python
UPSTREAM_D2_STAMP := $(UPSTREAM_VENV)/.detectron2-stamp
UPSTREAM_STAMP := $(UPSTREAM_VENV)/.d2kd-upstream-stamp
# Records DETECTRON2_SRC; rewritten (and so newer than the stamps) only when the value changes.
UPSTREAM_SRC_RECORD := $(UPSTREAM_VENV)/.detectron2-src
# detectron2's projects/ViTDet/configs, copied from the source (see its rule below)
UPSTREAM_PROJECTS := $(UPSTREAM_VENV)/detectron2-projects
UPSTREAM_PROJECTS_STAMP := $(UPSTREAM_VENV)/.detectron2-projects-stamp

setup-upstream: $(UPSTREAM_STAMP) $(UPSTREAM_PROJECTS_STAMP)

$(UPSTREAM_SRC_RECORD): FORCE
	@mkdir -p $(UPSTREAM_VENV)
	@echo '$(DETECTRON2_SRC)' | cmp -s - $@ || echo '$(DETECTRON2_SRC)' > $@

$(UPSTREAM_D2_STAMP): $(CONSTRAINTS) $(UPSTREAM_SRC_RECORD)
	test -x $(UPSTREAM_PY) || $(PYTHON) -m venv $(UPSTREAM_VENV)
	$(call PIP,$(UPSTREAM_PY)) "setuptools<81" wheel torch torchvision
	@# A different source of the same version would count as installed: remove the old one.
	$(UPSTREAM_PY) -m pip uninstall --quiet --yes detectron2
	@echo "Compiling detectron2 from $(DETECTRON2_SRC) (about 75 s on 2 CPU cores) ..."
	$(call PIP,$(UPSTREAM_PY)) --no-build-isolation "$(DETECTRON2_SRC)"
	touch $(UPSTREAM_D2_STAMP)

$(UPSTREAM_STAMP): $(UPSTREAM_D2_STAMP) $(SETUP_INPUTS)
	$(call PIP,$(UPSTREAM_PY)) -e ".[test,deploy,vitdet,docs,postgres]"
	$(UPSTREAM_PY) -m d2kd.apps.collect_env
	$(UPSTREAM_PY) -c "from d2kd.compat import has_compiled_extension as compiled; \
	assert compiled(), 'the detectron2 in $(UPSTREAM_VENV) has no compiled _C'"
	touch $(UPSTREAM_STAMP)

# detectron2's projects/ViTDet/configs (not part of a pip install), for the transformer-teacher
# tests and the *_swinB_* COCO configs: copied from DETECTRON2_SRC when it is a source tarball or
# folder; with a git URL those tests skip, naming DETECTRON2_PROJECTS.

$(UPSTREAM_PROJECTS_STAMP): $(UPSTREAM_SRC_RECORD)
	rm -rf $(UPSTREAM_PROJECTS) && mkdir -p $(UPSTREAM_PROJECTS)
	@case "$(DETECTRON2_SRC)" in \
	  *.tar.gz|*.tgz) tar -xzf "$(DETECTRON2_SRC)" -C $(UPSTREAM_PROJECTS) --strip-components=2 \
	      --wildcards '*/projects/ViTDet/configs/*' ;; \
	  *) if [ -d "$(DETECTRON2_SRC)/projects/ViTDet/configs" ]; then \
	      mkdir -p $(UPSTREAM_PROJECTS)/ViTDet && \
	      cp -r "$(DETECTRON2_SRC)/projects/ViTDet/configs" $(UPSTREAM_PROJECTS)/ViTDet/; \
	    else echo "DETECTRON2_SRC is no source tarball or folder: the ViTDet-teacher tests will skip"; fi ;; \
	esac
	touch $@

# the whole suite on upstream detectron2, `long` tests included; the docs' commands
# (tests/dev/test_doc_commands.py, minutes) run with `make test-long` only
test-upstream: setup-upstream
	DETECTRON2_PROJECTS="$(CURDIR)/$(UPSTREAM_PROJECTS)" D2KD_DOC_COMMANDS=skip \
	    $(UPSTREAM_PY) -m pytest -q $(XDIST) tests

clean-upstream:
	rm -rf $(UPSTREAM_VENV)

FORCE:
