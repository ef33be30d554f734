# The pipeline, readable top to bottom:
#   setup -> validate -> base -> cpt -> sft -> pref -> merge -> eval -> report   (then serve)
# Every target depends on the environment, so a fresh clone needs nothing but `make`.
#   make domain=finance all                       build every stage (skipping unchanged ones)
#   make domain=finance sft sft.learning_rate=1e-4  any pack key can be overridden as key.path=value
#   make domain=finance sft FORCE=1               rerun a stage even when it is up to date
#   make domain=finance tensorboard               the training curves of every stage (tracking=none: no curves)
#   make domain=finance sft NPROC=8               training stages on 8 processes (accelerate launch; NNODES=...)
#   make test                                     the whole test suite, CPU only, offline
#   make check                                    the fast tests (no vLLM, browser or full training), < 2 minutes
#   make domain=finance clean                     delete runs/finance but the arena's votes (VOTES=1: those too)

domain  ?= finance
OFFLINE ?= 1
PY      := .venv/bin/python

# Command-line values reach the programs literally, never through make or the shell: make would expand a
# `$(...)` in a command-line value (even while exporting it) and the shell would run a `;` or a backtick.
# So every command-line variable is read with $(value), unexported, and handed on as one single-quoted word.
quote = '$(subst ','\'',$(1))'
define newline


endef
# Scale-out of the training stages (pipeline/distributed.py runs them under `accelerate launch`): processes per
# node, nodes, this node's rank, and node 0's address and port.
SCALE_VARS := NPROC NNODES NODE_RANK MASTER_ADDR MASTER_PORT
# make's own options; every other command-line assignment is a pack override (key.path=value).
MAKE_VARS := domain FORCE DETACH VOTES GPU HOST API_KEY ARENA_USERS PORT BASE_PORT ARENA_PORT OFFLINE PYTHON PY \
             PYTEST_ARGS RUNS_DIR DOMAINS_DIR $(SCALE_VARS)
# Options the programs read from the environment (serve/launch.py, core/layout.py, scripts/setup.sh, pipeline/).
ENV_VARS := GPU HOST API_KEY ARENA_USERS PORT BASE_PORT ARENA_PORT PYTHON RUNS_DIR DOMAINS_DIR $(SCALE_VARS)
COMMAND_LINE := $(foreach v,$(.VARIABLES),$(if $(filter command line,$(origin $(v))),$(v)))
unexport $(COMMAND_LINE)
# Sorted, so a section (cpt.datasets=[...]) comes before the keys inside it (cpt.datasets.0.path=...).
OVERRIDE_NAMES := $(sort $(filter-out $(MAKE_VARS),$(COMMAND_LINE)))
OVERRIDES := $(foreach v,$(OVERRIDE_NAMES),$(call quote,$(v)=$(value $(v))))
ENV := $(foreach v,$(filter $(ENV_VARS),$(COMMAND_LINE)),$(v)=$(call quote,$(value $(v))))
DOMAIN := $(value domain)
yes = $(filter 1 yes true,$(value $(1)))
FORCE_FLAG := $(if $(call yes,FORCE),--force,)
DETACH_FLAG := $(if $(call yes,DETACH),--detach,)

# Every target but these names a domain: a plain name (letters, digits, - and _), since `clean` deletes
# runs/<domain>; an empty one or a path (../domains) stops here, before anything runs.
NO_DOMAIN := help setup keys test check
ifneq ($(filter-out $(NO_DOMAIN),$(MAKECMDGOALS)),)
ifneq ($(findstring $(newline),$(DOMAIN))$(shell case $(call quote,$(DOMAIN)) in (''|*[!A-Za-z0-9_-]*) echo bad;; esac),)
$(error domain='$(DOMAIN)' is not a plain name (letters, digits, - and _): name a folder of domains/, e.g. domain=finance)
endif
endif
$(foreach v,$(COMMAND_LINE),$(if $(findstring $(newline),$(value $(v))),$(error $(v)=... holds a line break, \
  which make cannot hand on; put multi-line text in pack.yaml (a YAML block, key: |))))

export HF_HUB_OFFLINE := $(value OFFLINE)
export HF_DATASETS_OFFLINE := $(value OFFLINE)
export TRANSFORMERS_OFFLINE := $(value OFFLINE)
export HF_HUB_DISABLE_TELEMETRY=1
export DO_NOT_TRACK=1
export GRADIO_ANALYTICS_ENABLED=False
export VLLM_NO_USAGE_STATS=1
export TOKENIZERS_PARALLELISM=false

STAMP := .venv/.stamp-$(shell sha256sum pyproject.toml scripts/setup.sh | sha256sum | cut -c1-12)

.PHONY: help setup validate show keys base cpt sft pref merge eval report all serve stop export-votes tensorboard \
        test check clean

help:
	@sed -n '2,/^$$/{/^#/p}' Makefile | sed 's/^# \{0,1\}//'
	@echo "targets: setup validate show keys base cpt sft pref merge eval report all serve stop export-votes tensorboard test check clean"

setup: $(STAMP)
$(STAMP): pyproject.toml scripts/setup.sh
	@$(ENV) bash scripts/setup.sh
	@rm -f .venv/.stamp-* && touch $@

validate: setup
	@$(ENV) $(PY) -m pipeline validate --domain $(call quote,$(DOMAIN)) $(OVERRIDES)

show: setup
	@$(ENV) $(PY) -m pipeline show --domain $(call quote,$(DOMAIN)) $(OVERRIDES)

keys: setup
	@$(ENV) $(PY) -m pipeline keys

# Each stage target builds the stages before it when they are missing or out of date.
base cpt sft pref merge eval report: setup
	@$(ENV) $(PY) -m pipeline run $@ --domain $(call quote,$(DOMAIN)) $(FORCE_FLAG) $(OVERRIDES)

# all = build every stage, then serve (foreground; DETACH=1 returns once everything answers).
all: setup
	@$(ENV) $(PY) -m pipeline run all --domain $(call quote,$(DOMAIN)) $(FORCE_FLAG) $(OVERRIDES)
	@$(ENV) $(PY) -m serve serve --domain $(call quote,$(DOMAIN)) $(DETACH_FLAG) $(OVERRIDES)

# The merged model as `<domain>` (:8000), the base model as `<domain>-base` (:8001), the arena (:7860).
# HOST, PORT, BASE_PORT, ARENA_PORT and API_KEY change the defaults; Ctrl-C stops every child.
serve: setup
	@$(ENV) $(PY) -m serve serve --domain $(call quote,$(DOMAIN)) $(DETACH_FLAG) $(OVERRIDES)

stop: setup
	@$(ENV) $(PY) -m serve stop --domain $(call quote,$(DOMAIN))

# Arena votes -> runs/<domain>/votes/battles.jsonl, pairs.jsonl (decisive votes as prompt/chosen/rejected) and
# kto.jsonl (both-bad votes as prompt/completion/label false, for pref.method=kto); prints the pref.datasets
# entries that make the next `make all` train on them.
export-votes: setup
	@$(ENV) $(PY) -m core.pairs export --domain $(call quote,$(DOMAIN))

# TensorBoard over runs/<domain>: each training stage's event files are in runs/<domain>/<stage>/tensorboard.
tensorboard: setup
	@$(if $(ENV),export $(ENV);) .venv/bin/tensorboard --logdir "$${RUNS_DIR:-runs}"/$(call quote,$(DOMAIN)) \
	  --host "$${HOST:-127.0.0.1}"

test: setup
	$(ENV) $(PY) -m pytest -q $(PYTEST_ARGS)

# The inner loop: tests not marked slow (those start vLLM, a browser, or train several stages).
check: setup
	$(ENV) $(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

# Deletes runs/<domain> but keeps the arena's votes (arena.sqlite and votes/): people's judgements cannot be
# rebuilt by rerunning anything. VOTES=1 deletes them too.
clean:
	@$(if $(ENV),export $(ENV);) d="$${RUNS_DIR:-runs}"/$(call quote,$(DOMAIN)); \
	if [ ! -e "$$d" ]; then echo "clean: $$d does not exist"; \
	elif [ -n "$(call yes,VOTES)" ]; then rm -rf "$$d" && echo "clean: deleted $$d, votes included"; \
	else find "$$d" -mindepth 1 -maxdepth 1 ! -name 'arena.sqlite*' ! -name votes -exec rm -rf {} + && \
	  echo "clean: deleted $$d except its votes (arena.sqlite, votes/); VOTES=1 deletes those too"; fi
