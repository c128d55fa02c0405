"""The convergence acknowledgement (docs/acks.md, issue 15): after a commit's
settings file was written and on_change succeeded, each daemon publishes one
`fleet.agent.synced` message on the new Primary's broker, with a publisher
confirm, and nothing else changes. Real daemons, real RabbitMQ nodes, the
Provider simulator.

The `sim` fixture puts p1's broker on rabbit node 0 and p2's and p3's on
node 1. A "Provider listener" here is a server-named queue bound to the
events exchange with `fleet.agent.synced`, read with basic.get: what a
Provider would consume.
"""

import json
import os
import re
import subprocess
import sys
import time
import uuid

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from harness import daemon as daemon_mod  # noqa: E402

EXCHANGE = "dsm.provider.events"
ACK_KEY = "fleet.agent.synced"
RABBITMQCTL = "/usr/lib/rabbitmq/bin/rabbitmqctl"
MID_LOST = "680e787066fe4ef696372bf6d086b2bf"
RFC3339_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
OVERRIDES = {
    # Rounds only when something asks: every round seen has a cause.
    "provider": {"poll_interval": "60s", "fast_poll_interval": "200ms", "poll_jitter": "0"},
    "broker": {"heartbeat": "2s"},
}


def note(msg):
    sys.stderr.write("[test_acks] %s\n" % msg)


def pika_params(node, user="guest", password="guest"):
    import pika
    return pika.ConnectionParameters(host=node.host, port=node.port,
                                     credentials=pika.PlainCredentials(user, password),
                                     connection_attempts=3, retry_delay=0.5, socket_timeout=10,
                                     stack_timeout=15, blocked_connection_timeout=10)


class Listener:
    """The Provider's side: a queue bound with fleet.agent.synced (or with
    `key`) on one node."""

    def __init__(self, node, key=ACK_KEY):
        import pika
        self.node = node
        self.conn = pika.BlockingConnection(pika_params(node))
        self.ch = self.conn.channel()
        self.ch.exchange_declare(EXCHANGE, exchange_type="topic", durable=True)
        self.queue = self.ch.queue_declare("", exclusive=True, auto_delete=True).method.queue
        self.ch.queue_bind(self.queue, EXCHANGE, routing_key=key)
        self.got = []

    def drain(self):
        while True:
            method, props, body = self.ch.basic_get(self.queue, auto_ack=True)
            if method is None:
                return self.got
            self.got.append({"routing_key": method.routing_key, "t": time.time(),
                             "content_type": props.content_type, "user_id": props.user_id,
                             "body": json.loads(body)})

    def wait(self, n, timeout=20.0, what="acks"):
        deadline = time.monotonic() + timeout
        while len(self.drain()) < n:
            if time.monotonic() > deadline:
                raise AssertionError("%d %s expected on %r within %ss, got %r"
                                     % (n, what, self.node, timeout, self.got))
            time.sleep(0.1)
        return self.got

    def close(self):
        try:
            self.conn.close()
        except Exception:
            pass


@pytest.fixture
def listeners(rabbit_ok):
    made = []

    def make(node, key=ACK_KEY):
        listener = Listener(node, key)
        made.append(listener)
        return listener

    yield make
    for listener in made:
        listener.close()


def rabbitmqctl(node, *args, timeout=60):
    p = subprocess.run([RABBITMQCTL, "-n", node.name, "-q", *args], env=node.env(), cwd=node.dir,
                       user="rabbitmq", group="rabbitmq", extra_groups=[], stdin=subprocess.DEVNULL,
                       capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, "rabbitmqctl %s: %s %s" % (args, p.stdout, p.stderr)
    return p.stdout


def start(daemon_factory, sim, agent_id, node, overrides=None, **kw):
    o = {k: dict(v) for k, v in OVERRIDES.items()}
    o["daemon"] = {"agent_id": agent_id}
    for sec, kv in (overrides or {}).items():
        o.setdefault(sec, {}).update(kv)
    d = daemon_factory(sim=sim, overrides=o, **kw)
    d.wait_for_primary("p1", epoch=1, timeout=15)
    d.wait_for_status(lambda doc: doc["broker_connection"] == "connected"
                      and doc["primary"]["broker"]["port"] == node.port, timeout=30)
    return d


def metric(d, name, **labels):
    """One series of GET /metrics (the parser of test_metrics checks the format)."""
    for _ in range(30):
        code, _, body = d.http("GET", "/metrics")
        if code != 429:
            break
        time.sleep(0.2)
    assert code == 200, code
    want = "dsm_agent_sync_" + name
    if labels:
        want += "{" + ",".join('%s="%s"' % kv for kv in labels.items()) + "}"
    for line in body.decode().splitlines():
        if line.startswith(want + " "):
            return float(line.split()[-1])
    raise AssertionError("no series %s in /metrics" % want)


def wait_metric(d, name, value, timeout=20.0, **labels):
    deadline = time.monotonic() + timeout
    while True:
        v = metric(d, name, **labels)
        if v == value:
            return v
        if time.monotonic() > deadline:
            raise AssertionError("%s%r = %s, expected %s" % (name, labels, v, value))
        time.sleep(0.2)


# ---- tests -------------------------------------------------------------------


def test_one_ack_per_commit_on_the_new_primarys_broker(sim, rabbit_ok, daemon_factory, listeners):
    n0, n1 = rabbit_ok
    old, new = listeners(n0), listeners(n1)
    agents = {"agent-a": start(daemon_factory, sim, "agent-a", n0),
              "agent-b": start(daemon_factory, sim, "agent-b", n0)}
    # The start's own commit (epoch 1, p1) is acknowledged on p1's broker.
    got = old.wait(2, what="acks of epoch 1")
    assert sorted(a["body"]["agent_id"] for a in got) == ["agent-a", "agent-b"]
    assert {a["body"]["epoch"] for a in got} == {1}
    for d in agents.values():
        wait_metric(d, "acks_total", 1, outcome="confirmed")

    t0 = time.time()
    sim.promote("p2")
    got = new.wait(2, what="acks of epoch 2")
    for a in got:
        b = a["body"]
        assert a["routing_key"] == ACK_KEY and a["content_type"] == "application/json"
        assert a["user_id"] == "guest", a  # the connection's user, vouched for by RabbitMQ
        assert set(b) == {"agent_id", "epoch", "primary_id", "settings_written_at", "daemon"}, b
        assert b["epoch"] == 2 and b["primary_id"] == "p2", b
        assert RFC3339_MS.match(b["settings_written_at"]), b
        assert re.match(r"^\d+\.\d+\.\d+", b["daemon"]), b
        written = time.mktime(time.strptime(b["settings_written_at"][:19], "%Y-%m-%dT%H:%M:%S")) \
            - time.timezone + int(b["settings_written_at"][20:23]) / 1000
        assert t0 - 1 <= written <= a["t"] + 0.01, (t0, written, a["t"])
        # After on_change: the run for epoch 2 was recorded before the ack left.
        d = agents[b["agent_id"]]
        runs = [r for r in d.on_change_runs() if r["env"].get("DSM_EPOCH") == "2"]
        assert len(runs) == 1 and runs[0]["t"] <= a["t"], runs
    assert sorted(a["body"]["agent_id"] for a in got) == ["agent-a", "agent-b"]
    note("promote -> both acks: %.0f ms" % ((max(a["t"] for a in got) - t0) * 1000))

    # More rounds (notifies, an event) for the same commit: no second ack.
    for d in agents.values():
        assert d.notify()[0] == 202
        wait_metric(d, "acks_total", 2, outcome="confirmed")
        assert metric(d, "acknowledged_epoch") == 2
        assert metric(d, "ack_publishes_total") == 2
    time.sleep(1.5)
    assert len(new.drain()) == 2, new.got
    assert len(old.drain()) == 2, old.got  # nothing more on the old Primary's broker


def test_no_agent_receives_another_agents_ack(sim, rabbit_ok, daemon_factory, listeners):
    """Every daemon binds provider.# and agent.#; an ack under agent.# would
    reach every Agent of the fleet. The daemons log each delivery they get
    (debug: "event ..." or "ignoring event ..."); the positive control shows
    that such a line appears when a message does reach them."""
    n0, n1 = rabbit_ok
    new = listeners(n1)
    a = start(daemon_factory, sim, "agent-a", n0)
    b = start(daemon_factory, sim, "agent-b", n0)
    marks = {d: d.log_mark() for d in (a, b)}
    sim.promote("p2")
    new.wait(2, what="acks of epoch 2")
    for d in (a, b):
        wait_metric(d, "acks_total", 2, outcome="confirmed")
    # Positive control: an unknown agent.* key does reach both daemons.
    import pika
    conn = pika.BlockingConnection(pika_params(n1))
    try:
        conn.channel().basic_publish(EXCHANGE, "agent.fleet.probe", b"{}")
    finally:
        conn.close()
    for d in (a, b):
        d.wait_for_log(r"ignoring event agent\.fleet\.probe", timeout=10, start=marks[d])
        lines = d.log_lines()[marks[d]:]
        assert not [x for x in lines if "event fleet." in x], lines
    # And on the events exchange the daemons' queues hold exactly the two
    # bindings each; only the Provider's queue has the ack's key.
    out = rabbitmqctl(n1, "list_bindings", "source_name", "destination_name", "routing_key")
    rows = [ln.split("\t") for ln in out.splitlines() if ln.startswith(EXCHANGE + "\t")]
    daemon_keys = sorted(k for _, q, k in rows if q != new.queue)
    assert daemon_keys == ["agent.#", "agent.#", "provider.#", "provider.#"], out
    assert [k for _, q, k in rows if q == new.queue] == [ACK_KEY], out


def test_refused_publish_costs_a_log_line_and_a_counter(sim, rabbit_ok, daemon_factory, listeners):
    """A broker user that may consume but not publish to the exchange: the
    broker closes the publishing channel (403); consuming goes on, the
    connection stays up, the refusal is one warning and one counter."""
    n0, n1 = rabbit_ok
    user, password = "agent-noack-%s" % uuid.uuid4().hex[:6], "pw-" + uuid.uuid4().hex
    for n in (n0, n1):
        rabbitmqctl(n, "add_user", user, password)
        # configure and write only on its own server-named queue; read all.
        rabbitmqctl(n, "set_permissions", "-p", "/", user, r"^amq\.gen-.*", r"^amq\.gen-.*", ".*")
    try:
        new = listeners(n1)
        d = start(daemon_factory, sim, "agent-ro", n0, overrides={"broker": {"username": user}},
                  broker_password=password)
        wait_metric(d, "acks_total", 1, outcome="refused")
        mark = d.log_mark()
        sim.promote("p2")
        d.wait_for_primary("p2", epoch=2, timeout=15)
        d.wait_for_log(r"refused the acknowledgement of epoch 2 \(403 ACCESS_REFUSED", timeout=20,
                       start=mark)
        wait_metric(d, "acks_total", 2, outcome="refused")
        assert metric(d, "acks_total", outcome="confirmed") == 0
        assert new.drain() == []
        # Still connected, never lost, and events still arrive.
        doc = d.wait_for_status(lambda s: s["broker_connection"] == "connected"
                                and s["primary"]["broker"]["port"] == n1.port, timeout=10)
        assert not doc.get("broker_error"), doc
        events = metric(d, "events_total")
        sim.publish("p2", "provider.version.changed", {"node_id": "p2", "version": "9.0.1"})
        wait_metric(d, "events_total", events + 1)
        lines = d.log_lines()[mark:]
        assert len([x for x in lines if "refused the acknowledgement" in x]) == 1, lines
        assert not [x for x in lines if MID_LOST in x and ":%d" % n1.port in x], lines
    finally:
        for n in (n0, n1):
            rabbitmqctl(n, "delete_user", user)


def test_ack_waits_for_the_broker_and_is_sent_once_it_is_up(sim, rabbit_ok, daemon_factory,
                                                           listeners):
    """The new Primary's broker is frozen when the daemon commits: the ack
    waits (the loop does not), and goes out once the connection is up."""
    n0, n1 = rabbit_ok
    new = listeners(n1)
    d = start(daemon_factory, sim, "agent-late", n0)
    wait_metric(d, "acks_total", 1, outcome="confirmed")
    n1.sigstop()
    try:
        sim.promote("p2", event=False)
        assert d.notify()[0] == 202
        d.wait_for_primary("p2", epoch=2, timeout=15)
        time.sleep(3)  # commits, on_change runs, the connection cannot come up
        code, _ = d.status()  # the loop answers meanwhile
        assert code == 200
        assert metric(d, "acks_total", outcome="confirmed") == 1
        assert metric(d, "acknowledged_epoch") == 1
    finally:
        n1.sigcont()
    wait_metric(d, "acknowledged_epoch", 2, timeout=60)
    got = new.wait(1, what="the late ack")
    assert [a["body"]["epoch"] for a in got] == [2] and got[0]["body"]["agent_id"] == "agent-late"
    time.sleep(1)
    assert len(new.drain()) == 1, new.got


def test_agent_id_is_validated_and_defaults_to_the_machine_id(tmp_path, daemon_bin, sim_nobroker):
    d = daemon_mod.Daemon(str(tmp_path / "bad"), sim=sim_nobroker, binary=daemon_bin,
                          overrides={"daemon": {"agent_id": "agent 1/with spaces"}})
    r = d.run("--check-config")
    assert r.returncode == 78, (r.returncode, r.stdout, r.stderr)
    assert "agent_id" in r.stderr and "A-Z a-z 0-9" in r.stderr, r.stderr
    d = daemon_mod.Daemon(str(tmp_path / "long"), sim=sim_nobroker, binary=daemon_bin,
                          overrides={"daemon": {"agent_id": "a" * 65}})
    assert d.run("--check-config").returncode == 78
    d = daemon_mod.Daemon(str(tmp_path / "ok"), sim=sim_nobroker, binary=daemon_bin,
                          overrides={"daemon": {"agent_id": "db-17.eu-west:a_b-c"}})
    assert d.run("--check-config").returncode == 0


def test_a_restart_neither_repeats_nor_forgets_an_ack(sim, rabbit_ok, daemon_factory, listeners):
    """The last confirmed epoch is kept next to the state file: a restart
    does not acknowledge a confirmed commit again, and one the stop cut
    short (the new broker frozen until after the stop) goes out after the
    next start."""
    n0, n1 = rabbit_ok
    old, new = listeners(n0), listeners(n1)
    d = start(daemon_factory, sim, "agent-restart", n0)
    old.wait(1, what="the ack of epoch 1")
    wait_metric(d, "acks_total", 1, outcome="confirmed")
    assert open(d.state_file + ".acked").read() == "1\n"
    d.stop()
    d.start()
    d.wait_for_status(lambda s: s["broker_connection"] == "connected", timeout=30)
    assert d.notify()[0] == 202
    time.sleep(2)
    assert len(old.drain()) == 1, old.got  # not again
    assert metric(d, "acknowledged_epoch") == 1 and metric(d, "ack_publishes_total") == 0

    n1.sigstop()
    try:
        sim.promote("p2", event=False)
        assert d.notify()[0] == 202
        d.wait_for_primary("p2", epoch=2, timeout=15)
        deadline = time.monotonic() + 15
        while not [r for r in d.on_change_runs() if r["env"].get("DSM_EPOCH") == "2"]:
            assert time.monotonic() < deadline, "on_change for epoch 2 did not run"
            time.sleep(0.1)
        time.sleep(0.5)
        d.stop()  # the ack of epoch 2 is still in hand
    finally:
        n1.sigcont()
    assert open(d.state_file + ".acked").read() == "1\n"
    d.start()
    got = new.wait(1, timeout=60, what="the ack of epoch 2 after the restart")
    assert [(a["body"]["agent_id"], a["body"]["epoch"]) for a in got] == [("agent-restart", 2)]
    wait_metric(d, "acknowledged_epoch", 2)
    time.sleep(1)
    assert len(new.drain()) == 1, new.got
