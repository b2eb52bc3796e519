# Metrica Fleet: `make demo` runs the main job, `make test` runs every test tier.
# Both install what they need first (Debian packages through apt, Python packages into .venv),
# and both are safe to run again.

SHELL := /bin/bash
PYTHON ?= $(shell command -v /usr/bin/python3 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_DIR ?= build/demo

# System tools the product calls and the tests run for real.
APT_PACKAGES := python3 python3-venv python3-dev gcc e2fsprogs squashfs-tools dosfstools mtools \
	fdisk zstd tar grub-common u-boot-tools libubootenv-tool prometheus postgresql \
	prometheus-alertmanager qemu-system-x86 ovmf grub-efi-amd64-bin busybox-static haproxy \
	mmdebstrap iproute2 nftables chromium nodejs casync zchunk
# The browser tier (tests/browser) drives Debian's chromium through Playwright and injects axe-core,
# pinned in tests/browser/package-lock.json and installed with npm. Debian's nodejs comes without npm
# (its own package, which conflicts with a nodejs from NodeSource that carries npm): ask for it
# only where no npm is found.
APT_PACKAGES += $(if $(shell command -v npm),,npm)

.PHONY: demo test deps venv lint test-unit test-integration test-chaos test-browser test-qemu qemu-kernel \
	benchmarks mutation-survivors clean mutation dist debian-root browser-deps

demo: venv
	$(BIN)/fleet demo --workdir $(DEMO_DIR)

# The server tests run on SQLite and, with FLEET_TEST_DATABASE_URL, on PostgreSQL too: here
# always (FLEET_TEST_REQUIRE_POSTGRES makes the session fail if the database is missing, and
# the recipe stops if tests/postgres.sh fails). Hypothesis runs its derandomized "ci" profile
# (tests/conftest.py). The tiers include schemathesis fuzzing every API route
# (tests/server/test_api_fuzz.py) and detect-secrets over the tracked files against the reviewed
# .secrets.baseline (tests/integration/test_secrets_scan.py); both come with the test extra.
#
# The QEMU tier spends its quarter of an hour mostly waiting on the emulator, so it runs as a
# pytest process of its own beside the one running every other tier; its output goes to
# $(QEMU_LOG), printed when both are done. Each process keeps its own coverage data
# (COVERAGE_FILE: pytest-cov erases the files beside its data file when it starts), which are
# combined into build/coverage/.coverage for one report of branch coverage of the product
# packages, subprocesses included ([tool.coverage.*] in pyproject.toml). Either pytest failing
# fails the recipe, and pytest exits 5 when no test ran, which is a failure like any other.
# TESTS names what the first run tests; the QEMU tier runs beside it only when TESTS is the whole
# of tests (the first run leaves QEMU_TESTS out): `make test TESTS=tests/server` runs only that,
# in one process, with the same coverage report. The QEMU run is a session of its own, so an
# interrupted make (Ctrl-C, a TERM) ends it with every emulator and server it started: a
# background job of a non-interactive shell ignores SIGINT, and so would they, left running.
TESTS ?= tests
QEMU_TESTS ?= $(if $(filter tests tests/,$(TESTS)),tests/qemu)
QEMU_LOG := build/test-artifacts/qemu.log
COVERAGE_DIR := build/coverage
PYTEST_COVERAGE := --cov --cov-branch --cov-report=
test: lint qemu-kernel debian-root dist browser-deps
	rm -rf $(COVERAGE_DIR) build/test-artifacts
	mkdir -p $(COVERAGE_DIR)/qemu $(dir $(QEMU_LOG))
	@url=$$(tests/postgres.sh) || exit 1; \
	export FLEET_TEST_DATABASE_URL="$$url" FLEET_TEST_REQUIRE_POSTGRES=1 \
		HYPOTHESIS_PROFILE=$${HYPOTHESIS_PROFILE:-ci}; \
	qemu=; qemu_status=0; \
	if [ -n "$(QEMU_TESTS)" ]; then \
		echo "$(QEMU_TESTS) runs beside the other tiers; its output: $(QEMU_LOG)"; \
		COVERAGE_FILE=$(CURDIR)/$(COVERAGE_DIR)/qemu/.coverage \
			setsid $(BIN)/pytest -q $(PYTEST_COVERAGE) $(QEMU_TESTS) >$(QEMU_LOG) 2>&1 & qemu=$$!; \
		trap 'kill -TERM -- -$$qemu 2>/dev/null' INT TERM; \
	fi; \
	$(BIN)/pytest -q $(PYTEST_COVERAGE) $(if $(QEMU_TESTS),--ignore=$(QEMU_TESTS)) $(TESTS); \
	rest=$$?; \
	if [ -n "$$qemu" ]; then \
		wait $$qemu; qemu_status=$$?; \
		echo "===== $(QEMU_TESTS) ($(QEMU_LOG)) ====="; cat $(QEMU_LOG); \
	fi; \
	[ ! -f $(COVERAGE_DIR)/.coverage ] || mv $(COVERAGE_DIR)/.coverage $(COVERAGE_DIR)/.coverage.tiers; \
	[ ! -f $(COVERAGE_DIR)/qemu/.coverage ] || mv $(COVERAGE_DIR)/qemu/.coverage $(COVERAGE_DIR)/.coverage.qemu; \
	$(BIN)/coverage combine -q && $(BIN)/coverage report --show-missing --skip-covered; \
	covered=$$?; \
	echo "pytest $(TESTS)$(if $(QEMU_TESTS), without $(QEMU_TESTS)): exit $$rest$(if $(QEMU_TESTS),; pytest $(QEMU_TESTS): exit $$qemu_status)"; \
	[ $$rest -eq 0 ] && [ $$qemu_status -eq 0 ] && [ $$covered -eq 0 ]

test-unit test-integration test-chaos test-browser: test-%: venv
	$(BIN)/pytest -q tests/$*
test-integration: debian-root dist
test-browser: browser-deps

# The power-cut tests (tests/chaos/test_power_cuts.py, test_delta_power_cuts.py) in their long
# mode, not part of `make test`: every write boundary of every scenario (first, later and delta
# installs, their commits, rollbacks and fallbacks) on the three firmwares, and second cuts
# while the device recovers from the first, up to 600 cut sequences per scenario: about 10,700
# sequences and 20,500 cuts, 7 to 8 minutes of one core. `make test` runs the ci mode (about 850
# sequences, a fixed seed).
# Each long run draws a seed and prints it at the end with the cuts per firmware;
# `make test-power-cuts-long FLEET_POWER_CUT_SEED=<seed>` repeats that run's cuts exactly.
.PHONY: test-power-cuts-long
test-power-cuts-long: venv
	FLEET_POWER_CUTS=long $(if $(FLEET_POWER_CUT_SEED),FLEET_POWER_CUT_SEED=$(FLEET_POWER_CUT_SEED)) \
		$(BIN)/pytest -q tests/chaos/test_power_cuts.py \
		tests/chaos/test_delta_power_cuts.py

# What the browser tier injects into the pages (axe-core), at the versions of
# tests/browser/package-lock.json; npm runs no package scripts. Skipped while node_modules holds what
# the lock says (npm ci empties node_modules first, the copy of the lock is made last) and the file
# the tier injects is there (a node_modules emptied by hand is installed again).
BROWSER_LOCK := tests/browser/package-lock.json
browser-deps: deps
	[ -f tests/browser/node_modules/axe-core/axe.min.js ] && \
	cmp -s $(BROWSER_LOCK) tests/browser/node_modules/.installed-lock || { \
		npm ci --ignore-scripts --no-audit --no-fund --prefix tests/browser && \
		cp $(BROWSER_LOCK) tests/browser/node_modules/.installed-lock; }

# The QEMU tier boots a Debian kernel: fetched with apt-get download into build/qemu-cache once,
# reused after (tests/qemu fetches it too if this step was skipped).
qemu-kernel: venv
	$(BIN)/python -m chaos.qemu.kernel

test-qemu: qemu-kernel
	$(BIN)/pytest -q tests/qemu

# The wheel and the Debian packages, version from pyproject.toml (deploy/debian/build.py;
# docs/install.md): fleet-updater_<version>_all.deb for the devices (Debian's python3 and
# libraries) and fleet-server_<version>_<arch>.deb, a self-contained environment in
# /opt/metrica-fleet whose libraries come from the package registry.
DIST_DIR ?= build/dist
dist: venv $(VENV)/.wheel-installed
	rm -rf $(DIST_DIR)
	$(BIN)/python deploy/debian/build.py dist --out $(DIST_DIR)

# The Debian 12 root that tests/integration/test_packages.py installs the packages into,
# offline: made once with mmdebstrap (everything both packages depend on) as a tarball in
# build/debian-root, and reused while the package lists are the same.
debian-root: venv
	$(BIN)/python deploy/debian/build.py root --cache build/debian-root

# The wheel is built without build isolation (offline, in the tests too): setuptools needs wheel.
$(VENV)/.wheel-installed: $(VENV)/.installed
	$(BIN)/pip install -q wheel
	touch $@

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

# Mutation testing of the safety-critical modules (long; not part of `make test`): one mutmut run
# per group of tests/mutation/groups.toml on both cores, then build/mutation/report.txt and .json.
# Fails while a survivor is neither killed nor listed in tests/mutation/equivalent/.
# A quick run over some modules or groups: make mutation MODULES="signing/keys.py server_sessions".
MODULES ?=
mutation: venv $(VENV)/.mutation-installed
	rm -rf build/mutation/results
	MUTATION_MODULES="$(MODULES)" $(BIN)/python tests/mutation/run.py
	$(BIN)/python tests/mutation/report.py

# After adding tests or changing code: run again only the mutants the last `make mutation` left
# alive and every mutant of a function changed since (same MODULES selection), merge their
# outcomes and write the report.
mutation-survivors: venv $(VENV)/.mutation-installed
	MUTATION_MODULES="$(MODULES)" $(BIN)/python tests/mutation/run.py --survivors
	$(BIN)/python tests/mutation/report.py

$(VENV)/.mutation-installed: pyproject.toml
	$(BIN)/pip install -q -e '.[all,test,mutation]'
	touch $@

# console_load drives Debian's chromium (deps) through Playwright (the test extra): venv
# installs both, no browser download.
benchmarks: venv
	$(BIN)/python benchmarks/bundle_throughput.py
	$(BIN)/python benchmarks/install_throughput.py
	$(BIN)/python benchmarks/rollout_scale.py
	$(BIN)/python benchmarks/console_load.py
	$(BIN)/python benchmarks/console_feed_cost.py
	$(BIN)/python benchmarks/chunk_storage.py
	$(BIN)/python benchmarks/delta_size.py
	$(BIN)/python benchmarks/device_network.py
	$(BIN)/python benchmarks/agent_footprint.py

deps:
	@missing=$$(for p in $(APT_PACKAGES); do \
		dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; \
	done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:" $$missing; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

venv: deps $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[all,test]'
	touch $@

clean:
	rm -rf $(VENV) build .mypy_cache .pytest_cache .ruff_cache .hypothesis

# The references written from the code: docs/updater-config.md and docs/cli.md
# (tests/unit/test_reference_docs.py fails when the committed ones are out of date).
.PHONY: docs
docs: venv
	$(BIN)/python docs/generate.py
