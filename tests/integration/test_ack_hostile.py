"""A hostile broker against the convergence acknowledgement's channel and
the piggybacked heartbeats (review of issue 15's ack and issue 14's idle
wakeups). A frame-aware proxy (tests/harness/amqp_proxy.py) sits between
the real daemon (or tests/broker_drive) and a real RabbitMQ node and cuts
the connection on a publish, injects frames on the publishing channel
(channel 2), or withholds or adds the broker's heartbeats.
"""

import os
import sys
import threading
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness import amqp_proxy as ap  # noqa: E402
from test_acks import OVERRIDES, metric, wait_metric  # noqa: E402
from test_broker_drive import DRIVE, PRIMARY_CHANGED, PUBLISH, drives, publish  # noqa: E402,F401 (drives: a fixture)

ACK_SENDS_MAX = 5  # agent/ack.h
EXCHANGE = "dsm.provider.events"
BASIC_PUBLISH, BASIC_DELIVER = (60, 40), (60, 60)

needs_tools = pytest.mark.skipif(not (os.access(DRIVE, os.X_OK) and os.access(PUBLISH, os.X_OK)),
                                 reason="broker_drive or amqp_publish not built")


def note(msg):
    sys.stderr.write("[test_ack_hostile] %s\n" % msg)


@pytest.fixture
def proxy(rabbit_ok):
    made = []

    def make(node):
        p = ap.AmqpProxy(node.host, node.port)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()


# ---- the ack path ------------------------------------------------------------


def test_a_publish_that_costs_the_connection_is_given_up(sim_factory, rabbit_ok, proxy, daemon_factory):
    """Something between the daemon and the broker (or the broker itself)
    drops the connection whenever the ack is published. Each reconnect
    comes after the shortest backoff (the connection came up, so the
    broker's backoff starts over) and each loss makes the daemon poll the
    Provider fast: the ack must not turn this into a reconnect storm. At
    most ACK_SENDS_MAX publishes, then it is given up, and the connection
    stays up."""
    p = proxy(rabbit_ok[0])
    p.kill_on = lambda f: f.channel == 2 and f.method == BASIC_PUBLISH
    sim = sim_factory(brokers={nid: (p.host, p.port) for nid in ("p1", "p2", "p3")})
    o = {k: dict(v) for k, v in OVERRIDES.items()}
    o["daemon"] = {"agent_id": "agent-cut"}
    d = daemon_factory(sim=sim, overrides=o)
    d.wait_for_primary("p1", epoch=1, timeout=15)
    time.sleep(10)
    note("10 s: %d connections, %d cut on a publish" % (p.connections(), p.killed))
    assert p.killed <= ACK_SENDS_MAX, (p.killed, p.connections())
    assert p.connections() <= ACK_SENDS_MAX + 1, p.connections()
    wait_metric(d, "acks_total", 1, outcome="gave_up")
    assert metric(d, "ack_publishes_total") == ACK_SENDS_MAX
    d.wait_for_status(lambda s: s["broker_connection"] == "connected", timeout=10)
    n = p.connections()
    time.sleep(2)
    assert p.connections() == n


@needs_tools
def test_content_on_the_publishing_channel_is_not_taken_for_an_event(rabbit_ok, proxy, drives):
    """A basic.return (method, header, body) on channel 2 that arrives
    between a delivery's method and its header on channel 1 (frames of
    different channels may interleave): the content frames belong to
    channel 2 and must not be taken for the delivery's."""
    node = rabbit_ok[0]
    p = proxy(node)
    forged = b'{"epoch": 99, "primary_id": "px", "api_url": "https://px.example:8443"}'

    def extra(f):
        if f.channel == 1 and f.method == BASIC_DELIVER:
            return [ap.basic_return(2, 312, "NO_ROUTE", EXCHANGE, "fleet.agent.synced"),
                    ap.header_frame(2, len(forged)), ap.body_frame(2, forged)]
        return []

    p.s2c_extra = extra
    d = drives(p.host, p.port, "-H", "2")
    d.wait("state connected", 10)
    publish(node, "provider.primary.changed", PRIMARY_CHANGED)
    _, line = d.wait("event ", 10)
    assert line == "event provider.primary.changed " + PRIMARY_CHANGED, line
    publish(node, "provider.primary.changed", PRIMARY_CHANGED)
    _, line = d.wait("event ", 10)
    assert line == "event provider.primary.changed " + PRIMARY_CHANGED, line
    assert not [x for x in d.drain(0.5) if x.startswith("state down")]


@needs_tools
def test_unexpected_frames_on_the_publishing_channel_change_nothing(rabbit_ok, proxy, drives):
    """Confirms for tags never published, a channel.close-ok nobody asked
    for, a channel.flow, a basic.return with content: ignored; consuming
    and the connection go on."""
    node = rabbit_ok[0]
    p = proxy(node)
    d = drives(p.host, p.port, "-H", "2")
    d.wait("state connected", 10)
    p.inject_s2c(ap.basic_ack(2, 999) + ap.basic_ack(2, 0, multiple=True) + ap.basic_nack(2, 7, multiple=True)
                 + ap.method_frame(2, 20, 41) + ap.method_frame(2, 20, 20, b"\x00")
                 + ap.basic_return(2, 312, "NO_ROUTE", EXCHANGE, "x") + ap.header_frame(2, 3)
                 + ap.body_frame(2, b"abc"))
    time.sleep(0.5)
    publish(node, "provider.primary.changed", PRIMARY_CHANGED)
    _, line = d.wait("event ", 10)
    assert line == "event provider.primary.changed " + PRIMARY_CHANGED, line
    assert not [x for x in d.drain(0.5) if x.startswith("state")]


# ---- heartbeats --------------------------------------------------------------


def gaps(frames):
    ts = [f.t for f in frames]
    return [b - a for a, b in zip(ts, ts[1:])]


@needs_tools
@pytest.mark.parametrize("hb", [1, 2])
def test_heartbeats_on_time_and_a_silent_broker_is_lost_at_two(rabbit_ok, proxy, drives, hb):
    """While the broker talks ours ride on its heartbeats (every hb/2);
    when it goes silent but keeps the TCP connection, ours still go out at
    least every 3/4 hb (RabbitMQ drops a client after 2-3 silent
    intervals), and the broker is declared lost 2 heartbeats after its
    last byte, not later."""
    node = rabbit_ok[0]
    p = proxy(node)
    d = drives(p.host, p.port, "-H", str(hb))
    t_conn, _ = d.wait("state connected", 10)
    time.sleep(3 * hb)
    ours = p.seen("c2s", ftype=ap.HEARTBEAT, since=t_conn)
    g = gaps(ours)
    note("hb %ds talking: %d of ours, gaps %s" % (hb, len(ours), ["%.2f" % x for x in g]))
    assert g and max(g) <= 0.75 * hb + 0.15, g
    assert min(g) >= 0.25 * hb - 0.05, g

    p.drop_s2c = lambda f: True  # silent, connection kept
    t_quiet = time.monotonic()
    t_down, line = d.wait("state down", 4 * hb + 5)
    last_rx = max([f.t for f in p.seen("s2c") if f.t <= t_quiet] or [t_quiet])
    ours = p.seen("c2s", ftype=ap.HEARTBEAT, since=t_quiet)
    g = gaps([f for f in p.seen("c2s", ftype=ap.HEARTBEAT) if f.t >= last_rx - 0.75 * hb])
    note("hb %ds silent: down after %.2f s (%s), ours %s" % (hb, t_down - last_rx, line,
                                                             ["%.2f" % x for x in g]))
    assert "heartbeat timeout" in line, line
    assert 2 * hb - 0.1 <= t_down - last_rx <= 2 * hb + 0.5, t_down - last_rx
    assert g and max(g) <= 0.75 * hb + 0.15, g


@needs_tools
def test_a_chatty_broker_does_not_make_us_chatty(rabbit_ok, proxy, drives):
    """A broker that sends heartbeats every 50 ms: ours still go at most
    every hb/4."""
    node = rabbit_ok[0]
    p = proxy(node)
    d = drives(p.host, p.port, "-H", "2")
    t_conn, _ = d.wait("state connected", 10)
    stop = threading.Event()

    def chatter():
        while not stop.wait(0.05):
            try:
                p.inject_s2c(ap.frame(ap.HEARTBEAT, 0, b""))
            except AssertionError:
                return

    th = threading.Thread(target=chatter, daemon=True)
    th.start()
    try:
        time.sleep(4)
    finally:
        stop.set()
        th.join()
    ours = p.seen("c2s", ftype=ap.HEARTBEAT, since=t_conn + 0.1)
    g = gaps(ours)
    note("chatty broker: %d of ours in 4 s, min gap %.2f" % (len(ours), min(g) if g else -1))
    assert len(ours) <= 4 / 0.5 + 1, len(ours)
    assert g and min(g) >= 0.5 - 0.05, g
    assert not [x for x in d.drain(0.3) if x.startswith("state down")]


@needs_tools
def test_heartbeat_off(rabbit_ok, proxy, drives):
    node = rabbit_ok[0]
    p = proxy(node)
    d = drives(p.host, p.port, "-H", "0")
    t_conn, _ = d.wait("state connected", 10)
    time.sleep(3)
    assert p.seen(ftype=ap.HEARTBEAT, since=t_conn) == []
    assert not [x for x in d.drain(0.3) if x.startswith("state")]
