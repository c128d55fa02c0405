"""The notify endpoint (contract section 6) served by the real daemon.

Unlike test_notify.py (the listener alone, in tests/tools/notify_drive),
these tests run dsm-agent-syncd against the Provider simulator with brokers
on closed ports (`sim_nobroker`) and both poll intervals at 60 s, so after
the start-up rounds every poll round the simulator sees was caused by the
test: a notify must start one at once, and nothing from a notify body is
ever committed.

Run: DSM_BUILD_DIR=$PWD/build-h16 /usr/bin/python3 -m pytest -q -p no:cacheprovider \
         tests/integration/test_notify_daemon.py
"""

import http.client
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time

import pytest

from harness import daemon as daemon_mod
from harness import util

MID_ACCEPTED = "37e50e3188e74df3b5cb1cf22f7f44aa"
MID_REJECTED = "3df29a54da1c49828e32990bcbad1b87"
MID_COMMITTED = "ded36cf01a5547829b18395ff8df2196"
ENDPOINTS = "/onboarding/api/agent/rabbitmq/endpoints"
NOTIFY_TOKEN = "h16-notify-secret-9c1e77d2a4"
# Host names of exactly 253 and 254 characters made of valid labels (<= 63).
HOST_253 = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 61])
HOST_254 = HOST_253 + "e"
QUIET = {"provider": {"poll_interval": "60s", "fast_poll_interval": "60s"}}


# ---- helpers ---------------------------------------------------------------

def request(host, port, method, path, body=None, token=NOTIFY_TOKEN, ca=None, timeout=5.0,
            headers=None):
    """One request on a fresh connection: (status, headers, parsed JSON or bytes)."""
    h = dict(headers or {})
    if token:
        h["Authorization"] = "Bearer " + token
    if isinstance(body, (dict, list)):
        body = json.dumps(body)
        h.setdefault("Content-Type", "application/json")
    if ca:
        ctx = ssl.create_default_context(cafile=ca)
        c = http.client.HTTPSConnection(host, port, timeout=timeout, context=ctx)
    else:
        c = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        c.request(method, path, body=body, headers=h)
        r = c.getresponse()
        raw = r.read()
        rh = {k.lower(): v for k, v in r.getheaders()}
        status = r.status
    finally:
        c.close()
    try:
        return status, rh, json.loads(raw)
    except ValueError:
        return status, rh, raw


def sim_requests(sim):
    """Requests each simulated node has served so far: {"p1": n, ...}."""
    nodes = sim.state()["nodes"]
    return {nid: nodes[nid]["counters"].get("requests", 0) for nid in nodes}


def wait_quiet(sim, settle=0.6, timeout=15.0):
    """Waits until the simulator has seen no request for `settle` seconds
    (the daemon's start-up rounds are over); returns the counts."""
    deadline = time.monotonic() + timeout
    last, since = sim_requests(sim), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = sim_requests(sim)
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= settle:
            return now
    raise TimeoutError("the daemon kept polling: %r" % last)


def counters(d):
    """counters of /v1/status; waits out a 429 (the rate limit also counts
    status requests) for a bounded time."""
    for _ in range(30):
        code, doc = d.status()
        if code != 429:
            break
        time.sleep(0.2)
    assert code == 200, doc
    return doc["counters"]


def wait_counter(d, key, minimum, timeout=5.0):
    return util.wait_until(lambda: counters(d)[key] >= minimum and counters(d), timeout,
                           interval=0.05, what="counters.%s >= %d" % (key, minimum))


def start_quiet(daemon_factory, sim, overrides=None, **kw):
    """A daemon that has committed p1 and gone quiet (next timer poll in 60 s)."""
    ov = {k: dict(v) for k, v in QUIET.items()}
    for sec, kv in (overrides or {}).items():
        ov.setdefault(sec, {}).update(kv)
    d = daemon_factory(sim, overrides=ov, notify_token=NOTIFY_TOKEN, **kw)
    d.wait_for_primary("p1", 1, timeout=15)
    wait_quiet(sim)
    return d


def listening_tcp_ports(pid):
    """TCP ports process pid listens on (its socket fds in LISTEN state)."""
    inodes = set()
    fd_dir = "/proc/%d/fd" % pid
    for fd in os.listdir(fd_dir):
        try:
            target = os.readlink(os.path.join(fd_dir, fd))
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            if cols[3] == "0A" and cols[9] in inodes:
                ports.add(int(cols[1].rsplit(":", 1)[1], 16))
    return ports


@pytest.fixture
def quiet(daemon_factory, sim_nobroker):
    return start_quiet(daemon_factory, sim_nobroker), sim_nobroker


# ---- a notify wakes the daemon ---------------------------------------------

def test_notify_starts_a_poll_round_at_once(quiet):
    d, sim = quiet
    before = sim_requests(sim)
    c0 = counters(d)
    mark = d.log_mark()
    t0 = time.monotonic()
    status, headers, doc = d.http("POST", "/v1/notify", body={"reason": "primary promoted", "epoch": 1})
    assert status == 202 and doc == {"status": "accepted"}
    # Every node is asked again, at once (the next timer poll is 60 s away).
    util.wait_until(lambda: all(v > before[k] for k, v in sim_requests(sim).items()), 5.0,
                    what="a GET on every node after the notify")
    elapsed = time.monotonic() - t0
    assert elapsed < 1.5, "the poll round started %.2fs after the notify" % elapsed
    after = wait_counter(d, "polls", c0["polls"] + 1)
    assert after["notifies"] == c0["notifies"] + 1
    m = d.wait_for_log(MID_ACCEPTED, timeout=5, start=mark)
    line = m.string
    assert "DSM_PEER=127.0.0.1" in line and "primary promoted" in line, line
    # The GETs really are state reads, with the provider token.
    reqs = sim.requests("p2", limit=5)
    assert reqs[-1]["path"] == "/api/v1/ha/state" and reqs[-1]["status"] in (200, 304)


def test_notify_body_is_only_logged(quiet):
    d, sim = quiet
    settings_before = d.settings_text()
    c0 = counters(d)
    mark = d.log_mark()
    status, _, doc = d.http("POST", "/v1/notify",
                            body={"reason": "primary promoted", "epoch": 99, "primary_id": "p3"})
    assert status == 202 and doc == {"status": "accepted"}
    wait_counter(d, "polls", c0["polls"] + 1)
    d.wait_for_log(MID_ACCEPTED + r".*epoch=99", timeout=5, start=mark)
    # The round confirmed what the Provider says (p1 at epoch 1), nothing else.
    code, st = d.status()
    assert st["epoch"] == 1 and st["primary"]["id"] == "p1"
    assert st["counters"]["changes"] == c0["changes"]
    assert d.settings_text() == settings_before
    state = d.read_state()
    assert state["epoch"] == 1 and state["primary"]["id"] == "p1", state
    assert not any(MID_COMMITTED in l for l in d.log_lines()[mark:])
    # No new poll target came from the body: still the three nodes.
    assert sorted(n["id"] for n in st["nodes"]) == ["p1", "p2", "p3"]


def test_endpoints_patch_polls_and_never_commits(quiet):
    d, sim = quiet
    settings_before = d.settings_text()
    before = sim_requests(sim)
    c0 = counters(d)
    mark = d.log_mark()
    status, _, doc = d.http("PATCH", ENDPOINTS, body={"endpoint": "p2.example", "port": 5671})
    assert status == 202 and doc == {"status": "accepted"}
    util.wait_until(lambda: all(v > before[k] for k, v in sim_requests(sim).items()), 5.0,
                    what="a poll round after the PATCH")
    after = wait_counter(d, "polls", c0["polls"] + 1)
    assert after["notifies"] == c0["notifies"] + 1
    assert after["changes"] == c0["changes"]
    d.wait_for_log(MID_ACCEPTED + r".*p2\.example", timeout=5, start=mark)
    time.sleep(0.3)
    text = d.settings_text()
    assert text == settings_before
    assert "p2.example" not in text and "5671" not in text
    code, st = d.status()
    assert st["primary"]["broker"]["host"] == "127.0.0.1" and st["primary"]["id"] == "p1"


@pytest.mark.parametrize("body,word", [
    ({"port": 5671}, "endpoint"),
    ({"endpoint": "p2.example"}, "port"),
    ({"endpoint": "p2.example", "port": 0}, "port"),
    ({"endpoint": "p2.example", "port": 70000}, "port"),
    ({"endpoint": "a" * 254, "port": 5671}, "endpoint"),
    ({"endpoint": HOST_254, "port": 5671}, "endpoint"),
    ({"endpoint": "", "port": 5671}, "endpoint"),
    ({"endpoint": "p2.example", "port": "5671"}, "port"),
    ({"endpoint": 5, "port": 5671}, "endpoint"),
    ({"endpoint": ["p2.example"], "port": 5671}, "endpoint"),
    ({"endpoint": "p2.example", "port": 5671.5}, "port"),
    ("[1, 2]", "object"),
    ("not json", "JSON"),
])
def test_endpoints_patch_invalid_bodies(quiet, body, word):
    d, sim = quiet
    c0 = counters(d)
    before = sim_requests(sim)
    status, headers, doc = d.http("PATCH", ENDPOINTS, body=body)
    assert status == 400, (body, doc)
    assert headers.get("Content-Type", "").startswith("application/json")
    assert isinstance(doc, dict) and word in doc["error"], doc
    # A refused request is no notify: no round, no count.
    time.sleep(0.4)
    assert counters(d)["notifies"] == c0["notifies"]
    assert sim_requests(sim) == before


def test_endpoint_of_253_chars_accepted(quiet):
    d, _ = quiet
    assert len(HOST_253) == 253 and len(HOST_254) == 254
    status, _, doc = d.http("PATCH", ENDPOINTS, body={"endpoint": HOST_253, "port": 65535})
    assert status == 202, doc


@pytest.mark.parametrize("token", ["", "wrong-guess-5e1f", NOTIFY_TOKEN[:-1], NOTIFY_TOKEN + "x"])
def test_missing_or_wrong_token(quiet, token):
    d, sim = quiet
    c0 = counters(d)
    before = sim_requests(sim)
    mark = d.log_mark()
    for method, path in (("POST", "/v1/notify"), ("PATCH", ENDPOINTS), ("GET", "/v1/status")):
        body = {"endpoint": "p2.example", "port": 5671} if method == "PATCH" else None
        status, _, doc = d.http(method, path, body=body, token=token)
        assert status == 401, (method, path, doc)
        assert "error" in doc
    m = d.wait_for_log(MID_REJECTED, timeout=5, start=mark)
    assert "DSM_PEER=127.0.0.1" in m.string, m.string
    time.sleep(0.3)
    assert counters(d)["notifies"] == c0["notifies"]
    assert sim_requests(sim) == before
    log = d.log_text()
    assert NOTIFY_TOKEN not in log
    assert NOTIFY_TOKEN[:-1] not in log
    assert sim.token not in log
    if token:
        assert token not in log
    assert "Bearer" not in log


def test_guessing_the_token_is_rate_limited(quiet):
    """Failed authentications have their own bucket (5/s, burst 10): past
    it, 429 with Retry-After before the token is compared; nothing is
    polled, and once Retry-After has passed the right token works."""
    d, sim = quiet
    before = sim_requests(sim)
    mark = d.log_mark()
    answers = [d.http("POST", "/v1/notify", body={"reason": "guess"}, token="guess-%d" % i)
               for i in range(30)]
    statuses = [a[0] for a in answers]
    assert statuses[:10] == [401] * 10 and 429 in statuses and set(statuses) == {401, 429}, statuses
    retry = [int(h["Retry-After"]) for st, h, _ in answers if st == 429]
    assert retry and min(retry) >= 1
    # Logged with the peer, rate-limited (10 lines per window), no guess.
    m = d.wait_for_log(MID_REJECTED, timeout=5, start=mark)
    assert "DSM_PEER=127.0.0.1" in m.string, m.string
    assert len([l for l in d.log_lines()[mark:] if MID_REJECTED in l]) <= 12
    assert sim_requests(sim) == before
    time.sleep(max(retry) + 0.1)
    c0 = counters(d)
    status, _, doc = d.http("POST", "/v1/notify", body={"reason": "after the guesses"})
    assert status == 202, doc
    wait_counter(d, "notifies", c0["notifies"] + 1)
    util.wait_until(lambda: sim_requests(sim) != before, 5, interval=0.05, what="the notify's poll round")
    assert "guess-" not in d.log_text()


# ---- a flood ---------------------------------------------------------------

FLOOD = r"""
import http.client, json, sys, threading, time
host, port, token = sys.argv[1], int(sys.argv[2]), sys.argv[3]
n_clients, total = int(sys.argv[4]), int(sys.argv[5])
counts, bad_retry, lock = {}, [], threading.Lock()
deadline = time.monotonic() + 100
def client(i):
    for _ in range(total // n_clients):
        if time.monotonic() > deadline:
            k = "deadline"
        else:
            try:
                c = http.client.HTTPConnection(host, port, timeout=10,
                                               source_address=("127.0.2.%d" % (i + 1), 0))
                c.request("POST", "/v1/notify", body="{}",
                          headers={"Authorization": "Bearer " + token})
                r = c.getresponse(); r.read(); k = str(r.status)
                if r.status == 429:
                    ra = r.getheader("Retry-After")
                    if not (ra and ra.isdigit() and int(ra) >= 1):
                        with lock:
                            bad_retry.append(ra)
                c.close()
            except Exception as e:
                k = type(e).__name__
        with lock:
            counts[k] = counts.get(k, 0) + 1
ts = [threading.Thread(target=client, args=(i,)) for i in range(n_clients)]
[t.start() for t in ts]
[t.join(120) for t in ts]
print(json.dumps({"counts": counts, "bad_retry": bad_retry[:5]}))
"""


def test_notify_flood_coalesces_and_stays_responsive(quiet):
    d, sim = quiet
    before = sim_requests(sim)
    c0 = counters(d)
    host, port = "127.0.0.1", d.notify_port
    latencies, errors = [], []
    stop = threading.Event()

    def probe():
        while not stop.is_set() and len(latencies) < 5000:
            t0 = time.monotonic()
            try:
                s, _, doc = request(host, port, "GET", "/healthz", token="", timeout=2)
                if s != 200 or doc != {"status": "ok"}:
                    errors.append((s, doc))
            except OSError as e:
                errors.append(repr(e))
            latencies.append(time.monotonic() - t0)
            stop.wait(0.02)

    flood = subprocess.Popen([util.PYTHON, "-c", FLOOD, host, str(port), NOTIFY_TOKEN, "50", "2000"],
                             stdout=subprocess.PIPE, text=True, start_new_session=True)
    prober = threading.Thread(target=probe, daemon=True)
    prober.start()
    try:
        out, _ = flood.communicate(timeout=150)
    finally:
        stop.set()
        if flood.poll() is None:
            util.stop_popen(flood, signal.SIGKILL, timeout=5)
        prober.join(10)
    res = json.loads(out)
    counts = res["counts"]
    assert sum(counts.values()) == 2000, counts
    assert set(counts) <= {"202", "429"}, counts
    assert counts.get("202", 0) >= 20, counts
    assert res["bad_retry"] == [], res
    assert not errors, errors[:5]
    assert len(latencies) >= 10
    latencies.sort()
    print("healthz during flood: n=%d median=%.1fms max=%.1fms; answers %s"
          % (len(latencies), latencies[len(latencies) // 2] * 1000, latencies[-1] * 1000, counts))
    assert latencies[-1] < 0.1, ["%.3f" % x for x in latencies[-5:]]
    # Coalesced: every accepted notify counted, far fewer rounds than notifies.
    c1 = wait_counter(d, "notifies", c0["notifies"] + counts["202"], timeout=10)
    assert c1["notifies"] == c0["notifies"] + counts["202"], c1
    wait_quiet(sim, settle=0.6, timeout=20)
    rounds = sim_requests(sim)["p1"] - before["p1"]
    assert 1 <= rounds < 200, rounds
    # At most one round per accepted notify (plus the one pending at the end).
    assert rounds <= counts["202"] + 1, (rounds, counts)
    polls = counters(d)["polls"] - c0["polls"]
    assert polls < 200, polls
    # Still healthy and still following p1.
    assert d.alive()
    assert d.read_settings()["provider"]["primary_id"] == "p1"


# ---- transport -------------------------------------------------------------

def test_socket_activation(daemon_factory, sim_nobroker):
    ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("127.0.0.1", 0))
    ls.listen(64)
    act_port = ls.getsockname()[1]
    # The config names another port: the daemon must use the passed socket.
    cfg_port = util.free_port()
    ov = {k: dict(v) for k, v in QUIET.items()}
    ov["notify"] = {"listen": "127.0.0.1:%d" % cfg_port}
    d = daemon_factory(sim_nobroker, overrides=ov, notify_token=NOTIFY_TOKEN, start=False)
    fd = ls.fileno()

    def preexec():
        os.dup2(fd, 3)  # inheritable
        util.pdeathsig_term()

    env = d.env()
    env["LISTEN_FDS"] = "1"
    argv = ["/bin/sh", "-c", 'LISTEN_PID=$$; export LISTEN_PID; exec "$@"', "sh"] + d.argv()
    d._log = open(d.log_path, "ab")
    d._out = open(d.stdout_path, "ab")
    try:
        d.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=d._out, stderr=d._log,
                                  env=env, cwd=d.workdir, start_new_session=True,
                                  preexec_fn=preexec, close_fds=False)
        d.pid = d.proc.pid
        util.register_cleanup(("daemon", d.pid), lambda p=d.proc: util.stop_popen(p, timeout=5))
    finally:
        ls.close()  # the daemon holds its own copy now
    ok = util.wait_until(lambda: _healthz(act_port) or not d.alive(), 15, interval=0.05,
                         what="healthz on the passed socket")
    assert d.alive(), d.log_tail()
    assert ok is True
    d.wait_for_log(r"listening on the socket passed by systemd", timeout=5)
    assert not util.port_open("127.0.0.1", cfg_port), "the daemon also bound the configured port"
    assert listening_tcp_ports(d.pid) == {act_port}
    d.wait_for_primary("p1", 1, timeout=15)
    wait_quiet(sim_nobroker)
    c0 = counters_at(act_port)
    status, _, doc = request("127.0.0.1", act_port, "POST", "/v1/notify", body={})
    assert status == 202 and doc == {"status": "accepted"}
    util.wait_until(lambda: counters_at(act_port)["polls"] > c0["polls"], 5, what="a round")


def _healthz(port):
    try:
        return request("127.0.0.1", port, "GET", "/healthz", token="", timeout=1)[0] == 200
    except OSError:
        return False


def counters_at(port, ca=None):
    status, _, doc = request("127.0.0.1", port, "GET", "/v1/status", ca=ca)
    assert status == 200, doc
    return doc["counters"]


def make_test_ca(tmp_path):
    if not shutil.which("openssl"):
        pytest.skip("openssl CLI not installed")
    d = tmp_path / "pki"
    d.mkdir()

    def run(*a):
        subprocess.run(["openssl", *a], cwd=d, check=True, capture_output=True, timeout=60)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
        "-days", "2", "-subj", "/CN=dsm h16 test CA")
    (d / "ext.cnf").write_text("subjectAltName = IP:127.0.0.1\n")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
        "-subj", "/CN=dsm-agent-syncd test")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.pem", "-days", "2", "-extfile", "ext.cnf")
    os.chmod(d / "server.key", 0o600)
    return str(d / "server.pem"), str(d / "server.key"), str(d / "ca.pem")


def test_https_with_test_ca(daemon_factory, sim_nobroker, tmp_path):
    cert, key, ca = make_test_ca(tmp_path)
    d = daemon_factory(sim_nobroker, overrides={**QUIET, "notify": {"tls_cert": cert, "tls_key": key}},
                       notify_token=NOTIFY_TOKEN, start=True, wait=False)
    port = d.notify_port
    util.wait_until(lambda: _https_healthz(port, ca) or not d.alive(), 15, interval=0.1,
                    what="healthz over https")
    assert d.alive(), d.log_tail()
    d.wait_for_primary("p1", 1, timeout=15)
    wait_quiet(sim_nobroker)
    c0 = counters_at(port, ca)
    status, _, doc = request("127.0.0.1", port, "POST", "/v1/notify", body={"reason": "over tls"}, ca=ca)
    assert status == 202 and doc == {"status": "accepted"}
    util.wait_until(lambda: counters_at(port, ca)["polls"] > c0["polls"], 5, what="a round")
    status, _, st = request("127.0.0.1", port, "GET", "/v1/status", ca=ca)
    assert status == 200 and st["primary"]["id"] == "p1" and st["epoch"] == 1
    # curl with the test CA (verifies the certificate and the IP SAN).
    if shutil.which("curl"):
        r = subprocess.run(["curl", "-sS", "--noproxy", "*", "--cacert", ca, "-m", "10",
                            "-H", "Authorization: Bearer " + NOTIFY_TOKEN,
                            "-w", "\n%{http_code}", "https://127.0.0.1:%d/v1/status" % port],
                           capture_output=True, text=True, timeout=20)
        body, _, code = r.stdout.rpartition("\n")
        assert r.returncode == 0 and code == "200", (r.returncode, r.stderr)
        assert json.loads(body)["epoch"] == 1
        r = subprocess.run(["curl", "-sS", "--noproxy", "*", "--cacert", ca, "-m", "10", "-X", "POST",
                            "-H", "Authorization: Bearer " + NOTIFY_TOKEN, "-o", "/dev/null",
                            "-w", "%{http_code}", "https://127.0.0.1:%d/v1/notify" % port],
                           capture_output=True, text=True, timeout=20)
        assert r.stdout == "202", (r.stdout, r.stderr)
    # A client that does not trust the CA is refused by its own verification.
    with pytest.raises(ssl.SSLError):
        request("127.0.0.1", port, "GET", "/healthz", token="", ca=_other_ca(tmp_path))
    # Plain HTTP on the HTTPS port gets no HTTP answer.
    with pytest.raises((http.client.HTTPException, OSError)):
        request("127.0.0.1", port, "GET", "/healthz", token="", timeout=3)
    # dsm-agent-syncctl follows the config to https.
    r = d.ctl("status", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["epoch"] == 1
    assert NOTIFY_TOKEN not in d.log_text()


def _other_ca(tmp_path):
    d = tmp_path / "pki2"
    d.mkdir(exist_ok=True)
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "o.key",
                    "-out", "o.pem", "-days", "2", "-subj", "/CN=other CA"],
                   cwd=d, check=True, capture_output=True, timeout=60)
    return str(d / "o.pem")


def _https_healthz(port, ca):
    try:
        return request("127.0.0.1", port, "GET", "/healthz", token="", ca=ca, timeout=1)[0] == 200
    except (OSError, http.client.HTTPException):
        return False


def test_listen_off(daemon_factory, sim_nobroker):
    ov = {k: dict(v) for k, v in QUIET.items()}
    ov["notify"] = {"listen": "off"}
    d = daemon_factory(sim_nobroker, overrides=ov, notify_token=NOTIFY_TOKEN)
    d.wait_for_primary("p1", 1, timeout=15)
    assert d.alive()
    assert listening_tcp_ports(d.pid) == set(), listening_tcp_ports(d.pid)
    # The port the harness picked before "off" stays closed.
    assert not util.port_open("127.0.0.1", d.notify_port)
    r = d.ctl("status")
    assert r.returncode != 0
    assert "off" in r.stderr, r.stderr


def test_sighup_moves_the_listener(quiet):
    d, sim = quiet
    old = d.notify_port
    assert _healthz(old)
    new = util.free_port()
    mark = d.log_mark()
    d.reconfigure({"notify": {"listen": "127.0.0.1:%d" % new}})
    util.wait_until(lambda: _healthz(new), 10, interval=0.05, what="healthz on the new port")
    util.wait_until(lambda: not util.port_open("127.0.0.1", old, timeout=0.3), 5, interval=0.05,
                    what="the old port to close")
    assert listening_tcp_ports(d.pid) == {new}
    assert d.notify_port == new
    status, _, doc = d.http("POST", "/v1/notify", body={})
    assert status == 202
    d.wait_for_log(r"listening on 127\.0\.0\.1:%d" % new, timeout=5, start=mark)
    assert d.alive()
    # SIGHUP to off: nothing listens any more.
    d.reconfigure({"notify": {"listen": "off"}})
    util.wait_until(lambda: not listening_tcp_ports(d.pid), 10, interval=0.05,
                    what="the listener to close")
    assert not util.port_open("127.0.0.1", new)
    assert d.alive()


def test_sighup_invalid_config_keeps_the_listener(quiet):
    d, sim = quiet
    port = d.notify_port
    mark = d.log_mark()
    good = open(d.config_path).read()
    bad = good.replace("listen = 127.0.0.1:%d" % port, "listen = 127.0.0.1:%d" % util.free_port()) \
        + "\n[notify_typo]\nx = 1\n"
    d.write_config(bad)
    d.signal(signal.SIGHUP)
    m = d.wait_for_log(r"7973658656e64425b0beaf0a576b2dce", timeout=10, start=mark)
    assert re.search(re.escape(d.config_path) + r":\d+: ", m.string), m.string
    assert d.alive()
    assert listening_tcp_ports(d.pid) == {port}
    assert d.http("POST", "/v1/notify", body={})[0] == 202


def test_sighup_to_a_busy_port_keeps_a_listener(quiet):
    d, sim = quiet
    old = d.notify_port
    busy = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        busy_port = busy.getsockname()[1]
        mark = d.log_mark()
        d.reconfigure({"notify": {"listen": "127.0.0.1:%d" % busy_port}})
        # Contract 2: a config that cannot take effect whole is rejected
        # whole (MESSAGE_ID config rejected), and the old one stays.
        m = d.wait_for_log(r"7973658656e64425b0beaf0a576b2dce", timeout=10, start=mark)
        assert str(busy_port) in m.string
        assert d.alive()
        assert listening_tcp_ports(d.pid) == {old}
        # The operator can still reach the daemon: on the old port (the new
        # one could not be opened).
        assert _healthz(old), "no listener left: %s" % sorted(listening_tcp_ports(d.pid))
    finally:
        busy.close()
