"""The real daemon under valgrind (memcheck) through a day's work: a commit,
its on_change and acknowledgement, a promote announced by an event (the
broker move, a second acknowledgement), a notify, GET /metrics and the status
document, a SIGHUP, and the stop. memcheck's errors and definite or indirect
leaks make the daemon exit 99 (--error-exitcode), and the log must show
none."""

import os
import shutil
import signal
import time

import pytest

from harness import daemon as daemon_mod

VALGRIND = shutil.which("valgrind")
SLOW = 30.0  # valgrind runs the daemon 20-50 times slower


@pytest.fixture
def valgrind_daemon(tmp_path, daemon_bin, sim):
    if not VALGRIND:
        pytest.skip("valgrind is not installed")
    log = tmp_path / "valgrind.log"
    wrapper = tmp_path / "dsm-agent-syncd"
    wrapper.write_text("#!/bin/sh\nexec %s --quiet --leak-check=full --show-leak-kinds=definite,indirect "
                       "--errors-for-leak-kinds=definite,indirect --error-exitcode=99 --log-file=%s %s \"$@\"\n"
                       % (VALGRIND, log, daemon_bin))
    wrapper.chmod(0o755)
    d = daemon_mod.Daemon(str(tmp_path / "d"), sim=sim, binary=str(wrapper),
                          overrides={"provider": {"poll_interval": "60s"},
                                     "daemon": {"agent_id": "agent-vg"}})
    try:
        yield d, log
    finally:
        d.stop(timeout=SLOW)


def metric(d, name, **labels):
    want = "dsm_agent_sync_" + name
    if labels:
        want += "{" + ",".join('%s="%s"' % kv for kv in labels.items()) + "}"
    code, _, body = d.http("GET", "/metrics", timeout=SLOW)
    assert code == 200, code
    for line in body.decode().splitlines():
        if line.startswith(want + " "):
            return float(line.split()[-1])
    raise AssertionError("no %s" % want)


def wait_metric(d, name, value, **labels):
    deadline = time.monotonic() + 2 * SLOW
    while metric(d, name, **labels) != value:
        assert time.monotonic() < deadline, "%s%r never reached %s" % (name, labels, value)
        time.sleep(0.5)


def test_no_memcheck_error_or_leak_through_a_days_work(valgrind_daemon, sim):
    d, log = valgrind_daemon
    d.start(timeout=2 * SLOW)
    d.wait_for_primary("p1", epoch=1, timeout=2 * SLOW)
    wait_metric(d, "acks_total", 1, outcome="confirmed")
    sim.promote("p2")  # with an event: the broker moves, a second ack
    d.wait_for_primary("p2", epoch=2, timeout=2 * SLOW)
    wait_metric(d, "acknowledged_epoch", 2)
    assert d.http("POST", "/v1/notify", timeout=SLOW)[0] == 202
    code, doc = d.status()
    assert code == 200 and doc["epoch"] == 2, doc
    d.signal(signal.SIGHUP)
    d.wait_for_log(r"Configuration reloaded", timeout=2 * SLOW)
    rc = d.stop(timeout=2 * SLOW)
    text = log.read_text() if os.path.exists(log) else ""
    findings = [x for x in text.splitlines() if "definitely lost" in x or "indirectly lost" in x
                or "Invalid " in x or "uninitialised" in x or "Mismatched" in x]
    assert rc == 0, "exit %s\n%s" % (rc, text[-4000:])
    assert not findings, text[-4000:]
