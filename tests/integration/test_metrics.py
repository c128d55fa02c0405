"""GET /metrics (docs/metrics.md, issue 15) served by the real daemon against
the Provider simulator (brokers on closed ports): the Prometheus text format
0.0.4 checked line by line by a strict parser written here, on the network
listener (bearer token) and on the control socket (no token); the counters
move with what the daemon does; a scrape flood meets the status bucket.
`promtool check metrics` runs too when promtool is installed (Debian 12 has
it only in the 96 MB prometheus package, which tests/install-deps.sh does not
install)."""

import http.client
import math
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time

import pytest

from harness import util

NOTIFY_TOKEN = "metrics-secret-7d3f01"
QUIET = {"provider": {"poll_interval": "60s", "fast_poll_interval": "60s"}}
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
P = "dsm_agent_sync_"

# ---- a strict parser of the text format 0.0.4 ------------------------------

NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
LABEL = r"[a-zA-Z_][a-zA-Z0-9_]*"
VALUE = r"[+-]?(?:Inf|NaN|[0-9]+(?:\.[0-9]*)?(?:[eE][+-]?[0-9]+)?|\.[0-9]+(?:[eE][+-]?[0-9]+)?)"
SAMPLE = re.compile(r"^(%s)(\{.*\})? (%s)$" % (NAME, VALUE))
LABEL_PAIR = re.compile(r'(%s)="((?:[^"\\\n]|\\[\\"n])*)"' % LABEL)
TYPES = {"counter", "gauge", "histogram", "summary", "untyped"}


def parse_labels(text):
    """'{a="x",b="y"}' -> [(a, x), (b, y)]; raises on anything else."""
    body, pos, out = text[1:-1], 0, []
    while pos < len(body):
        m = LABEL_PAIR.match(body, pos)
        assert m, "bad label syntax at %r" % body[pos:]
        assert not m.group(1).startswith("__"), m.group(1)
        out.append((m.group(1), re.sub(r"\\(.)", lambda e: "\n" if e.group(1) == "n" else e.group(1),
                                       m.group(2))))
        pos = m.end()
        if pos < len(body):
            assert body[pos] == ",", "bad label separator in %r" % text
            pos += 1
    names = [n for n, _ in out]
    assert len(names) == len(set(names)), "a label twice: %r" % text
    return out


def parse_exposition(text):
    """Checks text as 0.0.4; returns {(name, ((label, value), ...)): float}."""
    assert text.endswith("\n"), "the last line has no line feed"
    families, series, order, current = {}, {}, [], None
    for no, line in enumerate(text[:-1].split("\n"), 1):
        where = "line %d: %r" % (no, line)
        assert line, "empty " + where
        if line.startswith("#"):
            m = re.match(r"^# (HELP|TYPE) (%s) (.*)$" % NAME, line)
            assert m, where
            kind, name, rest = m.groups()
            f = families.setdefault(name, {"help": False, "type": None, "done": False})
            assert not f["done"], "comment after the family's samples: " + where
            if kind == "HELP":
                assert not f["help"] and rest, where
                assert not re.search(r"\\[^\\n]", rest), where
                f["help"] = True
            else:
                assert f["type"] is None and rest in TYPES, where
                f["type"] = rest
            continue
        m = SAMPLE.match(line)
        assert m, "bad sample " + where
        name, labels, value = m.group(1), parse_labels(m.group(2)) if m.group(2) else [], m.group(3)
        fam, suffix = name, ""
        for sfx in ("_bucket", "_sum", "_count"):
            base = name[:-len(sfx)]
            if name.endswith(sfx) and families.get(base, {}).get("type") == "histogram":
                fam, suffix = base, sfx
        f = families.get(fam)
        assert f and f["type"] and f["help"], "sample without HELP and TYPE: " + where
        assert not f["done"], "family not contiguous: " + where
        if current not in (None, fam):
            families[current]["done"] = True
        current = fam
        if f["type"] == "counter":
            assert name.endswith("_total"), "counter without _total: " + where
        if f["type"] == "histogram":
            les = [v for k, v in labels if k == "le"]
            assert bool(les) == (suffix == "_bucket"), where
            order.append((fam, suffix, les[0] if les else None, float(value)))
        key = (name, tuple(labels))
        assert key not in series, "duplicate series " + where
        series[key] = float(value)
    for fam, f in families.items():
        if f["type"] != "histogram":
            continue
        buckets = [(le, v) for n, s, le, v in order if n == fam and s == "_bucket"]
        assert buckets and buckets[-1][0] == "+Inf", "%s: no +Inf bucket last" % fam
        bounds = [float(le) for le, _ in buckets]
        assert bounds == sorted(bounds) and len(set(bounds)) == len(bounds), fam
        counts = [v for _, v in buckets]
        assert counts == sorted(counts), "%s: buckets not cumulative" % fam
        assert series[(fam + "_count", ())] == counts[-1], fam
        assert (fam + "_sum", ()) in series, fam
    return series


def promtool(text):
    if shutil.which("promtool") is None:
        return
    r = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr


def value(series, name, **labels):
    return series[(P + name, tuple(labels.items()))]


# ---- helpers ---------------------------------------------------------------

def closed_brokers(nodes):
    return {"p%d" % (i + 1): ("127.0.0.1", util.closed_port()) for i in range(nodes)}


@pytest.fixture
def sockdir():
    d = tempfile.mkdtemp(prefix="dsmm-", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def start(daemon_factory, sim, sock):
    o = {k: dict(v) for k, v in QUIET.items()}
    o["daemon"] = {"control_socket": sock}
    d = daemon_factory(sim, overrides=o, notify_token=NOTIFY_TOKEN)
    d.wait_for_primary("p1", 1, timeout=15)
    return d


def scrape(d, token=None):
    """GET /metrics over HTTP, waiting out a 429: (headers, text, series)."""
    for _ in range(30):
        code, headers, body = d.http("GET", "/metrics", token=token)
        if code != 429:
            break
        time.sleep(0.2)
    assert code == 200, (code, body)
    text = body.decode() if isinstance(body, bytes) else body
    return headers, text, parse_exposition(text)


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path):
        super().__init__("localhost", timeout=5)
        self.path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.path)


def scrape_local(sock):
    """GET /metrics on the control socket, no token: (headers, text)."""
    c = UnixHTTPConnection(sock)
    try:
        c.request("GET", "/metrics")
        r = c.getresponse()
        body = r.read()
        assert r.status == 200, (r.status, body)
        return dict(r.getheaders()), body.decode()
    finally:
        c.close()


# ---- the tests -------------------------------------------------------------

def test_scrape_over_http_and_the_control_socket(daemon_factory, sim_factory, sockdir):
    sim = sim_factory(brokers=closed_brokers(3))
    sock = os.path.join(sockdir, "control.sock")
    d = start(daemon_factory, sim, sock)

    headers, text, series = scrape(d)
    assert headers.get("Content-Type") == CONTENT_TYPE, headers
    promtool(text)
    assert value(series, "committed_epoch") == 1
    assert value(series, "primary_info", primary_id="p1") == 1
    assert value(series, "broker_connected") == 0
    assert value(series, "polls_total", node="p1", outcome="ok") >= 1
    assert value(series, "last_good_poll_timestamp_seconds") > time.time() - 60
    assert value(series, "last_commit_timestamp_seconds") > time.time() - 60
    assert value(series, "warnings", kind="no_primary") == 0
    states = {dict(k[1])["state"]: v for k, v in series.items() if k[0] == P + "update_state"}
    assert set(states) == {"disabled", "none", "installed", "held", "waiting", "downloading", "applying",
                           "failed"} and sum(states.values()) == 1, states
    # Every poll answer is counted under a node id the daemon saw (bounded).
    nodes = {dict(k[1])["node"] for k in series if k[0] == P + "polls_total"}
    assert nodes <= {"p1", "p2", "p3", "unknown"}, nodes

    # No token, a wrong one: 401, counted; the body is not metrics.
    before = value(series, "rejected_requests_total", reason="unauthorized")
    assert d.http("GET", "/metrics", token="")[0] == 401
    assert d.http("GET", "/metrics", token="wrong")[0] == 401
    assert d.http("POST", "/metrics")[0] == 405
    assert d.http("HEAD", "/metrics")[0] == 200
    _, _, series = scrape(d)
    assert value(series, "rejected_requests_total", reason="unauthorized") == before + 2
    assert value(series, "rejected_requests_total", reason="method_not_allowed") >= 1

    # The control socket: no token, the same answer.
    headers, text = scrape_local(sock)
    assert headers.get("Content-Type") == CONTENT_TYPE
    local = parse_exposition(text)
    promtool(text)
    assert value(local, "committed_epoch") == 1
    assert {k[0] for k in local} == {k[0] for k in series}


def test_counters_move_after_a_promote(daemon_factory, sim_factory, sockdir):
    sim = sim_factory(brokers=closed_brokers(3))
    d = start(daemon_factory, sim, os.path.join(sockdir, "control.sock"))
    _, _, before = scrape(d)

    epoch = sim.promote("p2", event=False)["epoch"]
    assert d.notify({"reason": "promoted p2"})[0] == 202
    d.wait_for_primary("p2", epoch, timeout=10)
    after = None

    def moved():
        nonlocal after
        _, _, after = scrape(d)
        return value(after, "commits_total") == value(before, "commits_total") + 1 and \
            value(after, "round_duration_seconds_count") > value(before, "round_duration_seconds_count")
    util.wait_until(moved, 10, interval=0.2, what="commits_total +1")

    assert value(after, "committed_epoch") == epoch
    assert value(after, "primary_info", primary_id="p2") == 1
    assert not any(k[0] == P + "primary_info" and k[1] != (("primary_id", "p2"),) for k in after)
    assert value(after, "notifies_total") == value(before, "notifies_total") + 1
    ok = lambda s: sum(v for k, v in s.items()
                       if k[0] == P + "polls_total" and dict(k[1])["outcome"] in ("ok", "not_modified"))
    assert ok(after) > ok(before)
    assert value(after, "last_commit_timestamp_seconds") >= value(before, "last_commit_timestamp_seconds")
    assert value(after, "round_duration_seconds_sum") > 0
    assert value(after, "on_change_runs_total", outcome="failed") == 0


def test_scrape_flood_is_rate_limited_like_status(daemon_factory, sim_factory, sockdir):
    sim = sim_factory(brokers=closed_brokers(3))
    d = start(daemon_factory, sim, os.path.join(sockdir, "control.sock"))
    codes = [d.http("GET", "/metrics")[0] for _ in range(80)]
    assert set(codes) == {200, 429} and codes[0] == 200, codes
    # The scrape spent the status bucket: a status read right now waits too.
    assert d.http("GET", "/v1/status")[0] == 429
    time.sleep(2.5)
    _, _, series = scrape(d)
    assert value(series, "rejected_requests_total", reason="rate_limited") >= codes.count(429)
    assert d.alive()


def test_answer_size_and_time_for_4_nodes(daemon_factory, sim_factory, sockdir):
    """The figures of the issue's note: 200 scrapes over loopback, paced
    under the status bucket (20/s)."""
    sim = sim_factory(brokers=closed_brokers(4), nodes=4)
    d = start(daemon_factory, sim, os.path.join(sockdir, "control.sock"))
    util.wait_until(lambda: sum(1 for k in scrape(d)[2] if k[0] == P + "polls_total") >= 12, 15,
                    interval=0.5, what="four nodes polled")
    time.sleep(2.5)
    times, sizes = [], []
    for _ in range(200):
        t0 = time.perf_counter()
        code, _, body = d.http("GET", "/metrics")
        dt = time.perf_counter() - t0
        assert code == 200, code
        times.append(dt)
        sizes.append(len(body))
        time.sleep(max(0.0, 0.055 - dt))
    times.sort()
    p50, p99 = times[len(times) // 2], times[int(math.ceil(len(times) * 0.99)) - 1]
    print("\n/metrics, 4 nodes: %d bytes; 200 scrapes p50 %.2f ms p99 %.2f ms max %.2f ms"
          % (sizes[-1], p50 * 1000, p99 * 1000, times[-1] * 1000))
    assert p99 < 0.5
