#!/usr/bin/python3
"""Soak: compressed hours of operation against the simulator (issue 8).

Default size (DSM_SOAK_SCALE=1): 100 promotions, 1000 poll rounds, 1000
notify requests. DSM_SOAK_SCALE=10 is the issue's full size (1000, 10 000,
10 000). Memory (VmRSS; Pss and Private_* from smaps_rollup are reported)
must come back within 10% + 256 KiB of its value after a warm-up.

The same soak runs under an ASan/UBSan build when one is found:
DSM_SAN_BUILD_DIR (default: <repo>/build-san, which `make check` builds).
When DSM_BUILD_DIR itself points at a SANITIZE=1 build, test_soak runs it
sanitized too (the RSS bound is then skipped: ASan's quarantine and shadow
memory grow by design) and checks the exit code and the sanitizer reports.

    DSM_BUILD_DIR=$PWD/build /usr/bin/python3 -m pytest -q -p no:cacheprovider \
        tests/integration/test_soak.py
"""

import os
import re
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from harness import daemon as daemon_mod  # noqa: E402
from harness import util  # noqa: E402

SCALE = float(os.environ.get("DSM_SOAK_SCALE", "1"))
PROMOTES = max(1, int(100 * SCALE))
POLLS = max(1, int(1000 * SCALE))
NOTIFIES = max(1, int(1000 * SCALE))
SAN_RE = re.compile(r"ERROR: AddressSanitizer|ERROR: LeakSanitizer|runtime error:|"
                    r"SUMMARY: (Address|Leak|UndefinedBehavior)Sanitizer")


def is_sanitized(binary):
    if os.environ.get("DSM_SANITIZE") == "1":
        return True
    try:
        with open(binary, "rb") as f:
            return b"__asan_init" in f.read()
    except OSError:
        return False


def mem(pid):
    """VmRSS plus smaps_rollup fields, in KiB."""
    out = {}
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1])
    try:
        with open("/proc/%d/smaps_rollup" % pid) as f:
            for line in f:
                k = line.split(":")[0]
                if k in ("Pss", "Private_Clean", "Private_Dirty", "Anonymous"):
                    out[k] = int(line.split()[1])
    except OSError:
        pass
    return out


def status(d, timeout=15):
    """GET /v1/status, waiting out 429 (status shares the request bucket)."""
    deadline = time.monotonic() + timeout
    while True:
        code, doc = d.status()
        if code == 200:
            return doc
        assert code == 429 and time.monotonic() < deadline, (code, doc)
        time.sleep(0.2)


def polls(d):
    return status(d)["counters"]["polls"]


def soak(d, s, promotes, n_polls, n_notifies, order=("p2", "p3", "p1")):
    """Drives the running daemon d against simulator s."""
    epoch = s.state()["epoch"]
    # promotions, each followed (notify makes it immediate)
    for i in range(promotes):
        nid = order[i % len(order)]
        s.promote(nid, event=False)
        epoch += 1
        d.notify({"reason": "soak promote", "epoch": epoch})
        d.wait_for_primary(nid, epoch, timeout=15)
    # notify requests: accepted or rate limited, never anything else
    codes = {}
    t0 = time.monotonic()
    for i in range(n_notifies):
        c = d.notify({"reason": "soak %d" % i} if i % 2 else None)[0]
        codes[c] = codes.get(c, 0) + 1
    assert set(codes) <= {202, 429}, codes
    # the listener's bucket: 40 burst, 20/s refill (contract: 429 over the rate)
    assert 1 <= codes.get(202, 0) <= 40 + 20 * (time.monotonic() - t0) + 2, codes
    # poll rounds by the timer (poll_interval is short here)
    start = polls(d)
    deadline = time.monotonic() + max(60, n_polls * 0.2)
    while polls(d) < start + n_polls:
        assert time.monotonic() < deadline, "only %d of %d polls" % (polls(d) - start, n_polls)
        assert d.alive()
        time.sleep(0.25)
    return epoch, codes


def run_soak(sim, daemon, sanitized):
    s, d = sim, daemon
    d.wait_for_primary("p1", 1, timeout=30)
    t0 = time.monotonic()
    # warm-up: every path once, allocator pools filled
    soak(d, s, 9, 100, 100)
    time.sleep(1)
    m0 = mem(d.pid)
    epoch, codes = soak(d, s, PROMOTES, POLLS, NOTIFIES)
    time.sleep(1)
    m1 = mem(d.pid)
    doc = status(d)
    assert doc["epoch"] == epoch
    assert doc["counters"]["changes"] >= PROMOTES
    elapsed = time.monotonic() - t0
    sys.stderr.write("\nsoak x%g: %d promotes, %d polls, %d notifies (%r) in %.1fs; "
                     "memory after warm-up %r, after soak %r (sanitized=%s)\n"
                     % (SCALE, PROMOTES, POLLS, NOTIFIES, codes, elapsed, m0, m1, sanitized))
    if not sanitized:
        limit = m0["VmRSS"] * 1.10 + 256
        assert m1["VmRSS"] <= limit, "VmRSS grew from %d to %d KiB" % (m0["VmRSS"], m1["VmRSS"])
        if "Anonymous" in m0:
            assert m1["Anonymous"] <= m0["Anonymous"] * 1.10 + 256, (m0, m1)
    # files stayed whole and current; no temp files left
    st = d.read_state()
    assert st["epoch"] == epoch
    assert int(d.read_settings()["provider"]["epoch"]) == epoch
    assert not [x for x in os.listdir(d.workdir) if ".tmp-" in x]
    rc = d.stop(timeout=30)
    log = d.log_text()
    reports = SAN_RE.findall(log)
    assert rc == 0, "exit %s\n%s" % (rc, d.log_tail(80))
    assert not reports, "sanitizer reports:\n" + "\n".join(
        x for x in log.splitlines() if SAN_RE.search(x) or "#" in x[:8])


def soak_overrides():
    return {"provider": {"poll_interval": "25ms", "fast_poll_interval": "25ms",
                         "request_timeout": "2s"},
            "daemon": {"log_level": "info"}}


def test_soak(sim_nobroker, daemon_factory, daemon_bin):
    sanitized = is_sanitized(daemon_bin)
    d = daemon_factory(sim=sim_nobroker, overrides=soak_overrides(),
                       env={"ASAN_OPTIONS": "detect_leaks=1:halt_on_error=1"} if sanitized else None)
    run_soak(sim_nobroker, d, sanitized)


def san_build_dir():
    env = os.environ.get("DSM_SAN_BUILD_DIR")
    if env:
        return env
    for cand in ("build-san",):
        p = os.path.join(util.REPO_ROOT, cand)
        if os.path.exists(os.path.join(p, "dsm-agent-syncd")):
            return p
    return None


def test_soak_sanitized(sim_nobroker, tmp_path, daemon_bin):
    """The same soak under ASan/UBSan: exit 0 on SIGTERM, no leak or error
    report. Skipped when no sanitizer build is found, or when DSM_BUILD_DIR
    already is one (test_soak covers it then)."""
    if is_sanitized(daemon_bin):
        pytest.skip("DSM_BUILD_DIR is a sanitizer build: test_soak ran it")
    bd = san_build_dir()
    if not bd:
        pytest.skip("no sanitizer build (make SANITIZE=1 BUILD=build-san all, or DSM_SAN_BUILD_DIR)")
    binary = os.path.join(bd, "dsm-agent-syncd")
    if not is_sanitized(binary):
        pytest.skip("%s is not built with SANITIZE=1" % binary)
    d = daemon_mod.Daemon(str(tmp_path / "asan"), sim=sim_nobroker, binary=binary,
                          overrides=soak_overrides(),
                          env={"ASAN_OPTIONS": "detect_leaks=1:halt_on_error=1",
                               "UBSAN_OPTIONS": "print_stacktrace=1"})
    try:
        d.start(timeout=30)
        run_soak(sim_nobroker, d, True)
    finally:
        d.stop()
