# dsm-agent-sync — plain Makefile, every library through pkg-config.
#   make                  build/dsm-agent-syncd, build/dsm-agent-syncctl
#   make check            install missing Debian packages, unit + whole-process tests
#   make check SANITIZE=1 the same under ASan+UBSan (objects in build-san/)
#   make bench            benchmarks (prints figures)
#   make install DESTDIR=... PREFIX=/usr

PREFIX ?= /usr/local
SBINDIR ?= $(PREFIX)/sbin
BINDIR ?= $(PREFIX)/bin
SYSCONFDIR ?= /etc
CC ?= cc
PKG_CONFIG ?= pkg-config
PYTHON ?= /usr/bin/python3
PYTEST_ARGS ?=
PYTEST_PATHS ?= tests/integration
CHECK_FUZZ_TIME ?= 10

LIBS_PKG := librabbitmq libcurl jansson libsystemd inih libmicrohttpd libssl libcrypto
# include/ holds what common/ offers to both programs; the daemon's private
# headers sit beside their sources in agent/. Code in common/ sees only
# include/, so it cannot reach into the daemon.
CPPFLAGS += -Iinclude -D_GNU_SOURCE
CFLAGS ?= -O2 -g
CFLAGS += -std=gnu11 -Wall -Wextra -Werror -Wshadow -Wno-unused-parameter -Wformat=2 \
          -fno-strict-aliasing -fstack-protector-strong -D_FORTIFY_SOURCE=2 -MMD -MP \
          $(shell $(PKG_CONFIG) --cflags $(LIBS_PKG) 2>/dev/null)
LDLIBS += $(shell $(PKG_CONFIG) --libs $(LIBS_PKG) 2>/dev/null) -lm

ifeq ($(SANITIZE),1)
BUILD ?= build-san
CFLAGS += -O1 -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=all -U_FORTIFY_SOURCE
LDFLAGS += -fsanitize=address,undefined
else
BUILD ?= build
endif

COMMON_SRC := $(sort $(wildcard common/*.c))
AGENT_SRC := $(filter-out agent/main.c agent/ctl.c,$(sort $(wildcard agent/*.c)))
DAEMON_OBJ := $(patsubst %.c,$(BUILD)/%.o,agent/main.c $(AGENT_SRC) $(COMMON_SRC))
# The control tool is built from its own object list and libraries (as
# chrony builds chronyc): it reads the config and asks the daemon over HTTP.
CTL_OBJ := $(patsubst %.c,$(BUILD)/%.o,agent/ctl.c common/config.c common/config_values.c common/log.c common/util.c)
CTL_LIBS_PKG := libcurl jansson inih libsystemd
TOOLS_SRC := $(sort $(wildcard tests/tools/*.c))
TOOLS := $(patsubst tests/tools/%.c,$(BUILD)/tests/%,$(TOOLS_SRC))
UNIT_SRC := $(sort $(wildcard tests/unit/test_*.c))
UNIT_TESTS := $(patsubst tests/unit/%.c,$(BUILD)/tests/%,$(UNIT_SRC))

all: $(BUILD)/dsm-agent-syncd $(BUILD)/dsm-agent-syncctl

$(BUILD)/common/%.o: common/%.c
	@mkdir -p $(dir $@)
	$(CC) $(CPPFLAGS) $(CFLAGS) -c -o $@ $<

$(BUILD)/agent/%.o: agent/%.c
	@mkdir -p $(dir $@)
	$(CC) $(CPPFLAGS) -Iagent $(CFLAGS) -c -o $@ $<

$(BUILD)/dsm-agent-syncd: $(DAEMON_OBJ)
	$(CC) $(LDFLAGS) -o $@ $^ $(LDLIBS)

$(BUILD)/dsm-agent-syncctl: $(CTL_OBJ)
	$(CC) $(LDFLAGS) -o $@ $^ $(shell $(PKG_CONFIG) --libs $(CTL_LIBS_PKG) 2>/dev/null) -lm

# A unit test links only the modules listed in its .deps file, so each one
# builds on its own. (A function, not a pattern: under second expansion a
# literal % would be replaced by the stem.)
unit_objs = $(patsubst %.c,$(BUILD)/%.o,$(shell cat tests/unit/test_$(1).deps))
tool_objs = $(patsubst %.c,$(BUILD)/%.o,$(shell cat tests/tools/$(1).deps 2>/dev/null))
.SECONDEXPANSION:
$(BUILD)/tests/test_%: tests/unit/test_%.c $$(call unit_objs,$$*)
	@mkdir -p $(dir $@)
	$(CC) $(CPPFLAGS) -Iagent $(CFLAGS) $(LDFLAGS) -o $@ $(filter %.c %.o,$^) $(LDLIBS) $(shell $(PKG_CONFIG) --libs cmocka)

# Test and benchmark helper programs (probe, publisher, drivers): each links
# the modules listed in its own .deps file.
$(BUILD)/tests/%: tests/tools/%.c $$(call tool_objs,$$*)
	@mkdir -p $(dir $@)
	$(CC) $(CPPFLAGS) -Iagent $(CFLAGS) $(LDFLAGS) -o $@ $(filter %.c %.o,$^) $(LDLIBS)

deps:
	@./tests/install-deps.sh

unit: $(UNIT_TESTS)
	@set -e; for t in $(UNIT_TESTS); do echo "== $$t"; $$t; done

# The tests build packages with make themselves: they must not inherit this
# make's variables (SANITIZE=1 would reach the .deb build through MAKEFLAGS).
integration: all $(TOOLS)
	env -u MAKEFLAGS -u MFLAGS -u MAKELEVEL DSM_BUILD_DIR=$(abspath $(BUILD)) $(PYTHON) -m pytest -q -p no:cacheprovider $(PYTEST_PATHS) $(PYTEST_ARGS)

# libFuzzer targets: tests/fuzz/fuzz_NAME.c + .deps, corpus in tests/fuzz/corpus/NAME/.
FUZZ_SRC := $(sort $(wildcard tests/fuzz/fuzz_*.c))
FUZZ_BIN := $(patsubst tests/fuzz/%.c,build-fuzz/%,$(FUZZ_SRC))
FUZZ_TIME ?= 60
FUZZ_CFLAGS := -std=gnu11 -g -O1 -Iinclude -Iagent -D_GNU_SOURCE -fsanitize=fuzzer,address,undefined \
               $(shell $(PKG_CONFIG) --cflags $(LIBS_PKG) 2>/dev/null)

fuzz_srcs = $(shell cat tests/fuzz/fuzz_$(1).deps 2>/dev/null)
build-fuzz/fuzz_%: tests/fuzz/fuzz_%.c $$(call fuzz_srcs,$$*)
	@mkdir -p build-fuzz
	clang $(FUZZ_CFLAGS) -o $@ $(filter %.c,$^) $(LDLIBS)

# Runs every fuzz target for FUZZ_TIME seconds each (make check: a short run).
fuzz: $(FUZZ_BIN)
	@set -e; for f in $(FUZZ_BIN); do \
		n=$${f#build-fuzz/fuzz_}; mkdir -p build-fuzz/corpus-$$n; \
		echo "== fuzz $$n ($(FUZZ_TIME)s)"; \
		$$f -max_total_time=$(FUZZ_TIME) -print_final_stats=0 -close_fd_mask=3 \
			build-fuzz/corpus-$$n tests/fuzz/corpus/$$n; \
	done

# The deterministic simulation (tests/sim): the real synchronization core
# (sync.c, rule.c, gate.c, settings_render, the state file's format) driven
# by a seeded world with faults and crashes, invariants checked after every
# step. make sim SEEDS=N runs seeds 1..N; make check runs a fixed set.
# SIM_SYNC=... SIM_RULE=... link other versions of the core instead (an old
# commit's, a deliberately broken one) into build/tests/sim-custom. The
# fixed set is a range plus seeds that found defects once (a seed names a
# world only as long as tests/sim/world.c draws the same way).
SEEDS ?= 2000
SIM_CHECK_SEEDS ?= 1-300,828,1244,1587,1761
SIM_SYNC ?= agent/sync.c
SIM_RULE ?= agent/rule.c
SIM_OBJ := $(patsubst tests/sim/%.c,$(BUILD)/sim/%.o,$(sort $(wildcard tests/sim/*.c)))
SIM_LIB := $(patsubst %.c,$(BUILD)/%.o,agent/gate.c agent/settings.c agent/runner.c common/atomic_file.c \
             common/log.c common/provider.c common/state.c common/util.c)
SIM_CUSTOM := $(filter-out agent/sync.c agent/rule.c,$(SIM_SYNC) $(SIM_RULE))
SIM_BIN := $(BUILD)/tests/sim$(if $(SIM_CUSTOM),-custom)
SIM_CORE := $(if $(SIM_CUSTOM),$(SIM_SYNC) $(SIM_RULE),$(BUILD)/agent/sync.o $(BUILD)/agent/rule.o)

$(BUILD)/sim/%.o: tests/sim/%.c
	@mkdir -p $(dir $@)
	$(CC) $(CPPFLAGS) -Iagent $(CFLAGS) -c -o $@ $<

$(SIM_BIN): $(SIM_OBJ) $(SIM_LIB) $(SIM_CORE) $(if $(SIM_CUSTOM),FORCE)
	@mkdir -p $(dir $@)
	$(CC) $(CPPFLAGS) -Iagent $(filter-out -MMD -MP,$(CFLAGS)) $(LDFLAGS) -o $@ $(filter %.c %.o,$^) $(LDLIBS)

sim: $(SIM_BIN)
	$(SIM_BIN) --count $(SEEDS)

sim-check: $(SIM_BIN)
	$(SIM_BIN) --seeds $(SIM_CHECK_SEEDS)

FORCE:

# The code is formatted by clang-format (.clang-format); the build checks it.
format-check:
	clang-format --dry-run --Werror $(wildcard agent/*.c agent/*.h common/*.c include/*.h tests/unit/*.c tests/tools/*.c tests/fuzz/*.c tests/sim/*.c tests/sim/*.h)

check: deps
	$(MAKE) format-check
	$(MAKE) all $(TOOLS) $(UNIT_TESTS)
	$(MAKE) unit
	$(MAKE) sim-check
ifneq ($(SANITIZE),1)
	# The unit suites again under ASan+UBSan; the soak test also runs the
	# daemon built with them.
	$(MAKE) SANITIZE=1 BUILD=build-san all $(patsubst $(BUILD)/%,build-san/%,$(UNIT_TESTS))
	$(MAKE) SANITIZE=1 BUILD=build-san unit
endif
	$(MAKE) fuzz FUZZ_TIME=$(CHECK_FUZZ_TIME)
	$(MAKE) integration PYTEST_ARGS='$(PYTEST_ARGS) --ignore=tests/integration/test_systemd.py'
	$(MAKE) systemd-check

# The .deb under a real systemd: a container booted with systemd-nspawn on an
# overlay of this machine's root (tests/integration/test_systemd.py). Needs
# root and systemd-container; skipped, with the reason, where it cannot boot.
systemd-check: all
	env -u MAKEFLAGS -u MFLAGS -u MAKELEVEL DSM_BUILD_DIR=$(abspath $(BUILD)) $(PYTHON) -m pytest -q -p no:cacheprovider -rsx tests/integration/test_systemd.py

# make bench AGENTS=1000 BENCH_ARGS='--only fleet': the fleet's size (default
# 200) and any option of tests/bench/run.py (--only, --quick, --keep, --markdown).
BENCH_ARGS ?=
bench: deps
	$(MAKE) all $(TOOLS)
	DSM_BUILD_DIR=$(abspath $(BUILD)) $(PYTHON) tests/bench/run.py \
		$(if $(filter command line environment,$(origin AGENTS)),--agents $(AGENTS)) $(BENCH_ARGS)

# The whole product live on loopback (tests/demo.py): real RabbitMQ nodes, the
# Provider HA cluster simulator, AGENTS dsm-agent-syncd daemons (default 1).
#   make demo             one agent, the story step by step
#   make demo AGENTS=50   a fleet, with convergence percentiles per step and, after
#                         each promote, how many Agents acknowledged it to the Provider
AGENTS ?= 1
demo: deps
	$(MAKE) all $(TOOLS)
	PYTHONDONTWRITEBYTECODE=1 DSM_BUILD_DIR=$(abspath $(BUILD)) $(PYTHON) tests/demo.py --agents $(AGENTS)

install: all
	install -d $(DESTDIR)$(SBINDIR) $(DESTDIR)$(BINDIR)
	install -m 0755 $(BUILD)/dsm-agent-syncd $(DESTDIR)$(SBINDIR)/dsm-agent-syncd
	install -m 0755 $(BUILD)/dsm-agent-syncctl $(DESTDIR)$(BINDIR)/dsm-agent-syncctl
	install -d $(DESTDIR)$(SYSCONFDIR)/dsm-agent-sync
	install -m 0644 conf/agent-sync.ini $(DESTDIR)$(SYSCONFDIR)/dsm-agent-sync/agent-sync.ini

clean:
	rm -rf build build-san build-fuzz

.PHONY: all demo deps unit integration systemd-check check bench install clean fuzz format-check sim sim-check FORCE

-include $(shell find $(BUILD) -name '*.d' 2>/dev/null)

package: all
	./packaging/build-deb.sh

.PHONY: package
