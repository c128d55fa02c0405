#!/usr/bin/python3
"""Tests of the Provider simulator itself against contract section 3, and of
the RabbitMQ harness (the last test)."""

import hashlib
import http.client
import json
import re
import socket
import statistics
import time
import urllib.parse

import pytest

ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def hostport(url):
    u = urllib.parse.urlsplit(url)
    return u.hostname, u.port


def raw_get(url, path="/api/v1/ha/state", token=None, headers=None, timeout=3.0):
    """One request on a fresh connection: (status, headers, body)."""
    host, port = hostport(url)
    c = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        h = dict(headers or {})
        if token:
            h["Authorization"] = "Bearer " + token
        c.request("GET", path, headers=h)
        r = c.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    finally:
        c.close()


def check_document(doc, node_id=None):
    """Asserts the shape of a contract section 3 state document."""
    assert set(doc) >= {"node", "epoch", "primary", "nodes"}
    n = doc["node"]
    assert ID_RE.match(n["id"]) and n["role"] in ("primary", "standby")
    assert isinstance(n["version"], str) and n["api_url"].startswith("http://")
    if node_id:
        assert n["id"] == node_id
    assert isinstance(doc["epoch"], int) and doc["epoch"] >= 1
    p = doc["primary"]
    assert ID_RE.match(p["id"]) and p["api_url"].startswith("http://")
    b = p["broker"]
    assert isinstance(b["host"], str) and 1 <= len(b["host"]) <= 253
    assert isinstance(b["port"], int) and 1 <= b["port"] <= 65535
    assert isinstance(b["vhost"], str) and isinstance(b["tls"], bool)
    assert isinstance(doc["nodes"], list) and doc["nodes"]
    for x in doc["nodes"]:
        assert ID_RE.match(x["id"]) and x["api_url"].startswith("http://")
    u = doc.get("agent_update")
    if u is not None:
        assert re.match(r"^[0-9a-f]{64}$", u["sha256"])
        assert isinstance(u["size"], int) and u["url"].startswith("http")


def test_state_document_shape(sim_nobroker):
    s = sim_nobroker
    urls = s.urls
    assert sorted(urls) == ["p1", "p2", "p3"]
    assert len(set(urls.values())) == 3
    for nid in urls:
        status, headers, doc = s.get_state(nid)
        assert status == 200
        assert headers["Content-Type"] == "application/json"
        check_document(doc, nid)
        assert doc["epoch"] == 1
        assert doc["node"]["api_url"] == urls[nid]
        assert doc["node"]["role"] == ("primary" if nid == "p1" else "standby")
        assert doc["primary"]["id"] == "p1" and doc["primary"]["api_url"] == urls["p1"]
        assert [x["id"] for x in doc["nodes"]] == ["p1", "p2", "p3"]
        assert doc["agent_update"] is None
    st = s.state()
    # p1's broker is the closed port given on the command line
    _, _, doc = s.get_state("p2")
    assert doc["primary"]["broker"]["port"] == st["nodes"]["p1"]["broker"]["port"]
    assert doc["primary"]["broker"]["vhost"] == "/" and doc["primary"]["broker"]["tls"] is False


def test_etag_and_304(sim_nobroker):
    s = sim_nobroker
    status, h, body = raw_get(s.urls["p1"], token=s.token)
    assert status == 200 and h.get("ETag")
    etag = h["ETag"]
    status, h2, body2 = raw_get(s.urls["p1"], token=s.token, headers={"If-None-Match": etag})
    assert status == 304 and body2 == b"" and h2["ETag"] == etag
    status, _, _ = raw_get(s.urls["p1"], token=s.token, headers={"If-None-Match": '"other"'})
    assert status == 200
    s.promote("p2", event=False)
    status, h3, _ = raw_get(s.urls["p1"], token=s.token, headers={"If-None-Match": etag})
    assert status == 200 and h3["ETag"] != etag
    c = s.counters("p1")
    assert c["status_304"] == 1 and c["status_200"] == 3


def test_bearer_token(sim_nobroker):
    s = sim_nobroker
    assert raw_get(s.urls["p2"], token=None)[0] == 401
    assert raw_get(s.urls["p2"], token="wrong")[0] == 401
    assert raw_get(s.urls["p2"], token=s.token)[0] == 200
    assert raw_get(s.lb_url, token="wrong")[0] == 401
    assert raw_get(s.urls["p2"], path="/api/v1/agent/packages/1.0", token="wrong")[0] == 401
    s.set_token("rotated")
    assert raw_get(s.urls["p2"], token="sim-provider-token")[0] == 401
    assert raw_get(s.urls["p2"], token="rotated")[0] == 200
    assert s.counters("p2")["status_401"] == 4


def test_promote_changes_epoch_and_roles(sim_nobroker):
    s = sim_nobroker
    r = s.promote("p2")
    assert r["epoch"] == 2 and r["primary_id"] == "p2" and r["old_primary_id"] == "p1"
    # the brokers are closed ports: publishing fails, reported, not fatal
    assert all(v.startswith("error") for v in r["published"].values())
    assert set(r["published"]) == {"p1", "p2"}
    for nid in ("p1", "p2", "p3"):
        _, _, doc = s.get_state(nid)
        assert doc["epoch"] == 2
        assert doc["primary"]["id"] == "p2"
        assert doc["primary"]["api_url"] == s.urls["p2"]
        assert doc["node"]["role"] == ("primary" if nid == "p2" else "standby")
    p2_broker = s.state()["nodes"]["p2"]["broker"]
    assert s.get_state("p3")[2]["primary"]["broker"]["port"] == p2_broker["port"]
    st = s.state()
    assert st["epoch"] == 2 and st["primary_id"] == "p2"


def test_kill_refuses_and_start_listens_again(sim_nobroker):
    s = sim_nobroker
    host, port = hostport(s.urls["p3"])
    s.kill("p3")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((host, port), timeout=2).close()
    assert s.state()["nodes"]["p3"]["listening"] is False
    s.start_node("p3")
    status, _, doc = s.get_state("p3")
    assert status == 200 and doc["node"]["id"] == "p3"
    assert hostport(s.urls["p3"]) == (host, port)


def test_killed_primary_missing_promotion_comes_back_stale(sim_nobroker):
    s = sim_nobroker
    s.kill("p1")
    s.promote("p2", event=False)
    s.start_node("p1")
    _, _, doc = s.get_state("p1")
    assert doc["node"]["role"] == "primary" and doc["epoch"] == 1
    s.sync("p1")
    _, _, doc = s.get_state("p1")
    assert doc["node"]["role"] == "standby" and doc["epoch"] == 2
    assert doc["primary"]["id"] == "p2"


def test_hang_times_out_a_client(sim_nobroker):
    s = sim_nobroker
    s.hang("p2")
    t0 = time.monotonic()
    with pytest.raises((socket.timeout, TimeoutError)):
        raw_get(s.urls["p2"], token=s.token, timeout=0.5)
    assert 0.4 <= time.monotonic() - t0 < 3
    s.hang("p2", False)
    assert raw_get(s.urls["p2"], token=s.token)[0] == 200
    assert s.counters("p2")["hung"] == 1


def test_kill_releases_hung_connections(sim_nobroker):
    s = sim_nobroker
    s.hang("p3")
    host, port = hostport(s.urls["p3"])
    c = socket.create_connection((host, port), timeout=3)
    c.sendall(b"GET /api/v1/ha/state HTTP/1.1\r\nHost: x\r\n\r\n")
    time.sleep(0.2)
    t0 = time.monotonic()
    s.kill("p3")
    assert c.recv(100) == b""  # the connection closes, no answer
    assert time.monotonic() - t0 < 2
    c.close()


def test_slow(sim_nobroker):
    s = sim_nobroker
    s.slow("p1", 0.3)
    t0 = time.monotonic()
    assert raw_get(s.urls["p1"], token=s.token)[0] == 200
    assert time.monotonic() - t0 >= 0.3
    with pytest.raises((socket.timeout, TimeoutError)):
        raw_get(s.urls["p1"], token=s.token, timeout=0.1)
    s.slow("p1", 0)


def test_revive_stale(sim_nobroker):
    s = sim_nobroker
    s.promote("p2", event=False)
    s.promote("p3", event=False)
    s.kill("p1")
    s.revive_stale("p1")
    _, _, doc = s.get_state("p1")
    check_document(doc, "p1")
    assert doc["node"]["role"] == "primary" and doc["primary"]["id"] == "p1"
    assert doc["epoch"] == 1  # its last epoch as primary
    _, _, doc3 = s.get_state("p3")
    assert doc3["epoch"] == 3 and doc3["node"]["role"] == "primary"


def test_conflict(sim_nobroker):
    s = sim_nobroker
    s.conflict("p3")
    a = s.get_state("p1")[2]
    b = s.get_state("p3")[2]
    assert a["node"]["role"] == b["node"]["role"] == "primary"
    assert a["epoch"] == b["epoch"] == 1
    assert a["primary"]["id"] == "p1" and b["primary"]["id"] == "p3"


def test_lag(sim_nobroker):
    s = sim_nobroker
    s.lag("p3", True)
    s.promote("p2", event=False)
    d3 = s.get_state("p3")[2]
    assert d3["epoch"] == 1 and d3["primary"]["id"] == "p1" and d3["node"]["role"] == "standby"
    assert s.get_state("p1")[2]["epoch"] == 2
    s.lag("p3", False)
    d3 = s.get_state("p3")[2]
    assert d3["epoch"] == 2 and d3["primary"]["id"] == "p2"


def test_fail_500(sim_nobroker):
    s = sim_nobroker
    s.fail("p2", 500)
    assert raw_get(s.urls["p2"], token=s.token)[0] == 500
    s.fail("p2", "none")
    assert raw_get(s.urls["p2"], token=s.token)[0] == 200


def test_fail_malformed(sim_nobroker):
    s = sim_nobroker
    s.fail("p2", "malformed")
    status, _, body = raw_get(s.urls["p2"], token=s.token)
    assert status == 200
    with pytest.raises(ValueError):
        json.loads(body)


def test_fail_wrong_type(sim_nobroker):
    s = sim_nobroker
    s.fail("p2", "wrong_type")
    status, _, body = raw_get(s.urls["p2"], token=s.token)
    doc = json.loads(body)
    assert status == 200 and isinstance(doc["epoch"], str)
    with pytest.raises(AssertionError):
        check_document(doc)


def test_fail_huge(sim_nobroker):
    s = sim_nobroker
    s.fail("p2", "huge")
    status, h, body = raw_get(s.urls["p2"], token=s.token, timeout=10)
    assert status == 200 and int(h["Content-Length"]) == len(body) > 10 * 1024 * 1024
    assert json.loads(body)["node"]["id"] == "p2"


def test_fail_reset(sim_nobroker):
    s = sim_nobroker
    s.fail("p2", "reset")
    with pytest.raises((http.client.IncompleteRead, ConnectionResetError,
                        http.client.RemoteDisconnected)):
        raw_get(s.urls["p2"], token=s.token)
    s.fail("p2", "none")
    assert raw_get(s.urls["p2"], token=s.token)[0] == 200


def test_fail_bad_mode_rejected(sim_nobroker):
    from harness.sim import SimError
    with pytest.raises(SimError):
        sim_nobroker.fail("p2", "bogus")
    with pytest.raises(SimError):
        sim_nobroker.promote("p9")


def test_load_balancer_answers_as_up_nodes(sim_nobroker):
    s = sim_nobroker
    seen = set()
    for _ in range(6):
        status, _, doc = s.get_state("lb")
        assert status == 200
        check_document(doc)
        assert doc["node"]["api_url"] == s.urls[doc["node"]["id"]]
        seen.add(doc["node"]["id"])
    assert seen == {"p1", "p2", "p3"}
    s.kill("p1")
    s.kill("p3")
    for _ in range(4):
        assert s.get_state("lb")[2]["node"]["id"] == "p2"
    assert s.counters("p2")["via_lb"] >= 4
    s.kill("p2")
    assert s.get_state("lb")[0] == 503


def test_versions_per_node(sim_nobroker):
    s = sim_nobroker
    s.set_version("p3", "9.0.0")
    assert s.get_state("p3")[2]["node"]["version"] == "9.0.0"
    assert s.get_state("p1")[2]["node"]["version"] == "9.0.1"


def test_package_endpoint(sim_nobroker):
    s = sim_nobroker
    data = b"package-bytes-" * 1000
    r = s.offer_update("9.0.2", data)
    assert r["sha256"] == hashlib.sha256(data).hexdigest() and r["size"] == len(data)
    for nid in ("p1", "p2"):
        u = s.get_state(nid)[2]["agent_update"]
        assert u["version"] == "9.0.2" and u["sha256"] == r["sha256"] and u["size"] == len(data)
        assert u["url"] == s.urls["p1"] + "/api/v1/agent/packages/9.0.2"
    path = urllib.parse.urlsplit(r["url"]).path
    status, h, body = raw_get(s.urls["p1"], path=path, token=s.token)
    assert status == 200 and body == data
    assert h["Content-Type"] == "application/octet-stream"
    # corrupted payload with the announced hash
    s.offer_update("9.0.3", data, served=b"evil" + data[4:])
    body = raw_get(s.urls["p1"], path="/api/v1/agent/packages/9.0.3", token=s.token)[2]
    assert hashlib.sha256(body).hexdigest() != s.get_state("p1")[2]["agent_update"]["sha256"]
    s.drop_package("9.0.3")
    assert raw_get(s.urls["p1"], path="/api/v1/agent/packages/9.0.3", token=s.token)[0] == 404
    s.withdraw_update()
    assert s.get_state("p1")[2]["agent_update"] is None


def test_set_broker(sim_nobroker):
    s = sim_nobroker
    s.set_broker("p1", "broker.example", 5671, vhost="/dsm", tls=True)
    b = s.get_state("p2")[2]["primary"]["broker"]
    assert b == {"host": "broker.example", "port": 5671, "vhost": "/dsm", "tls": True}


def test_get_latency_is_low(sim_nobroker):
    """Sanity check of TCP_NODELAY: keep-alive GETs on loopback take ~1 ms,
    not the ~40 ms of Nagle + delayed ACK."""
    s = sim_nobroker
    host, port = hostport(s.urls["p1"])
    c = http.client.HTTPConnection(host, port, timeout=5)
    times = []
    etag = None
    try:
        for i in range(60):
            h = {"Authorization": "Bearer " + s.token}
            if etag and i % 2:
                h["If-None-Match"] = etag
            t0 = time.perf_counter()
            c.request("GET", "/api/v1/ha/state", headers=h)
            r = c.getresponse()
            r.read()
            times.append(time.perf_counter() - t0)
            etag = r.getheader("ETag") or etag
    finally:
        c.close()
    med = statistics.median(times)
    print("median GET %.2f ms" % (med * 1000))
    assert med < 0.010, "median GET %.1f ms" % (med * 1000)


def test_stats(sim_nobroker):
    s = sim_nobroker
    raw_get(s.urls["p1"], token=s.token)
    s.reset_counters()
    t0 = time.time()
    for _ in range(3):
        assert raw_get(s.urls["p1"], token=s.token)[0] == 200
    for _ in range(2):
        assert raw_get(s.lb_url, token=s.token)[0] == 200
    s.hang("p2")
    with pytest.raises((socket.timeout, TimeoutError)):
        raw_get(s.urls["p2"], token=s.token, timeout=0.3)
    st = s.stats()
    assert t0 - 1 <= st["since"] <= t0
    assert st["requests"] == {"total": 6, "by_node": {"p1": 3, "p2": 1, "p3": 0, "lb": 2}}
    lat = st["latency_ms"]
    assert lat["count"] == 5  # the hung request is counted, not timed
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"] < 1000
    assert sum(c for _, c in st["per_second"]) == 6
    assert all(t0 - 1 <= sec <= time.time() for sec, _ in st["per_second"])
    s.reset_counters()
    st = s.stats()
    assert st["requests"]["total"] == 0 and st["latency_ms"]["count"] == 0
    assert st["latency_ms"]["p50"] is None and st["per_second"] == []


def test_answers_follow_every_change(sim_nobroker):
    """Answers are rendered once per change: each operation shows at once."""
    s = sim_nobroker
    status, h, _ = raw_get(s.urls["p1"], token=s.token)
    etag = h["ETag"]
    s.forge("p1", {"epoch": 99})
    status, h, body = raw_get(s.urls["p1"], token=s.token, headers={"If-None-Match": etag})
    assert status == 200 and json.loads(body)["epoch"] == 99 and h["ETag"] != etag
    s.forge("p1", None)
    status, h, _ = raw_get(s.urls["p1"], token=s.token, headers={"If-None-Match": etag})
    assert status == 304 and h["ETag"] == etag
    s.fail("p1", "wrong_type")
    assert isinstance(s.get_state("p1")[2]["epoch"], str)
    s.fail("p1", "none")
    s.set_version("p1", "9.9.9")
    assert s.get_state("p1")[2]["node"]["version"] == "9.9.9"


def test_keep_alive_pipelining_and_head(sim_nobroker):
    s = sim_nobroker
    host, port = hostport(s.urls["p1"])
    req = ("GET /api/v1/ha/state HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n\r\n"
           % s.token).encode()
    with socket.create_connection((host, port), timeout=3) as c:
        c.sendall(req + req.replace(b"GET", b"HEAD", 1))
        data = b""
        while data.count(b"HTTP/1.1 200 OK") < 2:
            chunk = c.recv(65536)
            assert chunk, data
            data += chunk
        first, second = data.split(b"HTTP/1.1 200 OK")[1:]
        length = int(re.search(rb"Content-Length: (\d+)", second).group(1))
        assert second.endswith(b"\r\n\r\n") and length == len(first.split(b"\r\n\r\n", 1)[1])
    status, h, _ = raw_get(s.urls["p1"], token=s.token, headers={"Connection": "close"})
    assert status == 200 and h["Connection"] == "close"


def test_kill_drops_hung_request_through_the_lb(sim_nobroker):
    s = sim_nobroker
    s.kill("p2")
    s.kill("p3")
    s.hang("p1")
    host, port = hostport(s.lb_url)
    with socket.create_connection((host, port), timeout=3) as c:
        c.sendall(("GET /api/v1/ha/state HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s"
                   "\r\n\r\n" % s.token).encode())
        time.sleep(0.2)
        t0 = time.monotonic()
        s.kill("p1")
        assert c.recv(100) == b""
        assert time.monotonic() - t0 < 2
    assert s.requests("p1")[-1]["status"] == "dropped"


def test_promote_publishes_event_on_rabbitmq(sim, rabbit_nodes):
    """Validates the rabbit harness: a consumer on the new Primary's broker
    (and one on the old one's) receives provider.primary.changed."""
    import pika
    s = sim
    consumers = []
    try:
        for node in rabbit_nodes:
            conn = pika.BlockingConnection(pika.ConnectionParameters(
                host=node.host, port=node.port, connection_attempts=1, socket_timeout=5,
                blocked_connection_timeout=5))
            ch = conn.channel()
            ch.exchange_declare("dsm.provider.events", exchange_type="topic", durable=True)
            q = ch.queue_declare("", exclusive=True, auto_delete=True).method.queue
            ch.queue_bind(q, "dsm.provider.events", routing_key="provider.#")
            consumers.append((conn, ch, q))
        r = s.promote("p2")
        assert r["published"] == {"p1": "ok", "p2": "ok"}, r
        for conn, ch, q in consumers:
            body = None
            deadline = time.monotonic() + 10
            while body is None and time.monotonic() < deadline:
                method, props, body = ch.basic_get(q, auto_ack=True)
                if body is None:
                    conn.sleep(0.05)
            assert body is not None, "no event on %s" % q
            assert method.routing_key == "provider.primary.changed"
            assert json.loads(body) == {"epoch": 2, "primary_id": "p2", "api_url": s.urls["p2"]}
        # kill the old primary's broker: promote still works, reports the failure
        rabbit_nodes[1].kill()
        r = s.promote("p1")
        assert r["published"]["p2"].startswith("error"), r
        assert r["published"]["p1"] == "ok", r
    finally:
        for conn, _, _ in consumers:
            try:
                conn.close()
            except Exception:
                pass


def test_daemon_harness_with_fake_daemon(sim_nobroker, notify_socket, tmp_path):
    """Validates harness.daemon and harness.notify_socket against a stand-in
    daemon (tests/harness/fake_daemon.py), so they work before the real one."""
    import os
    import signal
    from harness.daemon import Daemon
    from harness import util
    s = sim_nobroker
    fake = os.path.join(util.TESTS_DIR, "harness", "fake_daemon.py")
    d = Daemon(str(tmp_path / "d"), sim=s, notify_socket=notify_socket, binary=fake,
               watchdog_usec=200000, watchdog_pid=True)
    try:
        text = open(d.config_path).read()
        assert "[provider]" in text and s.urls["p1"] in text and "log_target = stderr" in text
        d.start(timeout=10)
        assert notify_socket.ready()
        st = d.wait_for_primary("p1", epoch=1, timeout=10)
        assert st["rabbitmq"]["port"] == str(s.state()["nodes"]["p1"]["broker"]["port"])
        s.promote("p3", event=False)
        code, doc = d.notify({"reason": "test"})
        assert code == 202 and doc == {"status": "accepted"}
        st = d.wait_for_primary("p3", epoch=2, timeout=10)
        assert st["provider"]["api_url"] == s.urls["p3"]
        d.wait_for_log(r"committed epoch=2 primary_id=p3", 5)
        notify_socket.wait_status(r"primary p3 epoch 2", 5)
        assert d.notify(token="wrong")[0] == 401
        code, doc = d.status()
        assert code == 200 and doc["epoch"] == 2 and doc["counters"]["notifies"] == 1
        time.sleep(0.5)
        iv = notify_socket.watchdog_intervals()
        assert len(iv) >= 2 and all(0.05 < x < 0.5 for x in iv), iv
        with pytest.raises(TimeoutError):
            d.wait_for_settings(lambda st: st["provider"]["primary_id"] == "p2", timeout=0.3)
        pid = d.pid
        assert d.stop() == 0
        assert not util.pid_alive(pid)
    finally:
        d.stop()


def test_rabbit_sigstop_freezes_broker(rabbit_ok):
    """sigstop keeps the TCP port open but nothing answers; sigcont resumes."""
    from harness import rabbit, util
    node = rabbit_ok[0]
    node.sigstop()
    try:
        assert util.port_open(node.host, node.port, 1.0)  # the kernel still accepts
        t0 = time.monotonic()
        assert not rabbit.amqp_ready(node.host, node.port, timeout=1.0)
        assert time.monotonic() - t0 < 5
    finally:
        node.sigcont()
    assert rabbit.amqp_ready(node.host, node.port, timeout=5.0)


def test_harness_real_daemon_follows_promotion(sim, daemon_factory, notify_socket):
    """The fixtures wired together with the real daemon (skipped until it is
    built): it follows p1, connects to p1's RabbitMQ node, and moves to p2
    when the promotion event arrives on that broker."""
    s = sim
    d = daemon_factory(sim=s, notify_socket=notify_socket)
    st = d.wait_for_primary("p1", epoch=1, timeout=15)
    assert st["rabbitmq"]["port"] == str(s.state()["nodes"]["p1"]["broker"]["port"])
    d.wait_for_status(lambda doc: doc["broker_connection"] == "connected", timeout=15)
    r = s.promote("p2")
    assert r["published"]["p1"] == "ok"
    st = d.wait_for_primary("p2", epoch=2, timeout=10)
    assert st["provider"]["api_url"] == s.urls["p2"]
    from harness import util
    util.wait_until(lambda: [r for r in d.on_change_runs() if r["env"]["DSM_PRIMARY_ID"] == "p2"],
                    10, what="on_change for p2")
    assert d.stop() == 0
