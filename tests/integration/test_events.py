#!/usr/bin/python3
"""Whole-process tests of issue 3: events over real RabbitMQ and broker loss
(contract section 4), with the real dsm-agent-syncd, the Provider simulator
and two real RabbitMQ nodes on loopback.

The `sim` fixture puts p1's broker on rabbit node 0 and p2's and p3's on
node 1. Every daemon here runs with poll_interval 60s, so any poll round
seen within a test was caused by an event, a notify or a broker loss;
heartbeat 2s and fast_poll_interval 200ms.

Queues and bindings are checked with rabbitmqctl against the test node
(run as user rabbitmq with the node's own environment and cookie).

Run: DSM_BUILD_DIR=$PWD/build-h13 /usr/bin/python3 -m pytest -q -p no:cacheprovider \
         tests/integration/test_events.py
"""

import json
import os
import re
import subprocess
import sys
import time
import urllib.request

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from harness import daemon as daemon_mod  # noqa: E402
from harness import util  # noqa: E402

EXCHANGE = "dsm.provider.events"
MID_CONNECTED = "cc4e3ac90cd94de2a4b78de1b4f03840"
MID_LOST = "680e787066fe4ef696372bf6d086b2bf"
MID_COMMITTED = "ded36cf01a5547829b18395ff8df2196"
HEARTBEAT = 2.0
POLL_INTERVAL = "60s"
PUBLISH = os.path.join(daemon_mod.BUILD_DIR, "tests", "amqp_publish")
RABBITMQCTL = "/usr/lib/rabbitmq/bin/rabbitmqctl"

OVERRIDES = {
    "provider": {"poll_interval": POLL_INTERVAL, "fast_poll_interval": "200ms",
                 "poll_jitter": "0"},
    "broker": {"heartbeat": "2s"},
    "daemon": {"log_level": "debug"},
}


def note(msg):
    """Measured timings go to stderr (shown with -s or on failure)."""
    sys.stderr.write("[test_events] %s\n" % msg)


# ----- RabbitMQ inspection -------------------------------------------------------


def rabbitmqctl(node, *args, timeout=60):
    """rabbitmqctl against one test node; returns parsed JSON output."""
    p = subprocess.run([RABBITMQCTL, "-n", node.name, "-q", *args, "--formatter", "json"],
                       env=node.env(), cwd=node.dir, user="rabbitmq", group="rabbitmq",
                       extra_groups=[], stdin=subprocess.DEVNULL, capture_output=True,
                       text=True, timeout=timeout)
    assert p.returncode == 0, "rabbitmqctl %s: %s %s" % (args, p.stdout, p.stderr)
    return json.loads(p.stdout or "[]")


QUEUE_COLS = ("name", "durable", "auto_delete", "exclusive", "consumers", "messages",
              "messages_ready", "messages_unacknowledged")


def daemon_queues(node):
    """Server-named queues on node (the daemon's; nothing else in these tests
    declares queues)."""
    return [q for q in rabbitmqctl(node, "list_queues", *QUEUE_COLS)
            if q["name"].startswith("amq.gen-")]


def wait_queues(node, pred, timeout=30, what="queues"):
    deadline = time.monotonic() + timeout
    last = None
    while True:
        last = daemon_queues(node)
        if pred(last):
            return last
        if time.monotonic() >= deadline:
            raise AssertionError("%s on %r not as expected within %ss; last %r"
                                 % (what, node, timeout, last))
        time.sleep(0.3)


# ----- publishing ---------------------------------------------------------------


def pika_publish(node, messages):
    """Publishes [(routing_key, body bytes)] on node's exchange with publisher
    confirms, in one connection."""
    import pika
    conn = pika.BlockingConnection(pika.ConnectionParameters(
        host=node.host, port=node.port, credentials=pika.PlainCredentials("guest", "guest"),
        connection_attempts=1, socket_timeout=10, stack_timeout=15,
        blocked_connection_timeout=10))
    try:
        ch = conn.channel()
        ch.exchange_declare(EXCHANGE, exchange_type="topic", durable=True)
        ch.confirm_delivery()
        for key, body in messages:
            ch.basic_publish(EXCHANGE, key, body,
                             properties=pika.BasicProperties(content_type="application/json"),
                             mandatory=True)
    finally:
        conn.close()


def event(node, key, doc):
    pika_publish(node, [(key, json.dumps(doc).encode())])


# ----- daemon helpers ------------------------------------------------------------


def status(d):
    code, doc = d.status()
    assert code == 200, (code, doc)
    return doc


def counters(d):
    return status(d)["counters"]


def healthz(d, timeout=2.0):
    with urllib.request.urlopen(d.base_url() + "/healthz", timeout=timeout) as r:
        return r.status, json.loads(r.read())


def broker_port(doc):
    return doc["primary"]["broker"]["port"] if doc.get("primary") else None


def wait_connected(d, node, timeout=30):
    """Status says connected, to the broker on node."""
    return d.wait_for_status(lambda doc: doc["broker_connection"] == "connected"
                             and broker_port(doc) == node.port, timeout=timeout)


def wait_quiet(d, quiet=1.0, timeout=20):
    """Waits until counters.polls stays unchanged for `quiet` seconds (the
    start-up rounds are over; with poll_interval 60s nothing else polls).
    Returns the counters. A settle step, not an assertion."""
    deadline = time.monotonic() + timeout
    c = counters(d)
    since = time.monotonic()
    while True:
        time.sleep(0.1)
        n = counters(d)
        if n["polls"] != c["polls"]:
            c, since = n, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return n
        if time.monotonic() >= deadline:
            raise TimeoutError("poll rounds did not settle within %ss: %r" % (timeout, n))


def start_daemon(daemon_factory, sim, node):
    """A daemon following p1, connected to node (p1's broker), settled."""
    d = daemon_factory(sim=sim, overrides=OVERRIDES)
    d.wait_for_primary("p1", epoch=1, timeout=15)
    wait_connected(d, node, timeout=30)
    wait_quiet(d)
    return d


def gets_after(sim, node_id, t):
    """The simulator's GETs of the state document at node_id after wall time t."""
    return [r for r in sim.requests(node_id, limit=0)
            if r["t"] > t and r["method"] == "GET" and r["path"].startswith("/api/v1/ha/state")]


def log_since(d, mark, regex):
    rx = re.compile(regex)
    return [x for x in d.log_lines()[mark:] if rx.search(x)]


# ----- tests ----------------------------------------------------------------------


def test_connects_and_consumes_with_exclusive_server_named_queue(sim, rabbit_nodes, daemon_factory):
    n0, n1 = rabbit_nodes
    d = daemon_factory(sim=sim, overrides=OVERRIDES)
    d.wait_for_primary("p1", epoch=1, timeout=15)
    doc = wait_connected(d, n0)
    assert doc["primary"]["id"] == "p1"
    d.wait_for_log(r"PRIORITY=\S+ MESSAGE_ID=%s .*127\.0\.0\.1:%d" % (MID_CONNECTED, n0.port), 5)

    qs = wait_queues(n0, lambda qs: len(qs) == 1 and qs[0]["consumers"] == 1,
                     what="the daemon's queue")
    q = qs[0]
    assert q["exclusive"] is True and q["auto_delete"] is True and q["durable"] is False, q
    binds = rabbitmqctl(n0, "list_bindings", "source_name", "source_kind", "destination_name",
                        "destination_kind", "routing_key")
    keys = sorted(b["routing_key"] for b in binds
                  if b["destination_name"] == q["name"] and b["source_name"] == EXCHANGE)
    assert keys == ["agent.#", "provider.#"], binds
    exch = [e for e in rabbitmqctl(n0, "list_exchanges", "name", "type", "durable")
            if e["name"] == EXCHANGE]
    assert exch and exch[0]["type"] == "topic", exch
    # nothing on p2's broker
    assert daemon_queues(n1) == []

    # consuming: an event on that queue reaches the daemon and makes it poll
    c0 = wait_quiet(d)
    event(n0, "agent.update.available", {"version": "9.0.2"})
    d.wait_for_status(lambda doc: doc["counters"]["events"] == c0["events"] + 1
                      and doc["counters"]["polls"] >= c0["polls"] + 1, timeout=5)

    # the queue lives only as long as the daemon's connection
    assert d.stop() == 0
    wait_queues(n0, lambda qs: qs == [], timeout=20, what="the queue gone after stop")


def test_promote_event_moves_settings_and_connection(sim, rabbit_nodes, daemon_factory):
    n0, n1 = rabbit_nodes
    d = start_daemon(daemon_factory, sim, n0)
    c0 = counters(d)
    t0 = time.monotonic()
    r = sim.promote("p2", event=True)
    assert r["published"]["p1"] == "ok", r
    st = d.wait_for_primary("p2", epoch=2, timeout=15)
    dt = time.monotonic() - t0
    note("promote event -> settings p2: %.3fs" % dt)
    assert dt < 5.0, "settings followed after %.2fs (poll_interval is %s)" % (dt, POLL_INTERVAL)
    assert st["rabbitmq"]["port"] == str(n1.port)
    assert st["provider"]["api_url"] == sim.urls["p2"]
    assert counters(d)["events"] >= c0["events"] + 1

    doc = wait_connected(d, n1, timeout=30)
    assert doc["primary"]["id"] == "p2" and doc["epoch"] == 2
    dt2 = time.monotonic() - t0
    note("promote event -> connected to p2's broker: %.3fs" % dt2)
    # consuming on the new broker, the old connection (and its exclusive queue) gone
    wait_queues(n1, lambda qs: len(qs) == 1 and qs[0]["consumers"] == 1,
                what="the daemon's queue on the new broker")
    wait_queues(n0, lambda qs: qs == [], timeout=20, what="no queue left on the old broker")
    assert d.wait_for_log(r"MESSAGE_ID=%s .*127\.0\.0\.1:%d" % (MID_CONNECTED, n1.port), 5)


def test_event_claiming_unconfirmed_primary_commits_nothing(sim, rabbit_nodes, daemon_factory):
    n0, _ = rabbit_nodes
    d = start_daemon(daemon_factory, sim, n0)
    c0 = wait_quiet(d)
    mark = d.log_mark()
    state0 = d.read_state()
    settings0 = d.settings_text()
    t_wall = time.time()
    event(n0, "provider.primary.changed",
          {"epoch": 99, "primary_id": "p3", "api_url": sim.urls["p3"]})
    # the hint is taken: a poll round follows ...
    d.wait_for_status(lambda doc: doc["counters"]["events"] == c0["events"] + 1
                      and doc["counters"]["polls"] >= c0["polls"] + 1, timeout=5)
    assert gets_after(sim, "p3", t_wall), "the round did not ask p3"
    wait_quiet(d)
    # ... but nothing the Provider does not confirm is committed
    doc = status(d)
    assert doc["epoch"] == 1 and doc["primary"]["id"] == "p1", doc
    assert doc["broker_connection"] == "connected" and broker_port(doc) == n0.port
    assert d.settings_text() == settings0
    state1 = d.read_state()
    assert (state1["epoch"], state1["primary"]) == (state0["epoch"], state0["primary"]) == \
        (1, state0["primary"]) and state0["primary"]["id"] == "p1"
    assert not log_since(d, mark, MID_COMMITTED)
    assert not log_since(d, mark, MID_LOST)
    util.wait_until(d.on_change_runs, 10, what="the on_change run for p1")
    assert all(x["env"]["DSM_PRIMARY_ID"] == "p1" for x in d.on_change_runs())


@pytest.mark.parametrize("key,body", [
    ("provider.version.changed", {"node_id": "p2", "version": "9.0.2"}),
    ("agent.update.available", {"version": "9.0.2"}),
])
def test_version_and_update_events_trigger_a_poll(sim, rabbit_nodes, daemon_factory, key, body):
    n0, _ = rabbit_nodes
    d = start_daemon(daemon_factory, sim, n0)
    c0 = wait_quiet(d)
    t_wall, t0 = time.time(), time.monotonic()
    event(n0, key, body)
    d.wait_for_status(lambda doc: doc["counters"]["events"] == c0["events"] + 1
                      and doc["counters"]["polls"] >= c0["polls"] + 1, timeout=5)
    dt = time.monotonic() - t0
    note("%s -> poll round done: %.3fs" % (key, dt))
    for nid in ("p1", "p2", "p3"):
        got = gets_after(sim, nid, t_wall)
        assert got, "no GET at %s after the event" % nid
        assert got[0]["t"] - t_wall < 5.0
    # one event, one round (coalescing never multiplies)
    c1 = wait_quiet(d)
    assert c1["polls"] == c0["polls"] + 1, (c0, c1)
    assert status(d)["broker_connection"] == "connected"


MALFORMED = [
    ("provider.primary.changed", b"not json at all"),
    ("provider.primary.changed", b'[{"epoch": 2, "primary_id": "p2"}]'),
    ("provider.foo", b'{"epoch": 2, "primary_id": "p2", "api_url": "http://127.0.0.1:1"}'),
    ("agent.bar.baz", b'{"version": "9.0.2"}'),
    ("provider.primary.changed", b'{"epoch": "2", "primary_id": 2, "api_url": null}'),
    ("provider.version.changed", b'{"node_id": 7, "version": 9.1}'),
    ("agent.update.available", b'{"version": ["9.0.2"]}'),
    ("provider.primary.changed", b"{" * (1 << 20)),            # 1 MiB
    ("provider.primary.changed", b""),                          # empty
    ("provider.primary.changed",
     b'{"epoch": 2, "primary_id": "p\xff\xfe2", "api_url": "http://127.0.0.1:1"}'),  # bad UTF-8
    ("agent.update.available", b'{"version": "9.0.2"'),         # truncated
]


def test_malformed_events_are_acked_and_ignored(sim, rabbit_nodes, daemon_factory):
    n0, _ = rabbit_nodes
    d = start_daemon(daemon_factory, sim, n0)
    c0 = wait_quiet(d)
    mark = d.log_mark()
    settings0 = d.settings_text()
    pika_publish(n0, MALFORMED)
    # a valid sentinel behind them on the same queue: once its round is
    # done, every malformed message before it has been delivered
    event(n0, "agent.update.available", {"version": "9.0.2"})
    d.wait_for_status(lambda doc: doc["counters"]["events"] >= c0["events"] + 1
                      and doc["counters"]["polls"] >= c0["polls"] + 1, timeout=15)
    c1 = wait_quiet(d)
    # ignored: only the sentinel counts and polls
    assert c1["events"] == c0["events"] + 1, (c0, c1)
    assert c1["polls"] == c0["polls"] + 1, (c0, c1)
    assert c1["changes"] == c0["changes"]
    # acknowledged: nothing left in the queue, nothing unacknowledged
    qs = wait_queues(n0, lambda qs: len(qs) == 1 and qs[0]["messages"] == 0
                     and qs[0]["messages_unacknowledged"] == 0, timeout=20,
                     what="an empty, fully acked queue")
    assert qs[0]["consumers"] == 1
    # logged at debug, one line per dropped message
    ignored = log_since(d, mark, r"PRIORITY=debug .*ignor")
    assert len(ignored) >= len(MALFORMED), "\n".join(d.log_lines()[mark:])
    # still connected (the 1 MiB body did not cost the connection), healthy, unchanged
    doc = status(d)
    assert doc["broker_connection"] == "connected" and broker_port(doc) == n0.port
    assert doc["epoch"] == 1 and doc["primary"]["id"] == "p1"
    assert not log_since(d, mark, MID_LOST)
    assert not log_since(d, mark, MID_COMMITTED)
    assert d.settings_text() == settings0
    assert healthz(d) == (200, {"status": "ok"})
    assert d.alive()


def run_storm(sim, node, d, count=1000):
    """Publishes `count` provider.version.changed events on node as fast as
    tests/amqp_publish can (publisher confirms), checking /healthz every 50
    ms until the daemon has counted them all. Returns measurements."""
    c0 = wait_quiet(d)
    req0 = sim.counters("p1")["requests"]
    body = json.dumps({"node_id": "p2", "version": "9.0.1"})
    t0 = time.monotonic()
    pub = subprocess.Popen([PUBLISH, node.host, str(node.port), "/", EXCHANGE,
                            "provider.version.changed", body, str(count)],
                           stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, start_new_session=True)
    worst, checks = 0.0, 0
    try:
        deadline = time.monotonic() + 60
        while True:
            h0 = time.monotonic()
            assert healthz(d, timeout=2.0) == (200, {"status": "ok"})
            worst, checks = max(worst, time.monotonic() - h0), checks + 1
            doc = status(d)
            if pub.poll() is not None and doc["counters"]["events"] >= c0["events"] + count:
                break
            assert time.monotonic() < deadline, "storm not consumed: %r" % doc["counters"]
            time.sleep(0.05)
        out = pub.communicate(timeout=5)[0]
        assert pub.returncode == 0, out
    finally:
        util.stop_popen(pub, timeout=5)
    drained = time.monotonic() - t0
    c1 = wait_quiet(d)
    m = {"drained": drained, "rounds": c1["polls"] - c0["polls"],
         "events": c1["events"] - c0["events"], "changes": c1["changes"] - c0["changes"],
         "gets_p1": sim.counters("p1")["requests"] - req0, "worst_healthz": worst,
         "healthz_checks": checks}
    note("storm: %d events consumed in %.2fs -> %d poll rounds, %d GETs at p1; "
         "/healthz worst %.0f ms over %d checks"
         % (m["events"], drained, m["rounds"], m["gets_p1"], worst * 1000, checks))
    return m


needs_publish = pytest.mark.skipif(not os.access(PUBLISH, os.X_OK),
                                   reason="tests/amqp_publish not built")


@needs_publish
def test_event_storm_is_consumed_acked_and_daemon_stays_responsive(sim, rabbit_nodes,
                                                                   daemon_factory):
    n0, _ = rabbit_nodes
    d = start_daemon(daemon_factory, sim, n0)
    mark = d.log_mark()
    m = run_storm(sim, n0, d)
    assert m["events"] == 1000, m
    assert m["changes"] == 0, m
    assert m["worst_healthz"] < 1.0, m
    # coalescing in the contract's sense: at most one round in flight and one
    # pending, so never more rounds than events (+ the one in flight)
    assert 1 <= m["rounds"] <= 1001, m
    doc = status(d)
    assert doc["broker_connection"] == "connected" and broker_port(doc) == n0.port
    assert doc["epoch"] == 1
    assert not log_since(d, mark, MID_LOST)
    qs = wait_queues(n0, lambda qs: len(qs) == 1 and qs[0]["messages"] == 0, timeout=20,
                     what="the storm drained")
    assert qs[0]["messages_unacknowledged"] == 0 and qs[0]["consumers"] == 1


@needs_publish
def test_event_storm_costs_only_a_handful_of_rounds(sim, rabbit_nodes, daemon_factory):
    """A handful: docs/architecture.md says a storm costs at most one extra
    round; delivery in prefetch-sized batches may cost a few more. 10 leaves
    room for that and for a debounce of the order of fast_poll_interval."""
    n0, _ = rabbit_nodes
    d = start_daemon(daemon_factory, sim, n0)
    m = run_storm(sim, n0, d)
    assert m["events"] == 1000, m
    assert m["rounds"] <= 10, "1000 events cost %d poll rounds" % m["rounds"]
    assert m["gets_p1"] <= 10, "1000 events cost %d GETs at p1" % m["gets_p1"]


def test_frozen_broker_detected_within_two_heartbeats(sim, rabbit_nodes, daemon_factory):
    n0, _ = rabbit_nodes
    d = start_daemon(daemon_factory, sim, n0)
    c0 = counters(d)
    mark = d.log_mark()
    n0.sigstop()
    t_stop, t_wall = time.monotonic(), time.time()
    try:
        d.wait_for_log(r"MESSAGE_ID=%s" % MID_LOST, timeout=4 * HEARTBEAT + 10, start=mark)
        detect = time.monotonic() - t_stop
        note("SIGSTOP -> broker lost logged: %.3fs (heartbeat %.0fs)" % (detect, HEARTBEAT))
        assert detect < 2 * HEARTBEAT + 2.0, "frozen broker detected after %.2fs" % detect
        line = log_since(d, mark, MID_LOST)[0]
        assert "PRIORITY=warning" in line, line
        doc = status(d)
        assert doc["broker_connection"] in ("down", "connecting"), doc
        # poll at once, then fast polls (poll_interval is 60s)
        d.wait_for_status(lambda doc: doc["counters"]["polls"] >= c0["polls"] + 2, timeout=5)
        first = gets_after(sim, "p1", t_wall)
        assert first, "no poll after the loss"
        # the daemon stays responsive while an attempt may hang on the frozen broker
        assert healthz(d) == (200, {"status": "ok"})
    finally:
        n0.sigcont()
    t_cont = time.monotonic()
    wait_connected(d, n0, timeout=45)
    note("SIGCONT -> reconnected: %.3fs" % (time.monotonic() - t_cont))
    assert d.wait_for_log(r"MESSAGE_ID=%s" % MID_CONNECTED, timeout=5, start=mark)
    assert status(d)["epoch"] == 1
    # no connection left over from the outage: exactly one queue, one consumer
    wait_queues(n0, lambda qs: len(qs) == 1 and qs[0]["consumers"] == 1, timeout=30,
                what="exactly one daemon queue after the outage")


def test_killed_broker_fast_polls_and_follows_promotion_without_event(sim, rabbit_nodes,
                                                                    daemon_factory):
    """Kills rabbit node 0 (p1's broker). Last in the file: the rabbit_ok
    fixture restarts the node for any later test."""
    n0, n1 = rabbit_nodes
    d = start_daemon(daemon_factory, sim, n0)
    c0 = counters(d)
    mark = d.log_mark()
    t_wall, t_kill = time.time(), time.monotonic()
    n0.kill()
    d.wait_for_log(r"MESSAGE_ID=%s" % MID_LOST, timeout=10, start=mark)
    detect = time.monotonic() - t_kill
    note("broker killed -> lost logged: %.3fs" % detect)
    assert detect < 2 * HEARTBEAT + 2.0
    assert status(d)["broker_connection"] in ("down", "connecting")
    # an immediate poll round: GETs right after the loss
    util.wait_until(lambda: gets_after(sim, "p2", t_wall), 3, what="a GET after the loss")
    first = gets_after(sim, "p2", t_wall)[0]["t"] - t_wall
    note("broker killed -> first GET: %.3fs" % first)
    assert first < 2.0, "first poll %.2fs after the loss" % first
    # then fast polling (poll_interval is 60s): three more rounds come quickly
    d.wait_for_status(lambda doc: doc["counters"]["polls"] >= c0["polls"] + 3, timeout=5)
    assert status(d)["broker_connection"] in ("down", "connecting")
    # a promotion without any event is found by the fast polls
    t0 = time.monotonic()
    sim.promote("p2", event=False)
    d.wait_for_primary("p2", epoch=2, timeout=15)
    dt = time.monotonic() - t0
    note("promote without event while broker lost -> settings p2: %.3fs" % dt)
    assert dt < 5.0, "followed after %.2fs" % dt
    doc = wait_connected(d, n1, timeout=30)
    assert doc["primary"]["id"] == "p2"
    note("promote without event -> connected to p2's broker: %.3fs" % (time.monotonic() - t0))
    wait_queues(n1, lambda qs: len(qs) == 1 and qs[0]["consumers"] == 1,
                what="the daemon's queue on the new broker")
    # steady again: no more fast polls once the new broker is up
    c1 = wait_quiet(d, quiet=3.0)
    assert status(d)["counters"]["polls"] == c1["polls"]
