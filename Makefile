# Two commands a user needs: `make demo` and `make test`. Both create/use a local virtual
# environment ($(VENV), default .venv) and install what they need, system packages included.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.smsdl-deps-$(shell cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)
PYTEST_ARGS ?=

.PHONY: demo test system-deps venv benchmarks screenshots clean

# Debian packages for a headless OpenGL display (napari's canvas) and Qt 6's xcb plugin.
system-deps:
	@bash scripts/install-system-deps.sh

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -c constraints.txt -e ".[testing]"
	@touch $(STAMP)

# The editable install is refreshed every time: a venv kept outside the clone (CI) must point here.
venv: $(STAMP)
	@$(BIN)/python -m pip install -q --no-deps -e .

demo: system-deps venv
	bash scripts/run-demo.sh $(BIN)

test: system-deps venv
	xvfb-run -a -s "-screen 0 1600x1000x24" $(BIN)/python -m pytest $(PYTEST_ARGS)

benchmarks: venv
	$(BIN)/python benchmarks/bench_ion_images.py

screenshots: system-deps venv
	xvfb-run -a -s "-screen 0 1600x1000x24" $(BIN)/python scripts/take_screenshots.py

clean:
	rm -rf $(VENV) demo-output
