"""The two decisions the daemon exists for, against the real binary and the
Provider simulator: defects an independent review found (issue 12), each
reproduced as it was found, plus rule 7 (a round decides as soon as its
answers decide it)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from harness import util  # noqa: E402
from harness.rounds import expected_settings, poll_now  # noqa: E402


def test_lone_standby_is_not_a_majority(sim_nobroker, daemon_factory):
    """Contract rule 6. Committed to p1 in a known p1/p2/p3 cluster; p1 and p2
    answer 500; p3 answers "standby, epoch 8, primary p2, nodes: []" naming a
    broker of its own choosing. One vote of three is no majority: nothing is
    committed, the settings file and the state file stay at p1, epoch 1, and
    the broker credentials never go to that host."""
    s = sim_nobroker
    d = daemon_factory(sim=s, overrides={"provider": {"poll_interval": "1s"}})
    d.wait_for_primary("p1", 1, timeout=15)
    before = d.settings_text()
    assert before == expected_settings(s, "p1", 1)

    s.fail("p1", "500")
    s.fail("p2", "500")
    s.forge("p3", {"epoch": 8, "node": {"role": "standby"}, "nodes": [],
                   "primary": {"id": "p2", "api_url": s.urls["p2"],
                               "broker": {"host": "evil.example", "port": 5672,
                                          "vhost": "/", "tls": False}}})
    poll_now(d, rounds=3)

    assert d.settings_text() == before
    assert d.read_state()["epoch"] == 1
    assert not d.log_text().count("evil.example"), d.log_tail()
    code, doc = d.status()
    assert code == 200 and doc["epoch"] == 1 and doc["primary"]["id"] == "p1", doc


def test_known_majority_still_commits(sim_nobroker, daemon_factory):
    """The other side of rule 6: two Standbys of the known three, both naming
    p2 at epoch 2 while p1 and p2 are down, are a strict majority."""
    s = sim_nobroker
    d = daemon_factory(sim=s, overrides={"provider": {"poll_interval": "1s"}})
    d.wait_for_primary("p1", 1, timeout=15)
    s.promote("p2", event=False)
    s.fail("p2", "500")
    s.forge("p1", {"node": {"role": "standby"}, "epoch": 2,
                   "primary": {"id": "p2", "api_url": s.urls["p2"],
                               "broker": s.state()["nodes"]["p2"]["broker"]}})
    d.notify()
    d.wait_for_primary("p2", 2, timeout=15)
    assert d.read_state()["epoch"] == 2


def test_second_instance_exits_1_and_changes_nothing(sim_nobroker, daemon_factory):
    """Contract section 2: one daemon per state file. --once beside a running
    daemon, and a second daemon, exit 1 at once naming the lock and the
    holder's PID, and leave the state file as it was."""
    s = sim_nobroker
    d = daemon_factory(sim=s, overrides={"provider": {"poll_interval": "1s"}})
    d.wait_for_primary("p1", 1, timeout=15)
    with open(d.state_file, "rb") as f:
        state_before = f.read()
    mtime_before = os.stat(d.state_file).st_mtime_ns
    lock = d.state_file + ".lock"

    for args in (("--once",), ()):
        r = d.run(*args, timeout=15)
        assert r.returncode == 1, (args, r.returncode, r.stderr)
        assert lock in r.stderr, r.stderr
        assert "PID %d" % d.pid in r.stderr, r.stderr
    with open(d.state_file, "rb") as f:
        assert f.read() == state_before
    assert os.stat(d.state_file).st_mtime_ns == mtime_before
    assert d.alive()

    # The lock goes with the process: after a stop, --once runs.
    assert d.stop() == 0
    r = d.run("--once", timeout=30)
    assert r.returncode == 0, r.stderr


def test_once_does_not_write_an_older_epoch(sim_nobroker, daemon_factory):
    """The path the review found for the fence to go backwards: a --once run
    beside the daemon. It is refused, so the daemon's newer epoch stays."""
    s = sim_nobroker
    d = daemon_factory(sim=s, overrides={"provider": {"poll_interval": "1s"}})
    d.wait_for_primary("p1", 1, timeout=15)
    s.promote("p2", event=False)
    d.notify()
    d.wait_for_primary("p2", 2, timeout=15)
    r = d.run("--once", timeout=15)
    assert r.returncode == 1, r.stderr
    assert d.read_state()["epoch"] == 2


def test_vanished_primary_host_does_not_hold_the_agent(sim_nobroker, daemon_factory):
    """Contract rule 7. The Primary's host vanishes (its API accepts and never
    answers), the operator promotes p2, the Provider API notifies. With
    request_timeout at 60 s the daemon must not wait for p1: p2 confirmed
    itself and 2 of 3 answered with no rival, so it commits while p1's
    request is still in flight. When p1 later answers stale, it is judged
    then: a stale-primary warning, no move back."""
    s = sim_nobroker
    d = daemon_factory(sim=s, overrides={"provider": {"poll_interval": "30s",
                                                      "request_timeout": "60s"}})
    d.wait_for_primary("p1", 1, timeout=15)
    s.hang("p1", True)
    s.promote("p2", event=False)
    d.notify()
    # Far below request_timeout: only an early decision gets here in time.
    d.wait_for_primary("p2", 2, timeout=20)
    assert d.read_state()["epoch"] == 2
    assert d.wait_for_log(r"Primary p2 committed at epoch 2", 5)

    # p1 comes back believing it is still the Primary at epoch 1.
    s.revive_stale("p1")
    s.hang("p1", False)
    poll_now(d, rounds=2, timeout=90)
    doc = d.wait_for_status(lambda st: any("stale primary p1" in w for w in st["warnings"]), 90)
    assert doc["epoch"] == 2 and doc["primary"]["id"] == "p2", doc
    assert d.settings_text() == expected_settings(s, "p2", 2)
    util.wait_until(lambda: d.alive(), 1, what="daemon alive")
