# The two commands of the README's quickstart, and a few for developers.
#   make run    install into .venv and run the default experiment (one training run, one row in outputs/results.csv)
#   make test   install into .venv and run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch: small, and what CI uses. With a GPU, install your CUDA build of torch into the venv
# first; a torch that is already there is kept.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install run test test-fast lint bench docs clean

$(BIN)/flowvae: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	@# the editable build prints setuptools' generic "Editable installation" notice (10 lines) on every install
	PYTHONWARNINGS=ignore $(BIN)/python -m pip install --quiet -e ".[dev,search,tracking]"
	touch $(BIN)/flowvae

install: $(BIN)/flowvae

run: install
	$(BIN)/flowvae train

# Two workers (pytest-xdist): the suite's CLI runs use one thread each, so two share a 2-core machine's cores.
test: install
	$(BIN)/python -m pytest -q -n 2

test-fast: install
	$(BIN)/python -m pytest -q -n 2 -m "not slow"

lint: install
	$(BIN)/ruff check flowvae hydra_plugins tests scripts

bench: install
	$(BIN)/python scripts/bench.py

# The documentation site (mkdocs.yml, docs/): a broken link, a missing anchor or a page left out of the nav fails it.
docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) build *.egg-info
