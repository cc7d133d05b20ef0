# The two commands a newcomer needs are `make demo` and `make test`; each does all of its set-up.
SHELL := /bin/bash
NODE ?= node
FUZZ_SECONDS ?= 15

.PHONY: all setup deps addon guest build lint unit fuzz e2e test demo bench docs clean

all: build

# Machine set-up: apt packages, hugepages (root; idempotent and quick once done).
setup:
	@bash scripts/setup.sh

node_modules/.stamp: package.json package-lock.json
	npm ci --no-audit --no-fund
	@touch $@

deps: node_modules/.stamp

addon:
	@bash scripts/build-addon.sh

guest: setup
	@bash scripts/build-guest.sh

build: setup deps addon guest
	npx tsc -p tsconfig.json
	npx tsc -p tsconfig.dashboard.json

lint: deps
	npx eslint src test bench scripts

unit: build
	$(NODE) --test --test-concurrency=1 $$(ls dist/test/unit/*.test.js)

fuzz: build
	@for f in dist/test/fuzz/*.fuzz.js; do echo "fuzz: $$f ($(FUZZ_SECONDS)s)"; FUZZ_SECONDS=$(FUZZ_SECONDS) $(NODE) $$f || exit 1; done

e2e: build
	$(NODE) --test --test-concurrency=1 --test-timeout=900000 $$(ls dist/test/e2e/*.test.js)

test: build lint unit fuzz e2e

# docs/topology.md's key tables and docs/topology.schema.json, from src/control/topology-schema.ts.
docs: deps
	npx tsc -p tsconfig.json
	$(NODE) dist/scripts/topology-docs.js

demo: build
	$(NODE) dist/scripts/demo.js

bench: build
	$(NODE) dist/bench/run.js

clean:
	rm -rf dist build
