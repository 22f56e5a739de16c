# scalelab — `make demo` (the main job) and `make test`. Each creates .venv when missing and installs
# the project at the versions pinned in constraints.txt.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
export HF_HUB_OFFLINE := 1
export MLFLOW_DISABLE_TELEMETRY := true
export DS_ACCELERATOR := cpu

.PHONY: venv sysdeps test test-fast demo lint bench clean

# Debian packages the tests use: Fashion-MNIST (real labelled images for the labels->text tests), the
# Tango icon theme (real image-text pairs for the bring-your-own-data test, tests/test_own_data.py) and
# Chromium (the headless-browser test of the MLflow UI).
SYSTEM_PACKAGES := dataset-fashion-mnist tango-icon-theme
SYSTEM_PATHS    := /usr/share/datasets/fashion-mnist /usr/share/icons/Tango/32x32
BROWSER_PACKAGE := chromium

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	$(BIN)/python -m pip check
	touch $@

venv: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .

# Installed with apt when running as root (CI, containers); otherwise say what to install.
sysdeps:
	@missing=""; for d in $(SYSTEM_PATHS); do [ -d "$$d" ] || missing=1; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SYSTEM_PACKAGES); \
	  else \
	    echo "note: the Fashion-MNIST and own-data tests need Debian's $(SYSTEM_PACKAGES) (apt-get install $(SYSTEM_PACKAGES))"; \
	  fi; \
	fi
	@if ! command -v chromium >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(BROWSER_PACKAGE); \
	  else \
	    echo "note: the MLflow UI browser test needs Debian's $(BROWSER_PACKAGE) (apt-get install $(BROWSER_PACKAGE))"; \
	  fi; \
	fi

test: lint sysdeps
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The edit loop: everything not marked `slow` (no multi-process training, sweeps, jobs or browser).
test-fast: lint
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

demo: $(STAMP)
	$(BIN)/scalelab demo

bench: $(STAMP)
	$(BIN)/python benchmarks/gradcache.py all

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
