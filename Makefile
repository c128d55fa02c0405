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

LIBS_PKG := librabbitmq libcurl jansson libsystemd inih libmicrohttpd libcrypto
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
CTL_OBJ := $(patsubst %.c,$(BUILD)/%.o,agent/ctl.c $(COMMON_SRC))
TOOLS_SRC := $(sort $(wildcard tests/tools/*.c))
TOOLS := $(patsubst tests/tools/%.c,$(BUILD)/tests/%,$(TOOLS_SRC))
UNIT_SRC := $(sort $(wildcard tests/unit/test_*.c))
UNIT_TESTS := $(patsubst tests/unit/%.c,$(BUILD)/tests/%,$(UNIT_SRC))

all: $(BUILD)/dsm-agent-syncd $(BUILD)/dsm-agent-syncctl

$(BUILD)/%.o: %.c
	@mkdir -p $(dir $@)
	$(CC) $(CPPFLAGS) $(CFLAGS) -c -o $@ $<

$(BUILD)/dsm-agent-syncd: $(DAEMON_OBJ)
	$(CC) $(LDFLAGS) -o $@ $^ $(LDLIBS)

$(BUILD)/dsm-agent-syncctl: $(CTL_OBJ)
	$(CC) $(LDFLAGS) -o $@ $^ $(LDLIBS)

# A unit test links only the modules listed in its .deps file, so each one
# builds on its own.
.SECONDEXPANSION:
$(BUILD)/tests/test_%: tests/unit/test_%.c $$(patsubst %.c,$(BUILD)/%.o,$$(shell cat tests/unit/test_$$*.deps))
	@mkdir -p $(dir $@)
	$(CC) $(CPPFLAGS) $(CFLAGS) $(LDFLAGS) -o $@ $^ $(LDLIBS) $(shell $(PKG_CONFIG) --libs cmocka)

# Test and benchmark helper programs (probe, publisher): each links the
# common objects it needs from its own .deps file.
$(BUILD)/tests/%: tests/tools/%.c $$(patsubst %.c,$(BUILD)/%.o,$$(shell cat tests/tools/$$*.deps 2>/dev/null))
	@mkdir -p $(dir $@)
	$(CC) $(CPPFLAGS) $(CFLAGS) $(LDFLAGS) -o $@ $^ $(LDLIBS)

deps:
	@./tests/install-deps.sh

unit: $(UNIT_TESTS)
	@set -e; for t in $(UNIT_TESTS); do echo "== $$t"; $$t; done

integration: all $(TOOLS)
	DSM_BUILD_DIR=$(abspath $(BUILD)) $(PYTHON) -m pytest -q -p no:cacheprovider tests/integration $(PYTEST_ARGS)

check: deps
	$(MAKE) all $(TOOLS) $(UNIT_TESTS)
	$(MAKE) unit
	$(MAKE) integration

bench: deps
	$(MAKE) all $(TOOLS)
	DSM_BUILD_DIR=$(abspath $(BUILD)) $(PYTHON) tests/bench/run.py

install: all
	install -d $(DESTDIR)$(SBINDIR) $(DESTDIR)$(BINDIR)
	install -m 0755 $(BUILD)/dsm-agent-syncd $(DESTDIR)$(SBINDIR)/dsm-agent-syncd
	install -m 0755 $(BUILD)/dsm-agent-syncctl $(DESTDIR)$(BINDIR)/dsm-agent-syncctl
	install -d $(DESTDIR)$(SYSCONFDIR)/dsm-agent-sync
	install -m 0644 conf/agent-sync.ini $(DESTDIR)$(SYSCONFDIR)/dsm-agent-sync/agent-sync.ini

clean:
	rm -rf build build-san

.PHONY: all deps unit integration check bench install clean

-include $(shell find $(BUILD) -name '*.d' 2>/dev/null)

package: all
	./packaging/build-deb.sh

.PHONY: package
