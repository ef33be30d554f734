# The pipeline, readable top to bottom:
#   setup -> validate -> base -> cpt -> sft -> pref -> merge -> eval -> report   (then serve)
# Every target depends on the environment, so a fresh clone needs nothing but `make`.
#   make domain=finance all                       build every stage (skipping unchanged ones)
#   make domain=finance sft sft.learning_rate=1e-4  any pack key can be overridden as key.path=value
#   make domain=finance sft FORCE=1               rerun a stage even when it is up to date
#   make test                                     the whole test suite, CPU only, offline
#   make check                                    the fast tests (no vLLM, browser or full training), < 2 minutes

domain  ?= finance
OFFLINE ?= 1
PY      := .venv/bin/python

# Command-line assignments that are pack overrides (everything except make's own variables).
MAKE_VARS := domain=% FORCE=% DETACH=% GPU=% HOST=% API_KEY=% PORT=% BASE_PORT=% ARENA_PORT=% OFFLINE=% PYTHON=% PYTEST_ARGS=%
OVERRIDES := $(filter-out $(MAKE_VARS),$(MAKEOVERRIDES))
FORCE_FLAG := $(if $(filter 1 yes true,$(FORCE)),--force,)
DETACH_FLAG := $(if $(filter 1 yes true,$(DETACH)),--detach,)

export HF_HUB_OFFLINE=$(OFFLINE)
export HF_DATASETS_OFFLINE=$(OFFLINE)
export TRANSFORMERS_OFFLINE=$(OFFLINE)
export HF_HUB_DISABLE_TELEMETRY=1
export DO_NOT_TRACK=1
export GRADIO_ANALYTICS_ENABLED=False
export VLLM_NO_USAGE_STATS=1
export TOKENIZERS_PARALLELISM=false

STAMP := .venv/.stamp-$(shell sha256sum pyproject.toml scripts/setup.sh | sha256sum | cut -c1-12)

.PHONY: help setup validate show keys base cpt sft pref merge eval report all serve stop export-votes test check clean

help:
	@sed -n '2,8p' Makefile | sed 's/^# \{0,1\}//'
	@echo "targets: setup validate show keys base cpt sft pref merge eval report all serve stop export-votes test check clean"

setup: $(STAMP)
$(STAMP): pyproject.toml scripts/setup.sh
	@bash scripts/setup.sh
	@rm -f .venv/.stamp-* && touch $@

validate: setup
	@$(PY) -m pipeline validate --domain $(domain) $(OVERRIDES)

show: setup
	@$(PY) -m pipeline show --domain $(domain) $(OVERRIDES)

keys: setup
	@$(PY) -m pipeline keys

# Each stage target builds the stages before it when they are missing or out of date.
base cpt sft pref merge eval report: setup
	@$(PY) -m pipeline run $@ --domain $(domain) $(FORCE_FLAG) $(OVERRIDES)

# all = build every stage, then serve (foreground; DETACH=1 returns once everything answers).
all: setup
	@$(PY) -m pipeline run all --domain $(domain) $(FORCE_FLAG) $(OVERRIDES)
	@$(PY) -m serve serve --domain $(domain) $(DETACH_FLAG) $(OVERRIDES)

# The merged model as `<domain>` (:8000), the base model as `<domain>-base` (:8001), the arena (:7860).
# HOST, PORT, BASE_PORT, ARENA_PORT and API_KEY change the defaults; Ctrl-C stops every child.
serve: setup
	@$(PY) -m serve serve --domain $(domain) $(DETACH_FLAG) $(OVERRIDES)

stop: setup
	@$(PY) -m serve stop --domain $(domain)

# Arena votes -> runs/<domain>/votes/battles.jsonl and pairs.jsonl (decisive votes as prompt/chosen/rejected);
# prints the pref.datasets entry that makes the next `make all` train on them.
export-votes: setup
	@$(PY) -m core.votes export --domain $(domain)

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The inner loop: tests not marked slow (those start vLLM, a browser, or train several stages).
check: setup
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf runs/$(domain)
