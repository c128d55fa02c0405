"""The Provider simulator's ack ledger (tests/provider_acks.py, issue 15):
the Agents' fleet.agent.synced messages counted per epoch on every node's
real broker, duplicates and malformed bodies counted and not recorded, a
broker that moves or goes down consumed again, and notify_unacked reaching
exactly the registered Agents that did not acknowledge (fake Agents: small
HTTP servers; the real daemon when it publishes acks)."""

import http.server
import json
import os
import socket
import sys
import threading
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from harness import util  # noqa: E402
from harness.sim import SimError  # noqa: E402

EXCHANGE = "dsm.provider.events"
ROUTING_KEY = "fleet.agent.synced"


def ack(agent_id, epoch, primary_id="p1"):
    return {"agent_id": agent_id, "epoch": epoch, "primary_id": primary_id,
            "settings_written_at": "2026-12-03T16:20:01.123Z", "daemon": "1.0.0"}


def publish(node, bodies, routing_key=ROUTING_KEY, host=None):
    """Publishes each body (dict: JSON; bytes: as is) on node's broker with
    confirms, as a daemon does."""
    import pika
    conn = pika.BlockingConnection(pika.ConnectionParameters(
        host=host or node.host, port=node.port, credentials=pika.PlainCredentials("guest", "guest"),
        connection_attempts=1, socket_timeout=5))
    try:
        ch = conn.channel()
        ch.exchange_declare(exchange=EXCHANGE, exchange_type="topic", durable=True)
        ch.confirm_delivery()
        for b in bodies:
            data = json.dumps(b).encode() if isinstance(b, dict) else b
            ch.basic_publish(exchange=EXCHANGE, routing_key=routing_key, body=data,
                             properties=pika.BasicProperties(content_type="application/json"))
    finally:
        conn.close()


def wait_count(s, epoch, n, timeout=10):
    return util.wait_until(lambda: (lambda a: a if a["count"] >= n else None)(s.acks(epoch)),
                           timeout, interval=0.05, what="%d ack(s) of epoch %d" % (n, epoch))


@pytest.fixture
def acksim(sim_factory, rabbit_ok):
    """p1 and p3 on the first broker, p2 on the second; every consumer bound."""
    a, b = rabbit_ok
    s = sim_factory(brokers={"p1": (a.host, a.port), "p2": (b.host, b.port), "p3": (a.host, a.port)},
                    extra_args=["--acks"])
    cons = s.wait_acks_bound(15)
    assert sorted(c["broker"] for c in cons) == sorted("%s:%d" % (n.host, n.port) for n in (a, b))
    return s


def test_acks_counted_per_epoch(acksim, rabbit_ok):
    s, (a, b) = acksim, rabbit_ok
    t0 = time.time()
    publish(a, [ack("agent-001", 1), ack("agent-002", 1), ack("agent-001", 2, "p2")])
    publish(b, [ack("db-vm.example:7", 2, "p2")])
    one = wait_count(s, 1, 2)
    two = wait_count(s, 2, 2)
    assert sorted(one["agents"]) == ["agent-001", "agent-002"]
    assert sorted(two["agents"]) == ["agent-001", "db-vm.example:7"]
    rec = two["agents"]["db-vm.example:7"]
    assert rec["broker"] == "%s:%d" % (b.host, b.port)
    assert rec["primary_id"] == "p2" and rec["daemon"] == "1.0.0"
    assert rec["settings_written_at"] == "2026-12-03T16:20:01.123Z"
    assert t0 <= two["first_at"] <= two["last_at"] <= time.time()
    assert two["agents"]["agent-001"]["broker"] == "%s:%d" % (a.host, a.port)
    assert s.acks(3)["count"] == 0 and s.acks(3)["first_at"] is None
    assert s.acks()["epochs"] == {"1": 2, "2": 2}
    assert one["malformed"] == 0 and one["duplicates"] == 0
    with pytest.raises(SimError):
        s.acks(0)
    with pytest.raises(SimError):
        s.acks("2")


def test_duplicates_and_malformed_counted_not_recorded(acksim, rabbit_ok):
    s, (a, b) = acksim, rabbit_ok
    good = ack("agent-001", 2)
    publish(a, [good])
    wait_count(s, 2, 1)
    first = s.acks(2)["agents"]["agent-001"]["received_at"]
    bad = [b"not json", b"\xff\xfe", b"[1, 2]", b'"agent-001"',
           {k: v for k, v in good.items() if k != "epoch"},
           dict(good, epoch="2"), dict(good, epoch=True), dict(good, epoch=0), dict(good, epoch=2.0),
           dict(good, agent_id=""), dict(good, agent_id="a" * 65), dict(good, agent_id="agent 1"),
           dict(good, agent_id="agent/1"), dict(good, agent_id=7),
           dict(good, primary_id=None), dict(good, settings_written_at="yesterday"),
           dict(good, settings_written_at=1764778801), dict(good, daemon=""),
           {k: v for k, v in good.items() if k != "daemon"}]
    publish(a, [dict(good, primary_id="p9")])       # a second ack of agent-001 for epoch 2
    publish(b, bad + [good])                         # and a third, on the other broker
    publish(a, [ack("agent-001", 3)])                # the next epoch is not a duplicate
    wait_count(s, 3, 1)
    got = util.wait_until(lambda: (lambda x: x if x["malformed"] >= len(bad) and x["duplicates"] >= 2
                                   else None)(s.acks(2)), 10, what="malformed and duplicates counted")
    assert got["malformed"] == len(bad) and got["duplicates"] == 2
    assert got["count"] == 1
    assert got["agents"]["agent-001"]["received_at"] == first
    assert got["agents"]["agent-001"]["primary_id"] == "p1"  # the first one stays
    assert s.acks(3)["duplicates"] == 0
    assert s.acks()["epochs"] == {"2": 1, "3": 1}
    # Other routing keys on the same exchange are not the ledger's: a promote's
    # provider.primary.changed on both brokers changes nothing.
    res = s.promote("p2", event=True)
    assert set(res["published"].values()) == {"ok"}
    publish(a, [b"agent.whatever"], routing_key="agent.update.available")
    time.sleep(0.5)
    assert s.acks(2)["malformed"] == len(bad)


def test_ack_on_a_moved_or_restarted_broker_is_counted(acksim, rabbit_ok):
    s, (a, b) = acksim, rabbit_ok
    publish(b, [ack("agent-001", 2, "p2")])
    assert wait_count(s, 2, 1)["agents"]["agent-001"]["broker"] == "127.0.0.1:%d" % b.port
    # p2's broker moves to another address (the same RabbitMQ node under
    # another name): the ledger consumes there, and drops the old address.
    s.set_broker("p2", "localhost", b.port)
    moved = "localhost:%d" % b.port
    want = sorted(["127.0.0.1:%d" % a.port, moved])
    bound_on = lambda: sorted(c["broker"] for c in s.acks()["consumers"] if c["state"] == "bound")
    util.wait_until(lambda: bound_on() == want and len(s.acks()["consumers"]) == 2, 15,
                    interval=0.05, what="consumers bound on %s only" % want)
    publish(b, [ack("agent-002", 3, "p2")])
    three = wait_count(s, 3, 1)
    assert three["agents"]["agent-002"]["broker"] == moved
    assert s.acks(2)["count"] == 1  # what was counted before the move stays
    # The broker goes down and comes back: the consumer retries with backoff
    # and binds again.
    b.kill()
    util.wait_until(lambda: any(c["broker"] == moved and c["state"] != "bound" for c in s.acks()["consumers"]),
                    10, what="the consumer to see its broker down")
    assert s.alive()
    b.start()
    cons = s.wait_acks_bound(20)
    assert [c["connections"] for c in cons if c["broker"] == moved][0] >= 2
    publish(b, [ack("agent-003", 3, "p2")])
    three = wait_count(s, 3, 2)
    assert three["agents"]["agent-003"]["broker"] == moved
    assert three["duplicates"] == 0 and three["malformed"] == 0


class FakeAgent:
    """A notify listener that records every request; answers 202, or never
    answers when hang."""

    def __init__(self, hang=False):
        self.requests = []
        rec = self.requests

        class H(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                n = int(self.headers.get("Content-Length") or 0)
                rec.append({"path": self.path, "auth": self.headers.get("Authorization"),
                            "body": json.loads(self.rfile.read(n) or b"null")})
                data = b'{"status": "accepted"}'
                self.send_response(202)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        if hang:  # accepts the connection (backlog), never reads or answers
            self.sock = socket.socket()
            self.sock.bind(("127.0.0.1", 0))
            self.sock.listen(4)
            self.port = self.sock.getsockname()[1]
            self.srv = None
            return
        self.srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.port = self.srv.server_address[1]
        threading.Thread(target=self.srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    @property
    def url(self):
        return "http://127.0.0.1:%d" % self.port

    def close(self):
        if self.srv is not None:
            self.srv.shutdown()
            self.srv.server_close()
        else:
            self.sock.close()


@pytest.fixture
def fake_agents():
    made = []

    def make(hang=False):
        f = FakeAgent(hang)
        made.append(f)
        return f
    yield make
    for f in made:
        f.close()


def test_notify_unacked_reaches_exactly_the_unacked_agents(acksim, rabbit_ok, fake_agents):
    s, (a, b) = acksim, rabbit_ok
    fakes = {aid: fake_agents() for aid in ("acked-3", "acked-4", "acked-2", "silent")}
    hung = fake_agents(hang=True)
    for aid, f in fakes.items():
        s.register_agent(aid, f.url, "token-" + aid)
    s.register_agent("down", "http://127.0.0.1:%d" % util.closed_port(), "token-down")
    s.register_agent("hung", hung.url + "/v1/notify", "token-hung")
    # Re-registering replaces (and the listing shows no token).
    s.register_agent("silent", fakes["silent"].url + "/", "token-silent")
    listed = s.agents()
    assert sorted(listed) == sorted(list(fakes) + ["down", "hung"])
    assert listed["silent"]["notify_url"] == fakes["silent"].url + "/v1/notify"
    assert "token" not in json.dumps(listed)
    for bad in ({"agent_id": "a b", "notify_url": fakes["silent"].url, "token": "t"},
                {"agent_id": "x", "notify_url": "ftp://127.0.0.1/", "token": "t"},
                {"agent_id": "x", "notify_url": "http://u:p@127.0.0.1:1/", "token": "t"},
                {"agent_id": "x", "notify_url": fakes["silent"].url, "token": ""}):
        with pytest.raises(SimError):
            s.register_agent(**bad)

    publish(a, [ack("acked-3", 3), ack("acked-2", 2)])
    publish(b, [ack("acked-4", 4, "p2"), ack("not-registered", 3)])
    wait_count(s, 3, 2)
    wait_count(s, 4, 1)
    t = time.monotonic()
    res = s.notify_unacked(3)
    took = time.monotonic() - t
    assert sorted(res["notified"]) == ["acked-2", "down", "hung", "silent"]
    assert res["results"]["acked-2"] == 202 and res["results"]["silent"] == 202
    assert str(res["results"]["down"]).startswith("error") and "efused" in res["results"]["down"]
    assert str(res["results"]["hung"]).startswith("error")
    assert took < 6, took  # bounded by the per-request timeout (2 s), not by the hung Agent
    for aid in ("acked-3", "acked-4"):
        assert fakes[aid].requests == []
    for aid in ("acked-2", "silent"):
        (req,) = fakes[aid].requests
        assert req == {"path": "/v1/notify", "auth": "Bearer token-" + aid,
                       "body": {"reason": "primary promoted", "epoch": 3}}
    # Once they acknowledge, nobody is left to notify for that epoch.
    publish(a, [ack(x, 3) for x in ("acked-2", "silent", "down", "hung")])
    wait_count(s, 3, 6)
    assert s.notify_unacked(3) == {"epoch": 3, "notified": [], "results": {}}
    assert len(fakes["silent"].requests) == 1
    with pytest.raises(SimError):
        s.notify_unacked(0)


def test_ack_operations_need_acks_on(sim_nobroker):
    for call in (lambda: sim_nobroker.acks(1), lambda: sim_nobroker.agents(),
                 lambda: sim_nobroker.register_agent("a", "http://127.0.0.1:1", "t"),
                 lambda: sim_nobroker.notify_unacked(1)):
        with pytest.raises(SimError, match="--acks"):
            call()


def test_brokers_down_never_stop_the_simulator(sim_factory):
    s = sim_factory(brokers={nid: ("127.0.0.1", util.closed_port()) for nid in ("p1", "p2", "p3")},
                    extra_args=["--acks"])
    util.wait_until(lambda: all(c["state"] == "down" for c in s.acks()["consumers"]), 10,
                    what="every consumer down")
    time.sleep(1.5)  # a few retries
    assert s.alive() and s.promote("p2")["epoch"] == 2
    assert s.acks(2)["count"] == 0
    s.stop()
    assert "Traceback" not in s.log_text()


def _daemon_acks(daemon_factory, sim):
    """True when the daemon knows [daemon] agent_id (it publishes acks)."""
    probe = daemon_factory(sim=sim, start=False, overrides={"daemon": {"agent_id": "probe"}})
    return probe.run("--check-config").returncode == 0


def test_real_daemon_acks_and_is_notified_when_it_missed_a_promote(acksim, rabbit_ok, daemon_factory):
    s, (a, b) = acksim, rabbit_ok
    if not _daemon_acks(daemon_factory, s):
        pytest.skip("this daemon has no [daemon] agent_id (does not publish acks yet)")
    d = daemon_factory(sim=s, overrides={"daemon": {"agent_id": "agent-real"}})
    s.register_agent("agent-real", d.base_url(), d.notify_token)
    one = wait_count(s, 1, 1, timeout=20)["agents"]["agent-real"]
    assert one["primary_id"] == "p1" and one["broker"] == "127.0.0.1:%d" % a.port
    s.promote("p2", event=True)
    two = wait_count(s, 2, 1, timeout=20)["agents"]["agent-real"]
    assert two["primary_id"] == "p2" and two["broker"] == "127.0.0.1:%d" % b.port
    assert s.notify_unacked(2)["notified"] == []
    assert d.stop() == 0
    s.promote("p1", event=True)
    res = s.notify_unacked(3)
    assert res["notified"] == ["agent-real"] and str(res["results"]["agent-real"]).startswith("error")
    d.start()
    three = wait_count(s, 3, 1, timeout=20)["agents"]["agent-real"]
    assert three["primary_id"] == "p1"
    assert s.notify_unacked(3)["notified"] == []
    time.sleep(1)
    assert s.acks()["duplicates"] == 0 and s.acks()["malformed"] == 0
