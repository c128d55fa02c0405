"""Helpers for whole-process tests that reason about poll rounds: the exact
settings file text of contract section 5, the daemon's poll counter, and
making the daemon poll now through POST /v1/notify."""

import os
import stat
import time


def expected_settings(sim, node_id, epoch):
    """The exact text of contract section 5 for node_id's broker at epoch."""
    n = sim.state()["nodes"][node_id]
    b = n["broker"]
    return ("# Managed by dsm-agent-syncd. Local changes are overwritten.\n"
            "[rabbitmq]\n"
            "host = %s\n"
            "port = %d\n"
            "vhost = %s\n"
            "tls = %s\n"
            "\n"
            "[provider]\n"
            "primary_id = %s\n"
            "epoch = %d\n"
            "api_url = %s\n"
            % (b["host"], b["port"], b["vhost"], "true" if b["tls"] else "false",
               node_id, epoch, n["api_url"]))


def polls(d, timeout=10.0):
    """counters.polls from the status document (retries a 429: the
    listener's rate limit is 20 requests/s)."""
    deadline = time.monotonic() + timeout
    while True:
        code, doc = d.status()
        if code == 200:
            return doc["counters"]["polls"]
        assert code == 429 and time.monotonic() < deadline, (code, doc)
        time.sleep(0.2)


def wait_polls(d, target, timeout=20.0):
    deadline = time.monotonic() + timeout
    while True:
        n = polls(d)
        if n >= target:
            return n
        if time.monotonic() >= deadline:
            raise TimeoutError("polls counter %d < %d after %.1fs\n%s"
                               % (n, target, timeout, d.log_tail()))
        time.sleep(0.1)


def poll_now(d, rounds=2, timeout=20.0):
    """Makes the daemon run poll rounds now (POST /v1/notify) and waits for
    them. With rounds >= 2 at least one complete round started after this
    call (a round in flight at the call counts as the first)."""
    for _ in range(rounds):
        before = polls(d)
        code, doc = d.notify({"reason": "test"})
        assert code == 202, doc
        wait_polls(d, before + 1, timeout)


def mode_of(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def mid_lines(d, mid, start=0):
    """The daemon's log lines with MESSAGE_ID mid (from line start on)."""
    return [ln for ln in d.log_lines()[start:] if "MESSAGE_ID=%s" % mid in ln]
