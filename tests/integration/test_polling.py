#!/usr/bin/python3
"""Whole-process tests of the polling foundation (issue 2): the real
dsm-agent-syncd against the Provider simulator, following the rule of
contract section 3 and writing the settings file of section 5.

Most tests use a "quiet" daemon (poll_interval and fast_poll_interval 30 s,
brokers on closed ports): after its start-up rounds it polls only when told
to (POST /v1/notify), so every scenario is set up completely in the
simulator before the daemon looks, and there is no race between a step of
the scenario and a poll round.

Run: DSM_BUILD_DIR=$PWD/build-XX /usr/bin/python3 -m pytest -q -s \
         -p no:cacheprovider tests/integration/test_polling.py
"""

import os
import random
import re
import statistics
import stat
import time

import pytest

from harness import util  # noqa: E402
from harness.rounds import expected_settings, mid_lines, poll_now, polls, wait_polls

MID_COMMITTED = "ded36cf01a5547829b18395ff8df2196"
MID_STALE = "d775722cd8e14370afeae64124287aa9"
MID_CONFLICT = "0b11e79c89694bf090eb2feb4eccc48a"

QUIET = {"provider": {"poll_interval": "30s", "fast_poll_interval": "30s",
                      "request_timeout": "2s"}}
BUSY = {"provider": {"poll_interval": "1s", "fast_poll_interval": "200ms",
                     "request_timeout": "2s"}}


# ----- helpers -----------------------------------------------------------------

def settled(d, timeout=20.0):
    """Waits for the start-up rounds of a daemon to be over (first commit
    done and no round running), so that the next notify is the next round."""
    d.wait_for_settings(lambda s: True, timeout)
    poll_now(d, 1, timeout)
    # A round owed from start-up (the broker's first failure, a coalesced
    # notify) may still run: wait until no round has ended for 1 s.
    last, since = polls(d), time.monotonic()
    deadline = since + timeout
    while time.monotonic() < deadline and time.monotonic() - since < 1.0:
        time.sleep(0.1)
        now = polls(d)
        if now != last:
            last, since = now, time.monotonic()


def node_status(doc, node_id):
    for n in doc["nodes"]:
        if n["id"] == node_id:
            return n
    raise KeyError("node %s not in status: %r" % (node_id, doc["nodes"]))


def wait_runs(d, n, timeout=15.0):
    deadline = time.monotonic() + timeout
    while True:
        runs = d.on_change_runs()
        if len(runs) >= n:
            return runs
        if time.monotonic() >= deadline:
            raise TimeoutError("on_change ran %d times, expected %d\n%s"
                               % (len(runs), n, d.log_tail()))
        time.sleep(0.02)


# ----- first synchronization -------------------------------------------------

def test_first_sync_settings_state_and_on_change(sim_nobroker, daemon_factory):
    s = sim_nobroker
    d = daemon_factory(s, QUIET)
    d.wait_for_primary("p1", 1, timeout=15)
    assert d.settings_text() == expected_settings(s, "p1", 1)
    assert stat.S_IMODE(os.stat(d.settings_file).st_mode) == 0o640

    st = d.read_state()
    assert st["epoch"] == 1
    assert st["primary"]["id"] == "p1" and st["primary"]["api_url"] == s.urls["p1"]
    b = s.state()["nodes"]["p1"]["broker"]
    assert st["primary"]["broker"]["host"] == b["host"]
    assert st["primary"]["broker"]["port"] == b["port"]

    runs = wait_runs(d, 1)
    env = runs[0]["env"]
    assert env["DSM_PRIMARY_ID"] == "p1"
    assert env["DSM_EPOCH"] == "1"
    assert env["DSM_BROKER_HOST"] == b["host"]
    assert env["DSM_BROKER_PORT"] == str(b["port"])
    assert env["DSM_BROKER_VHOST"] == b["vhost"]
    assert env["DSM_BROKER_TLS"] in ("false", "0")
    assert env["DSM_SETTINGS_FILE"] == d.settings_file

    # more rounds with nothing new: no rewrite, no second on_change
    ino = os.stat(d.settings_file).st_ino
    poll_now(d, 3)
    assert len(d.on_change_runs()) == 1
    assert os.stat(d.settings_file).st_ino == ino
    assert len(mid_lines(d, MID_COMMITTED)) == 1

    code, doc = d.status()
    assert code == 200 and doc["epoch"] == 1 and doc["primary"]["id"] == "p1"
    assert sorted(n["id"] for n in doc["nodes"]) == ["p1", "p2", "p3"]
    assert all(n["error"] is None for n in doc["nodes"])
    assert doc["warnings"] == []


def test_start_from_load_balancer_only(sim_nobroker, daemon_factory):
    s = sim_nobroker
    d = daemon_factory(s, {"provider": {"endpoints": None, "load_balancer": s.lb_url,
                                        "poll_interval": "1s", "fast_poll_interval": "200ms"}})
    d.wait_for_primary("p1", 1, timeout=15)
    assert d.settings_text() == expected_settings(s, "p1", 1)
    doc = d.wait_for_status(lambda doc: sorted(n["id"] for n in doc["nodes"]) == ["p1", "p2", "p3"],
                            timeout=15)
    for n in doc["nodes"]:
        assert n["api_url"] == s.urls[n["id"]]
    # every node is asked at its own address, not only through the LB
    for nid in ("p1", "p2", "p3"):
        direct = [r for r in s.requests(nid, 200) if not r["via_lb"]]
        assert direct, "%s never polled directly" % nid
    # and it follows a promotion through the discovered nodes
    s.promote("p3", event=False)
    d.wait_for_primary("p3", 2, timeout=15)
    assert d.settings_text() == expected_settings(s, "p3", 2)


# ----- following the Primary --------------------------------------------------

def test_promote_is_followed_and_epoch_grows(sim_nobroker, daemon_factory):
    s = sim_nobroker
    d = daemon_factory(s, BUSY)
    d.wait_for_primary("p1", 1, timeout=15)
    epochs = [1]
    for nid in ("p2", "p3", "p1"):
        r = s.promote(nid, event=False)
        d.wait_for_primary(nid, r["epoch"], timeout=15)  # without any event or notify
        assert d.settings_text() == expected_settings(s, nid, r["epoch"])
        st = d.read_state()
        assert st["epoch"] == r["epoch"] and st["primary"]["id"] == nid
        epochs.append(r["epoch"])
    assert epochs == [1, 2, 3, 4]
    runs = wait_runs(d, 4)
    assert [int(x["env"]["DSM_EPOCH"]) for x in runs] == [1, 2, 3, 4]
    assert [x["env"]["DSM_PRIMARY_ID"] for x in runs] == ["p1", "p2", "p3", "p1"]
    reasons = [re.search(r"DSM_REASON=(\S+)", x) for x in mid_lines(d, MID_COMMITTED)]
    assert len(reasons) == 4
    assert all(m and m.group(1) == "confirmed_by_primary" for m in reasons[1:])


def test_old_primary_dead_new_primary_confirms_itself(sim_nobroker, daemon_factory):
    s = sim_nobroker
    d = daemon_factory(s, QUIET)
    settled(d)
    s.kill("p1")
    s.promote("p2", event=False)
    poll_now(d)
    d.wait_for_primary("p2", 2, timeout=10)
    assert d.settings_text() == expected_settings(s, "p2", 2)
    line = mid_lines(d, MID_COMMITTED)[-1]
    assert "DSM_PRIMARY_ID=p2" in line and "DSM_EPOCH=2" in line
    assert "confirmed_by_primary" in line
    doc = d.wait_for_status(lambda doc: node_status(doc, "p1")["error"], timeout=10)
    assert doc["epoch"] == 2 and doc["primary"]["id"] == "p2"


def test_majority_commits_when_new_primary_is_down(sim_nobroker, daemon_factory):
    """p3 is promoted and dies before the daemon polls: p1 and p2 (standbys)
    report epoch 2 with primary p3, a strict majority of 3 -> commit."""
    s = sim_nobroker
    d = daemon_factory(s, QUIET)
    settled(d)
    s.promote("p3", event=False)
    s.kill("p3")
    for nid in ("p1", "p2"):
        _, _, doc = s.get_state(nid)
        assert doc["node"]["role"] == "standby" and doc["epoch"] == 2
        assert doc["primary"]["id"] == "p3"
    poll_now(d)
    d.wait_for_primary("p3", 2, timeout=10)
    assert d.settings_text() == expected_settings(s, "p3", 2)
    line = mid_lines(d, MID_COMMITTED)[-1]
    assert "DSM_PRIMARY_ID=p3" in line and "DSM_EPOCH=2" in line
    assert "confirmed_by_primary" not in line
    assert d.read_state()["epoch"] == 2


def test_single_standby_claim_is_not_enough(sim_nobroker, daemon_factory):
    """Only p2 reports epoch 2 with primary p3 (p3 dead, p1 lagging): one of
    three is no majority -> nothing committed. When p1 catches up -> commit."""
    s = sim_nobroker
    d = daemon_factory(s, QUIET)
    settled(d)
    before_text = d.settings_text()
    ino = os.stat(d.settings_file).st_ino
    s.lag("p1", True)
    s.promote("p3", event=False)
    s.kill("p3")
    assert s.get_state("p2")[2]["epoch"] == 2 and s.get_state("p1")[2]["epoch"] == 1
    poll_now(d, 4)
    assert d.settings_text() == before_text
    assert os.stat(d.settings_file).st_ino == ino
    assert d.read_state()["epoch"] == 1
    code, doc = d.status()
    assert doc["epoch"] == 1 and doc["primary"]["id"] == "p1"
    assert len(mid_lines(d, MID_COMMITTED)) == 1

    s.lag("p1", False)  # p1 adopts epoch 2 / p3: now 2 of 3
    poll_now(d)
    d.wait_for_primary("p3", 2, timeout=10)
    assert d.settings_text() == expected_settings(s, "p3", 2)


def test_stale_primary_is_ignored_and_warned_once(sim_nobroker, daemon_factory):
    s = sim_nobroker
    d = daemon_factory(s, QUIET)
    settled(d)
    s.kill("p1")
    s.promote("p2", event=False)
    poll_now(d)
    d.wait_for_primary("p2", 2, timeout=10)
    committed_text = d.settings_text()
    runs = len(wait_runs(d, 2))
    mark = d.log_mark()

    st = s.revive_stale("p1")
    assert st["role"] == "primary" and st["epoch"] == 1
    poll_now(d, 5)
    assert d.settings_text() == committed_text
    assert d.read_state()["epoch"] == 2
    stale = mid_lines(d, MID_STALE, mark)
    assert len(stale) == 1, stale  # once per node and epoch, not every poll
    assert "DSM_NODE_ID=p1" in stale[0] and "DSM_EPOCH=1" in stale[0]
    assert "PRIORITY=warning" in stale[0]
    code, doc = d.status()
    assert doc["epoch"] == 2 and doc["primary"]["id"] == "p2"
    assert any("stale primary" in w and "p1" in w for w in doc["warnings"]), doc["warnings"]
    assert len(d.on_change_runs()) == runs

    # the old Primary catches up: it is a plain standby again
    s.sync("p1")
    poll_now(d)
    doc = d.wait_for_status(lambda doc: not any("stale" in w for w in doc["warnings"]), 10)
    assert node_status(doc, "p1")["role"] == "standby"
    assert d.settings_text() == committed_text


def test_conflict_commits_nothing(sim_nobroker, daemon_factory):
    """p2 is promoted to epoch 2 and p3 also claims primary at epoch 2. p2
    answers last (slowed), so the rival claim is in hand when p2 confirms
    itself: rule 7 commits early only with no dissent among the answers in
    hand, and the whole round is a conflict (rule 4). (A rival that answers
    after an early commit is judged when it arrives:
    test_rival_after_early_commit_is_judged_when_it_arrives.)"""
    s = sim_nobroker
    d = daemon_factory(s, QUIET)
    settled(d)
    before_text = d.settings_text()
    mark = d.log_mark()
    s.slow("p2", 0.5)
    s.promote("p2", event=False)
    s.conflict("p3")
    poll_now(d, 4)
    assert d.settings_text() == before_text
    assert d.read_state()["epoch"] == 1
    conf = mid_lines(d, MID_CONFLICT, mark)
    assert len(conf) == 1, conf
    assert "PRIORITY=err" in conf[0] and "DSM_EPOCH=2" in conf[0]
    assert "p2" in conf[0] and "p3" in conf[0]
    code, doc = d.status()
    assert doc["epoch"] == 1 and doc["primary"]["id"] == "p1"
    assert any("conflict" in w for w in doc["warnings"]), doc["warnings"]
    assert len(mid_lines(d, MID_COMMITTED)) == 1


def test_rival_after_early_commit_is_judged_when_it_arrives(sim_nobroker, daemon_factory):
    """Rule 7: p2 confirmed itself and p1 (a majority with p2) follows it, so
    the round commits p2 at epoch 2 before p3 answers; p3, slowed, then
    claims primary at epoch 2 too. The late answer is judged when it
    arrives: a conflict logged and shown, and no move back or further."""
    s = sim_nobroker
    d = daemon_factory(s, QUIET)
    settled(d)
    mark = d.log_mark()
    s.slow("p3", 1.0)
    s.promote("p2", event=False)
    s.conflict("p3")
    poll_now(d, 2)
    d.wait_for_primary("p2", 2, timeout=10)
    util.wait_until(lambda: len(mid_lines(d, MID_CONFLICT, mark)) >= 1, 10, what="the conflict logged")
    code, doc = d.status()
    assert doc["epoch"] == 2 and doc["primary"]["id"] == "p2", doc
    assert any("conflict" in w for w in doc["warnings"]), doc["warnings"]
    assert len(mid_lines(d, MID_COMMITTED, mark)) == 1

    s.sync("p3")  # the conflict ends: p2 is followed
    poll_now(d)
    d.wait_for_primary("p2", 2, timeout=10)
    d.wait_for_status(lambda doc: not any("conflict" in w for w in doc["warnings"]), 10)


# ----- malformed, failing, hung and slow nodes --------------------------------

@pytest.mark.parametrize("mode", ["500", "malformed", "wrong_type", "huge", "reset"])
def test_failing_standby_is_reported_and_primary_followed(sim_nobroker, daemon_factory, mode):
    s = sim_nobroker
    d = daemon_factory(s, QUIET)
    settled(d)
    s.fail("p3", mode)
    s.promote("p2", event=False)
    poll_now(d)
    d.wait_for_primary("p2", 2, timeout=10)
    assert d.settings_text() == expected_settings(s, "p2", 2)
    doc = d.wait_for_status(lambda doc: node_status(doc, "p3")["error"], timeout=10)
    err = node_status(doc, "p3")["error"]
    assert isinstance(err, str) and err.strip()
    assert node_status(doc, "p2")["error"] is None
    assert d.alive()
    # recovery clears the error and p3's real view is seen again (reset:
    # regression test for the ETag of a broken transfer being kept, so the
    # next 304 revalidated an older answer; fixed in 80908c3)
    s.fail("p3", "none")
    poll_now(d)
    d.wait_for_status(lambda doc: node_status(doc, "p3")["error"] is None
                      and node_status(doc, "p3")["epoch"] == 2, timeout=10)


def test_reset_standby_error_is_shown(sim_nobroker, daemon_factory):
    """A reset mid-body is a failed read, shown as the node's error."""
    s = sim_nobroker
    d = daemon_factory(s, QUIET)
    settled(d)
    s.fail("p3", "reset")
    s.promote("p2", event=False)
    poll_now(d)
    d.wait_for_primary("p2", 2, timeout=10)
    poll_now(d, 2)
    code, doc = d.status()
    assert node_status(doc, "p3")["error"]


@pytest.mark.parametrize("how", ["hang", "slow"])
def test_hung_or_slow_standby_is_bounded_by_request_timeout(sim_nobroker, daemon_factory, how):
    s = sim_nobroker
    d = daemon_factory(s, QUIET)  # request_timeout 2s
    settled(d)
    if how == "hang":
        s.hang("p3", True)
    else:
        s.slow("p3", 30)
    s.promote("p2", event=False)
    before = polls(d)
    t0 = time.monotonic()
    assert d.notify({"reason": "test"})[0] == 202
    d.wait_for_primary("p2", 2, timeout=15)
    t_commit = time.monotonic() - t0
    wait_polls(d, before + 1, timeout=15)
    t_round = time.monotonic() - t0
    # the round is bounded by request_timeout (2 s) plus a margin for load
    assert t_round < 2.0 + 4.0, "round took %.1fs" % t_round
    doc = d.wait_for_status(lambda doc: node_status(doc, "p3")["error"], timeout=10)
    assert node_status(doc, "p3")["error"].strip()
    # the next rounds are not blocked by the node either
    before = polls(d)
    assert d.notify({"reason": "test"})[0] == 202
    wait_polls(d, before + 1, timeout=8)
    assert len(s.requests("p3")) >= 3
    print("\n%s p3: commit %.2fs, round %.2fs after notify" % (how, t_commit, t_round))


def test_slow_standby_within_timeout_is_fine(sim_nobroker, daemon_factory):
    s = sim_nobroker
    d = daemon_factory(s, QUIET)
    settled(d)
    s.slow("p3", 0.5)
    s.promote("p2", event=False)
    poll_now(d)
    doc = d.wait_for_status(lambda doc: doc["epoch"] == 2
                            and node_status(doc, "p3")["epoch"] == 2, timeout=10)
    assert node_status(doc, "p3")["error"] is None


# ----- ETag / If-None-Match ----------------------------------------------------

def test_etag_if_none_match_and_304(sim_nobroker, daemon_factory):
    s = sim_nobroker
    d = daemon_factory(s, QUIET)
    settled(d)
    s.reset_counters()
    poll_now(d, 3)
    for nid in ("p1", "p2", "p3"):
        reqs = [r for r in s.requests(nid) if r["path"].startswith("/api/v1/ha/state")]
        assert reqs, nid
        assert all(r["if_none_match"] for r in reqs), reqs
        assert all(r["status"] == 304 for r in reqs), reqs
    # a change is seen despite the ETag (new body, new ETag), then 304 again
    s.promote("p2", event=False)
    poll_now(d)
    d.wait_for_primary("p2", 2, timeout=10)
    poll_now(d)
    last = s.requests("p2")[-1]
    assert last["status"] == 304 and last["if_none_match"]
    assert s.counters("p2").get("status_200", 0) >= 1


# ----- benchmark: promote -> settings rewritten ---------------------------------

def test_benchmark_promote_to_settings_latency(sim_nobroker, daemon_factory):
    """poll_interval 1 s, no events, no notify: the time from a promote to
    the settings file rewritten. Median printed for the issue's note."""
    s = sim_nobroker
    d = daemon_factory(s, BUSY)
    d.wait_for_primary("p1", 1, timeout=15)
    rng = random.Random(2)
    order = ["p2", "p3", "p1"]
    lat = []
    for i in range(10):
        time.sleep(rng.uniform(0.0, 1.0))  # a random phase against the poll timer
        nid = order[i % 3]
        t0 = time.monotonic()
        r = s.promote(nid, event=False)
        d.wait_for_primary(nid, r["epoch"], timeout=15)
        lat.append(time.monotonic() - t0)
    med = statistics.median(lat)
    print("\nBENCH promote->settings (poll_interval 1s, no events): median %.3fs, "
          "min %.3fs, max %.3fs, n=%d: %s"
          % (med, min(lat), max(lat), len(lat), " ".join("%.2f" % x for x in lat)))
    # "within a few poll intervals", with room for a loaded machine
    assert max(lat) < 8.0


def test_304_without_if_none_match_is_no_answer(sim_nobroker, daemon_factory):
    """Only a 304 to a sent ETag means "unchanged". p1 fails once (its ETag
    is dropped with the failed read) and then answers 304 to everything:
    the request carried no If-None-Match, so the 304 must not revive p1's
    cached answer (primary at epoch 1, which after the promote would read
    as a stale Primary). It is a failed read of p1."""
    s = sim_nobroker
    d = daemon_factory(s, QUIET)
    settled(d)
    s.fail("p1", "500")
    poll_now(d, 2)
    s.promote("p2", event=False)
    s.fail("p1", "304")
    poll_now(d, 3)
    d.wait_for_primary("p2", 2, timeout=10)
    code, doc = d.status()
    p1 = node_status(doc, "p1")
    assert p1 is not None and p1["error"] and "304" in p1["error"], doc["nodes"]
    assert not any("stale" in w for w in doc["warnings"]), doc["warnings"]
