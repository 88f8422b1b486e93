# The commands of the README: `make run`, `make study` and `make test`; each sets up the
# environment first.
SHELL := /bin/bash
VENV ?= .venv
BIN := $(VENV)/bin
export DO_NOT_TRACK=1 PREFECT_SERVER_ANALYTICS_ENABLED=false DVC_NO_ANALYTICS=1 \
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 GX_ANALYTICS_ENABLED=false \
	AWS_EC2_METADATA_DISABLED=true PYTHONDONTWRITEBYTECODE=1

.PHONY: setup run study ui test test-slow test-ui lint typecheck bench lock clean

setup:
	@XOPD_VENV=$(VENV) infra/setup_env.sh

run: setup
	@$(BIN)/xopd run

# The study (README: Study): every method from the round-0 student that `make run` made, at
# an equal budget of student tokens; table and plots under reports/study/.
study: setup
	@$(BIN)/xopd study

# The Prefect UI with the deployments served (a local server on 127.0.0.1:4200 unless a
# Prefect API is configured: PREFECT_API_URL, a profile, prefect.toml): open the printed URL.
ui: setup
	@$(BIN)/xopd serve

lint: setup
	@$(BIN)/ruff check flows tasks xopd_core tests benchmarks
	@$(BIN)/ruff format --check --quiet flows tasks xopd_core tests benchmarks

typecheck: setup
	@$(BIN)/mypy

# Two pytest workers, each module on one of them (its module fixtures, engines and servers
# are built once): on 2 cores the suite took 539 s against ~810 s in one process.
test: setup lint typecheck
	@$(BIN)/pytest -m "not slow and not ui" -q -n 2 --dist loadfile

test-slow: setup
	@$(BIN)/pytest -m slow -q

# The browser test: headless Chromium (Debian's package) driven by Playwright through the
# Prefect UI of `xopd serve`. The set-up installs both the first time (XOPD_UI_TEST=1).
test-ui:
	@XOPD_VENV=$(VENV) XOPD_UI_TEST=1 infra/setup_env.sh
	@$(BIN)/pytest -m ui -q

bench: setup
	@$(BIN)/python -m benchmarks

# Re-resolve the CPU constraints from pyproject.toml's pins (needs the package registry).
lock:
	@rm -rf .venv-lock && python3 -m venv .venv-lock && \
	.venv-lock/bin/pip install -q "pip==26.3" && \
	.venv-lock/bin/pip install -q ".[cpu,dev]" && \
	{ head -3 infra/constraints-cpu.txt; .venv-lock/bin/pip freeze --exclude-editable | \
	  grep -v -e '^xopd' -e '^torchvision' -e '^torchcodec'; } > infra/constraints-cpu.txt.new && \
	mv infra/constraints-cpu.txt.new infra/constraints-cpu.txt && rm -rf .venv-lock

clean:
	rm -rf data/mini reports .pytest_cache .mypy_cache .ruff_cache
