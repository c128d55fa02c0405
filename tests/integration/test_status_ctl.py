"""The status document (contract section 7) and dsm-agent-syncctl (section 2),
against the real daemon and the Provider simulator (brokers on closed ports).

Both poll intervals are long (60 s): rounds after start-up come from the test,
through a notify, so each step waits for exactly the round it caused.

Run: DSM_BUILD_DIR=$PWD/build-h16 /usr/bin/python3 -m pytest -q -p no:cacheprovider \
         tests/integration/test_status_ctl.py
"""

import calendar
import json
import os
import re
import time

import pytest

from harness import util

NOTIFY_TOKEN = "h16-status-secret-41b9e0"
QUIET = {"provider": {"poll_interval": "60s", "fast_poll_interval": "60s"}}
RFC3339_UTC = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z$")
UPDATE_STATES = {"disabled", "none", "installed", "held", "waiting", "downloading", "applying", "failed"}


def closed_brokers(nodes=3):
    return {"p%d" % (i + 1): ("127.0.0.1", util.closed_port()) for i in range(nodes)}


def status(d):
    """GET /v1/status -> document (waits out a 429 for a bounded time)."""
    for _ in range(30):
        code, doc = d.status()
        if code != 429:
            break
        time.sleep(0.2)
    assert code == 200, (code, doc)
    return doc


def poll_now(d):
    """A notify, then waits until the round it started is over; returns the
    status document after it."""
    before = status(d)["counters"]["polls"]
    code, doc = d.notify({"reason": "test"})
    assert code == 202, doc
    return d.wait_for_status(lambda st: st["counters"]["polls"] > before, timeout=10)


def start(daemon_factory, sim, **kw):
    d = daemon_factory(sim, overrides={k: dict(v) for k, v in QUIET.items()},
                       notify_token=NOTIFY_TOKEN, **kw)
    d.wait_for_primary("p1", 1, timeout=15)
    # Let the start-up rounds (discovery, the broker's first failure) end,
    # so that a test's two-step change to the simulator is seen whole.
    last, since = status(d)["counters"]["polls"], time.monotonic()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and time.monotonic() - since < 1.0:
        time.sleep(0.1)
        now = status(d)["counters"]["polls"]
        if now != last:
            last, since = now, time.monotonic()
    return d


def promote(d, sim, node):
    epoch = sim.promote(node, event=False)["epoch"]
    d.notify({"reason": "promoted %s" % node})
    d.wait_for_primary(node, epoch, timeout=10)
    return epoch


@pytest.fixture
def sim3(sim_factory):
    return sim_factory(brokers=closed_brokers(3))


def check_node(n):
    assert set(n) >= {"id", "api_url", "role", "version", "epoch", "last_seen", "error"}, n
    assert n["id"] is None or isinstance(n["id"], str)
    assert isinstance(n["api_url"], str) and n["api_url"].startswith("http")
    assert n["role"] in ("primary", "standby", None)
    assert n["version"] is None or isinstance(n["version"], str)
    assert n["epoch"] is None or (isinstance(n["epoch"], int) and not isinstance(n["epoch"], bool))
    assert n["last_seen"] is None or RFC3339_UTC.match(n["last_seen"]), n
    assert n["error"] is None or (isinstance(n["error"], str) and n["error"]), n


def rfc3339_epoch(s):
    return calendar.timegm(time.strptime(s[:19], "%Y-%m-%dT%H:%M:%S"))


def is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


# ---- the document ----------------------------------------------------------

def test_status_document_fields_and_types(daemon_factory, sim3):
    d = start(daemon_factory, sim3)
    st = poll_now(d)
    assert isinstance(st["daemon_version"], str) and st["daemon_version"]
    assert is_int(st["epoch"]) and st["epoch"] == 1
    p = st["primary"]
    assert p["id"] == "p1" and p["api_url"] == sim3.urls["p1"]
    b = p["broker"]
    assert set(b) >= {"host", "port", "vhost", "tls"}
    assert b["host"] == "127.0.0.1" and is_int(b["port"]) and 1 <= b["port"] <= 65535
    assert isinstance(b["vhost"], str) and isinstance(b["tls"], bool)
    settings = d.read_settings()
    assert str(b["port"]) == settings["rabbitmq"]["port"] and b["vhost"] == settings["rabbitmq"]["vhost"]
    # Brokers are on closed ports: never "connected".
    assert st["broker_connection"] in ("connecting", "down")
    assert RFC3339_UTC.match(st["last_poll"]) and RFC3339_UTC.match(st["last_change"])
    assert st["last_change"] <= st["last_poll"]
    # UTC, and recent: the round the notify started.
    assert abs(rfc3339_epoch(st["last_poll"]) - time.time()) < 30, st["last_poll"]
    # Every node, asked at its own address, healthy.
    assert sorted(n["id"] for n in st["nodes"]) == ["p1", "p2", "p3"]
    for n in st["nodes"]:
        check_node(n)
        assert n["api_url"] == sim3.urls[n["id"]]
        assert n["role"] == ("primary" if n["id"] == "p1" else "standby")
        assert n["version"] == "9.0.1" and n["epoch"] == 1 and n["error"] is None
        assert RFC3339_UTC.match(n["last_seen"])
    assert isinstance(st["warnings"], list) and all(isinstance(w, str) for w in st["warnings"])
    assert st["warnings"] == []
    u = st["update"]
    assert set(u) >= {"state", "reason", "target", "installed"}
    assert u["state"] in UPDATE_STATES
    assert u["state"] == "none" and u["target"] is None and u["installed"] == "9.0.1"
    c = st["counters"]
    assert set(c) >= {"polls", "events", "notifies", "changes"}
    assert all(is_int(c[k]) and c[k] >= 0 for k in ("polls", "events", "notifies", "changes"))
    assert c["notifies"] == 1 and c["changes"] == 1 and c["polls"] >= 2 and c["events"] == 0


def test_warning_two_node_cluster(daemon_factory, sim_factory):
    sim = sim_factory(brokers=closed_brokers(2), nodes=2)
    d = start(daemon_factory, sim)
    st = d.wait_for_status(lambda s: any("cluster size" in w for w in s["warnings"]), timeout=10)
    w = [w for w in st["warnings"] if "cluster size" in w]
    assert len(w) == 1 and re.search(r"\b2\b", w[0]), w
    assert len(st["nodes"]) == 2


def test_three_node_cluster_has_no_size_warning(daemon_factory, sim3):
    d = start(daemon_factory, sim3)
    st = poll_now(d)
    assert not any("cluster size" in w for w in st["warnings"]), st["warnings"]


def test_warning_stale_primary(daemon_factory, sim3):
    d = start(daemon_factory, sim3)
    promote(d, sim3, "p2")
    sim3.revive_stale("p1")  # p1 claims primary at epoch 1 again
    mark = d.log_mark()
    st = poll_now(d)
    assert "stale primary p1 at epoch 1" in st["warnings"], st["warnings"]
    assert st["epoch"] == 2 and st["primary"]["id"] == "p2"
    p1 = [n for n in st["nodes"] if n["id"] == "p1"][0]
    assert p1["role"] == "primary" and p1["epoch"] == 1
    d.wait_for_log(r"d775722cd8e14370afeae64124287aa9.*DSM_NODE_ID=p1", timeout=15, start=mark)
    assert d.read_settings()["provider"]["primary_id"] == "p2"
    # Once p1 catches up the warning goes away.
    sim3.sync("p1")
    st = poll_now(d)
    assert not any("stale" in w for w in st["warnings"]), st["warnings"]


def test_warning_primary_conflict(daemon_factory, sim3):
    d = start(daemon_factory, sim3)
    promote(d, sim3, "p2")
    settings = d.settings_text()
    # p3 claims primary at the current epoch (2) too. The mark comes first:
    # the promote's round may still be in flight (rule 7 committed early)
    # and already see the conflict.
    mark = d.log_mark()
    sim3.conflict("p3")
    st = poll_now(d)
    conflict = [w for w in st["warnings"] if "conflict" in w]
    assert len(conflict) == 1, st["warnings"]
    assert "p2" in conflict[0] and "p3" in conflict[0] and "2" in conflict[0]
    d.wait_for_log(r"0b11e79c89694bf090eb2feb4eccc48a", timeout=15, start=mark)
    assert st["epoch"] == 2 and st["primary"]["id"] == "p2"
    assert d.settings_text() == settings


def test_warning_conflict_at_a_new_epoch_commits_nothing(daemon_factory, sim3):
    d = start(daemon_factory, sim3)
    settings = d.settings_text()
    # p2 promoted (epoch 2), then p3 also claims primary at epoch 2. p2
    # answers last, so p3's rival claim is in hand when p2 confirms itself:
    # rule 7 then holds the early commit and the round is a conflict.
    sim3.slow("p2", 0.5)
    sim3.promote("p2", event=False)
    sim3.conflict("p3")
    poll_now(d)
    # A round already in flight when the notify came may end first; the
    # notify's own round follows it (coalesced), so wait for its verdict.
    st = d.wait_for_status(lambda st: any("conflict" in w for w in st["warnings"]), timeout=10)
    assert st["epoch"] == 1 and st["primary"]["id"] == "p1"
    assert d.settings_text() == settings


def test_warning_flapping(daemon_factory, sim3):
    d = start(daemon_factory, sim3)
    # The first commit (p1) is not a change; three changes are not flapping yet.
    for node in ("p2", "p3", "p1"):
        promote(d, sim3, node)
    st = poll_now(d)
    assert not any("flapping" in w for w in st["warnings"]), st["warnings"]
    assert st["counters"]["changes"] == 4
    # The fourth change within 10 minutes is.
    promote(d, sim3, "p2")
    st = poll_now(d)
    flap = [w for w in st["warnings"] if "flapping" in w]
    assert len(flap) == 1, st["warnings"]
    assert "4" in flap[0], flap
    promote(d, sim3, "p3")
    st = poll_now(d)
    assert any("flapping" in w and "5" in w for w in st["warnings"]), st["warnings"]


def test_node_down_shows_error_and_last_seen(daemon_factory, sim3):
    d = start(daemon_factory, sim3)
    st = poll_now(d)
    seen = {n["id"]: n["last_seen"] for n in st["nodes"]}
    time.sleep(1.1)  # so last_seen of the live nodes moves on
    sim3.kill("p3")
    st = poll_now(d)
    nodes = {n["id"]: n for n in st["nodes"]}
    for n in nodes.values():
        check_node(n)
    p3 = nodes["p3"]
    assert p3["error"] and isinstance(p3["error"], str), p3
    assert p3["last_seen"] == seen["p3"], (p3, seen)
    assert nodes["p1"]["error"] is None and nodes["p1"]["last_seen"] > seen["p1"]
    # The Primary is still p1; the down node does not change that.
    assert st["primary"]["id"] == "p1"
    r = d.ctl("status")
    assert r.returncode == 0, r.stderr
    line = [l for l in r.stdout.splitlines() if l.strip().startswith("p3 ")]
    assert len(line) == 1 and p3["error"][:20] in line[0], r.stdout
    # Back up: the error clears.
    sim3.start_node("p3")
    st = poll_now(d)
    p3 = [n for n in st["nodes"] if n["id"] == "p3"][0]
    assert p3["error"] is None and p3["last_seen"] > seen["p3"]


# ---- dsm-agent-syncctl -------------------------------------------------------

def test_ctl_status_human(daemon_factory, sim_factory):
    sim = sim_factory(brokers=closed_brokers(2), nodes=2)
    d = start(daemon_factory, sim)
    st = d.wait_for_status(lambda s: any("cluster size" in w for w in s["warnings"]), timeout=10)
    r = d.ctl("status")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    lines = out.splitlines()
    # Primary and epoch on one line.
    prim = [l for l in lines if l.startswith("Primary:")]
    assert len(prim) == 1 and "p1" in prim[0] and "epoch 1" in prim[0] and sim.urls["p1"] in prim[0], out
    # Broker with its connection state.
    brk = [l for l in lines if l.startswith("Broker:")]
    assert len(brk) == 1 and st["broker_connection"] in brk[0], out
    assert str(st["primary"]["broker"]["port"]) in brk[0]
    # One line per node, with role and version.
    for nid, role in (("p1", "primary"), ("p2", "standby")):
        nl = [l for l in lines if l.split()[:1] == [nid]]
        assert len(nl) == 1, out
        assert role in nl[0] and "9.0.1" in nl[0], nl
    # The warnings, by name.
    widx = [i for i, l in enumerate(lines) if l.startswith("Warnings:")]
    assert len(widx) == 1, out
    assert "cluster size 2" in out
    # The update gate.
    upd = [l for l in lines if l.startswith("Update:")]
    assert len(upd) == 1 and st["update"]["state"] in upd[0] and "9.0.1" in upd[0], out
    assert NOTIFY_TOKEN not in out


def test_ctl_status_json_is_the_document(daemon_factory, sim3):
    d = start(daemon_factory, sim3)
    st = poll_now(d)
    r = d.ctl("status", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["epoch"] == st["epoch"] == 1
    assert set(doc) == set(st)
    assert doc["primary"] == st["primary"]
    assert [n["id"] for n in doc["nodes"]] == [n["id"] for n in st["nodes"]]
    assert doc["warnings"] == st["warnings"]
    assert doc["update"] == st["update"]


def test_ctl_notify_starts_a_round(daemon_factory, sim3):
    d = start(daemon_factory, sim3)
    st0 = poll_now(d)
    before = {nid: sim3.counters(nid).get("requests", 0) for nid in sim3.urls}
    mark = d.log_mark()
    r = d.ctl("notify")
    assert r.returncode == 0, r.stderr
    d.wait_for_status(lambda s: s["counters"]["polls"] > st0["counters"]["polls"]
                      and s["counters"]["notifies"] == st0["counters"]["notifies"] + 1, timeout=10)
    after = {nid: sim3.counters(nid).get("requests", 0) for nid in sim3.urls}
    assert all(after[k] > before[k] for k in before), (before, after)
    d.wait_for_log(r"37e50e3188e74df3b5cb1cf22f7f44aa.*dsm-agent-syncctl", timeout=15, start=mark)


def test_ctl_daemon_not_running(daemon_factory, sim3):
    d = daemon_factory(sim3, overrides=QUIET, notify_token=NOTIFY_TOKEN, start=False)
    for args in (("status",), ("status", "--json"), ("notify",)):
        r = d.ctl(*args)
        assert r.returncode != 0 and r.returncode != 78, (args, r.returncode)
        assert "not answering" in r.stderr and str(d.notify_port) in r.stderr, r.stderr
        assert r.stdout == ""
    # Also after a daemon stopped.
    d.start()
    assert d.ctl("status").returncode == 0
    assert d.stop() == 0
    r = d.ctl("status")
    assert r.returncode == 1 and "not answering" in r.stderr, r.stderr


def test_ctl_wrong_token(daemon_factory, sim3, tmp_path):
    d = start(daemon_factory, sim3)
    other_token = tmp_path / "other.token"
    fd = os.open(str(other_token), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("not-the-daemons-token\n")
    with open(d.config_path) as f:
        text = f.read()
    assert d.notify_token_file in text
    cfg = tmp_path / "ctl-wrong-token.ini"
    cfg.write_text(text.replace(d.notify_token_file, str(other_token)))
    for args in (("status",), ("notify",)):
        r = util_run_ctl("-c", str(cfg), *args)
        assert r.returncode == 1, (args, r.returncode, r.stderr)
        assert "401" in r.stderr and "token" in r.stderr, r.stderr
        assert "not-the-daemons-token" not in r.stderr + r.stdout
    # The daemon logged the refusal, without either token.
    d.wait_for_log(r"3df29a54da1c49828e32990bcbad1b87", timeout=15)
    assert "not-the-daemons-token" not in d.log_text() and NOTIFY_TOKEN not in d.log_text()


def test_ctl_bad_config_exits_78(daemon_factory, sim3, tmp_path):
    d = daemon_factory(sim3, overrides=QUIET, notify_token=NOTIFY_TOKEN, start=False)
    with open(d.config_path) as f:
        good = f.read()
    cases = {
        "unknown-key.ini": good.replace("[notify]\n", "[notify]\nlisten_typo = 1\n"),
        "unknown-section.ini": good + "\n[bogus]\nx = 1\n",
        "bad-listen.ini": re.sub(r"listen = .*", "listen = not-an-address", good),
    }
    for name, text in cases.items():
        path = tmp_path / name
        path.write_text(text)
        r = util_run_ctl("-c", str(path), "status")
        assert r.returncode == 78, (name, r.returncode, r.stderr)
        assert re.search(re.escape(str(path)) + r":\d+: ", r.stderr), (name, r.stderr)
    r = util_run_ctl("-c", str(tmp_path / "missing.ini"), "status")
    assert r.returncode == 78, r.stderr
    assert "missing.ini" in r.stderr


def util_run_ctl(*args, timeout=15.0):
    from harness.daemon import CTL_BIN
    import subprocess
    if not os.access(CTL_BIN, os.X_OK):
        pytest.skip("%s not built" % CTL_BIN)
    return subprocess.run([CTL_BIN] + list(args), stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=timeout)


def test_warning_five_node_cluster(daemon_factory, sim_factory):
    sim = sim_factory(brokers=closed_brokers(5), nodes=5)
    d = start(daemon_factory, sim)
    st = d.wait_for_status(lambda s: any("cluster size" in w for w in s["warnings"]), timeout=10)
    w = [w for w in st["warnings"] if "cluster size" in w]
    assert len(w) == 1 and re.search(r"\b5\b", w[0]), w
