#!/usr/bin/python3
"""Whole-process tests of the broker connection over TLS (contract section 4:
the Primary's broker `tls` field; section 2: `[broker] ca_file`), with the
real dsm-agent-syncd, the Provider simulator and one real RabbitMQ node that
has a TLS listener next to its plain one.

Certificates are made at test time with the openssl CLI:
  - a test CA, and a server certificate it signs for CN "localhost" with
    subjectAltName DNS:localhost, IP:127.0.0.1;
  - a second, unrelated CA that signed nothing the broker presents.

The simulator reports the broker (set_broker(..., tls=True)) either as
"localhost" (matched by the DNS SAN) or as "127.0.0.1" (matched by the IP
SAN, RFC 6125 / RFC 2818 3.1).

(1) ca_file = the test CA: the daemon connects over TLS (status
    "connected", the broker-connected log line, a TLS connection on the
    broker's side) and consumes: an event published over TLS makes it poll.
    Both spellings connect (rabbitmq-c 0.11 alone checks DNS names only; the
    daemon has OpenSSL check the name or the address).
(2) ca_file = the unrelated CA (broker "localhost", so only the CA can be
    the cause): the daemon never connects, logs the broker as unreachable
    with a certificate verification reason, stays healthy and keeps
    following the Primary by polling.

Every daemon here runs with poll_interval 60s (so any poll round seen was
caused by an event, a notify or a broker outage), fast_poll_interval 200ms,
heartbeat 2s.

Run: DSM_BUILD_DIR=$PWD/build-h23 /usr/bin/python3 -m pytest -q -p no:cacheprovider \\
         tests/integration/test_broker_tls.py
"""

import json
import os
import re
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from harness import rabbit, util  # noqa: E402

EXCHANGE = "dsm.provider.events"
MID_CONNECTED = "cc4e3ac90cd94de2a4b78de1b4f03840"
MID_LOST = "680e787066fe4ef696372bf6d086b2bf"
MID_COMMITTED = "ded36cf01a5547829b18395ff8df2196"
OPENSSL = "/usr/bin/openssl"
RABBITMQCTL = "/usr/lib/rabbitmq/bin/rabbitmqctl"
BROKER_IP = "127.0.0.1"


OVERRIDES = {
    "provider": {"poll_interval": "60s", "fast_poll_interval": "200ms", "poll_jitter": "0"},
    "broker": {"heartbeat": "2s"},
    "daemon": {"log_level": "debug"},
}

# What a refused certificate may be called in the reason (OpenSSL / rabbitmq-c
# wording; today "connect: SSL peer cert verification failed"): the reason must
# say it was the certificate verification that failed.
TLS_VERIFY_REASON = re.compile(r"(?i)(cert\w* verif|verif\w* .*cert|unknown ca|issuer|"
                               r"self.signed|untrusted)")


def note(msg):
    sys.stderr.write("[test_broker_tls] %s\n" % msg)


# ----- certificates ----------------------------------------------------------------


def openssl(*args, cwd):
    p = subprocess.run([OPENSSL, *args], cwd=cwd, stdin=subprocess.DEVNULL,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, "openssl %s: %s%s" % (" ".join(args), p.stdout, p.stderr)


def make_ca(d, name, cn):
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", name + ".key", "-out", name + ".pem", "-days", "2",
            "-subj", "/O=dsm-agent-sync tests/CN=%s" % cn,
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)
    return os.path.join(d, name + ".pem")


def make_certs(d):
    """{"ca", "cert", "key", "other_ca"}: PEM paths under d."""
    ca = make_ca(d, "ca", "dsm test broker CA")
    other = make_ca(d, "other-ca", "dsm unrelated CA")
    with open(os.path.join(d, "server.ext"), "w") as f:
        f.write("basicConstraints = critical,CA:FALSE\n"
                "keyUsage = critical,digitalSignature,keyEncipherment\n"
                "extendedKeyUsage = serverAuth\n"
                "subjectAltName = DNS:localhost,IP:%s\n" % BROKER_IP)
    openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", "server.key", "-out", "server.csr",
            "-subj", "/O=dsm-agent-sync tests/CN=localhost", cwd=d)
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-extfile", "server.ext", "-out", "server.pem",
            cwd=d)
    openssl("verify", "-CAfile", "ca.pem", "server.pem", cwd=d)
    return {"ca": ca, "cert": os.path.join(d, "server.pem"),
            "key": os.path.join(d, "server.key"), "other_ca": other}


# ----- fixtures --------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_env():
    """One RabbitMQ node with a TLS listener (own epmd, own group), and the
    certificates. Stopped by PID through the harness at module end."""
    if not rabbit.available():
        pytest.skip("rabbitmq-server is not installed")
    if not os.access(OPENSSL, os.X_OK):
        pytest.skip("openssl CLI is not installed")
    certdir = tempfile.mkdtemp(prefix="dsm-tls-certs-")
    group = None
    try:
        certs = make_certs(certdir)
        group = rabbit.RabbitGroup()
        node, = group.start(1, tls={k: certs[k] for k in ("ca", "cert", "key")})
        note("TLS rabbit node %r (TLS port %d) accepted AMQP %.1fs after start"
             % (node, node.tls_port, group.start_seconds))
        yield node, certs
    finally:
        if group is not None:
            group.cleanup()
        shutil.rmtree(certdir, ignore_errors=True)


@pytest.fixture
def tls_node(tls_env):
    node, certs = tls_env
    node.sigcont()
    if not node.alive() or not rabbit.amqp_ready(node.host, node.port, timeout=2):
        node.restart()
    return node, certs


def make_tls_sim(sim_factory, node, host):
    """Every Provider node reports its broker as host:<TLS port>, tls = true."""
    s = sim_factory(brokers={nid: (node.host, node.port) for nid in ("p1", "p2", "p3")})
    for nid in ("p1", "p2", "p3"):
        s.set_broker(nid, host, node.tls_port, tls=True)
    code, _, doc = s.get_state("p1")
    assert code == 200 and doc["primary"]["broker"] == {
        "host": host, "port": node.tls_port, "vhost": "/", "tls": True}, doc
    return s


# ----- helpers ---------------------------------------------------------------------


def tls_context(cafile):
    ctx = ssl.create_default_context(cafile=cafile)
    ctx.check_hostname = True
    return ctx


def tls_probe(node, cafile, host):
    """Opens and closes an AMQP connection over the TLS listener, verifying
    the certificate against cafile for `host` (raises when it does not)."""
    import pika
    conn = pika.BlockingConnection(pika.ConnectionParameters(
        host=node.host, port=node.tls_port, credentials=pika.PlainCredentials("guest", "guest"),
        ssl_options=pika.SSLOptions(tls_context(cafile), host),
        connection_attempts=1, socket_timeout=10, stack_timeout=15))
    conn.close()


class HostnameVerifyFailed(AssertionError):
    """The daemon refused the broker for its host name (the IP SAN defect)."""


def wait_connected_or_lost(d, host, port, timeout=30.0):
    """Waits until status says "connected" (returns the document) or a
    broker-lost line is logged (raises: HostnameVerifyFailed when the reason
    is the host name check, else AssertionError)."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        lost = log_since(d, 0, MID_LOST)
        if lost:
            exc = HostnameVerifyFailed if re.search(r"(?i)hostname verif", lost[0]) \
                else AssertionError
            raise exc("TLS connection to %s:%d refused by the daemon: %s" % (host, port, lost[0]))
        code, last = d.status()
        if code == 200 and last.get("broker_connection") == "connected":
            return last
        if time.monotonic() >= deadline:
            raise AssertionError("not connected to %s:%d within %.0fs; last %r\n%s"
                                 % (host, port, timeout, last, d.log_tail()))
        time.sleep(0.1)


def pika_publish_tls(node, cafile, host, key, doc):
    """Publishes one event over the node's TLS listener, verifying the server
    certificate against cafile for `host` (the certificate is good for an
    ordinary client under either name)."""
    import pika
    conn = pika.BlockingConnection(pika.ConnectionParameters(
        host=node.host, port=node.tls_port, credentials=pika.PlainCredentials("guest", "guest"),
        ssl_options=pika.SSLOptions(tls_context(cafile), host),
        connection_attempts=1, socket_timeout=10, stack_timeout=15,
        blocked_connection_timeout=10))
    try:
        ch = conn.channel()
        ch.exchange_declare(EXCHANGE, exchange_type="topic", durable=True)
        ch.confirm_delivery()
        ch.basic_publish(EXCHANGE, key, json.dumps(doc).encode(),
                         properties=pika.BasicProperties(content_type="application/json"),
                         mandatory=True)
    finally:
        conn.close()


def rabbitmqctl(node, *args, timeout=60):
    p = subprocess.run([RABBITMQCTL, "-n", node.name, "-q", *args, "--formatter", "json"],
                       env=node.env(), cwd=node.dir, user="rabbitmq", group="rabbitmq",
                       extra_groups=[], stdin=subprocess.DEVNULL, capture_output=True,
                       text=True, timeout=timeout)
    assert p.returncode == 0, "rabbitmqctl %s: %s %s" % (args, p.stdout, p.stderr)
    return json.loads(p.stdout or "[]")


def status(d):
    code, doc = d.status()
    assert code == 200, (code, doc)
    return doc


def healthz(d, timeout=2.0):
    with urllib.request.urlopen(d.base_url() + "/healthz", timeout=timeout) as r:
        return r.status, json.loads(r.read())


def wait_quiet(d, quiet=1.0, timeout=20):
    """Waits until counters.polls stays unchanged for `quiet` seconds."""
    deadline = time.monotonic() + timeout
    c = status(d)["counters"]
    since = time.monotonic()
    while True:
        time.sleep(0.1)
        n = status(d)["counters"]
        if n["polls"] != c["polls"]:
            c, since = n, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return n
        if time.monotonic() >= deadline:
            raise TimeoutError("poll rounds did not settle within %ss: %r" % (timeout, n))


def log_since(d, mark, regex):
    rx = re.compile(regex)
    return [x for x in d.log_lines()[mark:] if rx.search(x)]


# ----- tests -----------------------------------------------------------------------


@pytest.mark.parametrize("host", [
    "localhost",
    BROKER_IP,
])
def test_tls_broker_verified_with_ca_file_connects_and_consumes(host, sim_factory, tls_node,
                                                               daemon_factory):
    node, certs = tls_node
    tls_sim = make_tls_sim(sim_factory, node, host)
    # the certificate itself is good for this name (an ordinary client agrees)
    tls_probe(node, certs["ca"], host)
    ov = json.loads(json.dumps(OVERRIDES))
    ov["broker"]["ca_file"] = certs["ca"]
    t0 = time.monotonic()
    d = daemon_factory(sim=tls_sim, overrides=ov)
    st = d.wait_for_primary("p1", epoch=1, timeout=20)
    assert st["rabbitmq"]["tls"] == "true" and st["rabbitmq"]["port"] == str(node.tls_port), st

    doc = wait_connected_or_lost(d, host, node.tls_port, timeout=30)
    note("daemon start -> connected over TLS: %.3fs" % (time.monotonic() - t0))
    assert doc["primary"]["id"] == "p1" and doc["epoch"] == 1
    assert doc["primary"]["broker"] == {"host": host, "port": node.tls_port,
                                        "vhost": "/", "tls": True}, doc
    line = d.wait_for_log(r"MESSAGE_ID=%s .*%s:%d" % (MID_CONNECTED, re.escape(host),
                                                       node.tls_port), 5).string
    note("connected line: %s" % line)
    assert "(TLS)" in line, line
    assert not log_since(d, 0, MID_LOST), "\n".join(log_since(d, 0, MID_LOST))

    # The broker's side: the daemon's connection is a TLS one.
    # The broker may still list a test client's earlier connection, so
    # match the daemon's own socket (its local port) to the broker's list.
    def daemon_local_ports():
        out = subprocess.run(["ss", "-tnpH", "state", "established", "dport", "= :%d" % node.tls_port],
                             capture_output=True, text=True).stdout
        return {int(line.split()[2].rsplit(":", 1)[1]) for line in out.splitlines()
                if "pid=%d," % d.pid in line}

    def listed():
        ports = daemon_local_ports()
        got = rabbitmqctl(node, "list_connections", "user", "port", "ssl", "ssl_protocol", "peer_host",
                          "peer_port")
        own = [c for c in got if c["peer_port"] in ports]
        return (got, own) if len(ports) == 1 and len(own) == 1 else None

    conns, mine = util.wait_until(listed, 10.0, what="the daemon's one TLS connection on the broker")
    note("broker connections: %r" % conns)
    assert mine[0]["port"] == node.tls_port and mine[0]["ssl"] is True and mine[0]["user"] == "guest", conns
    assert not [c for c in conns if c["port"] == node.port], conns

    # Consuming: an event published over TLS makes the daemon poll.
    c0 = wait_quiet(d)
    t_ev = time.monotonic()
    pika_publish_tls(node, certs["ca"], host, "agent.update.available", {"version": "9.0.2"})
    d.wait_for_status(lambda doc: doc["counters"]["events"] == c0["events"] + 1
                      and doc["counters"]["polls"] >= c0["polls"] + 1, timeout=10)
    note("event over TLS -> poll round: %.3fs" % (time.monotonic() - t_ev))
    # ... and one published by the simulator (the same exchange) as well.
    c1 = wait_quiet(d)
    r = tls_sim.publish("p1", "provider.version.changed", {"node_id": "p2", "version": "9.0.1"})
    assert r == "ok", r
    d.wait_for_status(lambda doc: doc["counters"]["events"] == c1["events"] + 1
                      and doc["counters"]["polls"] >= c1["polls"] + 1, timeout=10)
    doc = status(d)
    assert doc["broker_connection"] == "connected", doc
    assert healthz(d) == (200, {"status": "ok"})
    assert d.stop() == 0


def test_untrusted_broker_certificate_is_refused_and_daemon_keeps_polling(sim_factory, tls_node,
                                                                         daemon_factory):
    node, certs = tls_node
    host = "localhost"  # the name matches: only the CA can make verification fail
    tls_sim = make_tls_sim(sim_factory, node, host)
    ov = json.loads(json.dumps(OVERRIDES))
    ov["broker"]["ca_file"] = certs["other_ca"]
    d = daemon_factory(sim=tls_sim, overrides=ov)
    d.wait_for_primary("p1", epoch=1, timeout=20)

    m = d.wait_for_log(r"MESSAGE_ID=%s" % MID_LOST, timeout=30)
    line = m.string
    note("lost line: %s" % line)
    assert "PRIORITY=warning" in line, line
    assert "%s:%d" % (host, node.tls_port) in line, line
    reason = re.search(r"DSM_REASON=(.*)$", line)
    reason = reason.group(1) if reason else line
    assert TLS_VERIFY_REASON.search(reason), \
        "the reason does not say the certificate failed verification: %r" % line
    assert "hostname" not in reason.lower(), line

    # Still follows the Primary by polling (no event can reach it). Done at
    # once: while the broker stays refused the fast-poll delay doubles.
    t0 = time.monotonic()
    tls_sim.promote("p2", event=False)
    st = d.wait_for_primary("p2", epoch=2, timeout=30)
    note("promotion without event while the broker is refused -> settings p2: %.3fs"
         % (time.monotonic() - t0))
    assert st["rabbitmq"]["tls"] == "true" and st["rabbitmq"]["host"] == host, st
    assert log_since(d, 0, r"MESSAGE_ID=%s .*DSM_PRIMARY_ID=p2" % MID_COMMITTED)

    # Several retries later: still never connected; healthy; fast-polling.
    c0 = status(d)["counters"]
    deadline = time.monotonic() + 6.0
    seen = set()
    while time.monotonic() < deadline:
        doc = status(d)
        seen.add(doc["broker_connection"])
        assert doc["broker_connection"] != "connected", doc
        time.sleep(0.2)
    note("broker_connection states seen over 6s: %s" % sorted(seen))
    assert seen <= {"down", "connecting"}, seen
    assert doc["epoch"] == 2 and doc["primary"]["id"] == "p2", doc
    c1 = status(d)["counters"]
    assert c1["polls"] >= c0["polls"] + 2, \
        "no fast polling while the broker is refused (poll_interval is 60s): %r -> %r" % (c0, c1)
    assert not log_since(d, 0, MID_CONNECTED), "\n".join(log_since(d, 0, MID_CONNECTED))
    for x in log_since(d, 0, MID_LOST):
        assert TLS_VERIFY_REASON.search(x) and "hostname" not in x.lower(), x
    # The daemon holds no connection to the broker (the broker may still
    # list earlier test clients, so look at the daemon's own sockets).
    out = subprocess.run(["ss", "-tnpH", "state", "established", "dport", "= :%d" % node.tls_port],
                         capture_output=True, text=True).stdout
    assert "pid=%d," % d.pid not in out, out
    assert healthz(d) == (200, {"status": "ok"})
    assert d.alive()
    assert d.stop() == 0
