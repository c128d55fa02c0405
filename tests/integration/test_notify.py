"""The notify listener (contract section 6) over real HTTP on loopback.

Every test talks to a server started by the `notify_server` fixture. Today
that is tests/tools/notify_drive (the listener alone on an sd-event loop);
only `_start_server` knows that, so switching to the real daemon is a change
in one place.
"""
import http.client
import json
import os
import select
import shutil
import socket
import ssl
import subprocess
import threading
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUILD = os.environ.get("DSM_BUILD_DIR", os.path.join(REPO, "build"))
DRIVER = os.path.join(BUILD, "tests", "notify_drive")
CTL = os.path.join(BUILD, "dsm-agent-syncctl")
TOKEN = "t0ken-for-tests-7f3a"
MAX_FDS = 110  # 64 connections + 16 slack + the process's own


def free_port(host="127.0.0.1", family=socket.AF_INET):
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, proc, host, port, tls_ca, stderr_path, config):
        self.proc, self.host, self.port = proc, host, port
        self.tls_ca, self.stderr_path, self.config = tls_ca, stderr_path, config
        self.lines = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def pid(self):
        return self.proc.pid

    def wait_line(self, prefix, timeout=5.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if line.startswith(prefix):
                    return line
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        return None

    def stderr(self):
        with open(self.stderr_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def n_fds(self):
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def connection(self, source=None, timeout=5.0):
        src = (source, 0) if source else None
        if self.tls_ca:
            ctx = ssl.create_default_context(cafile=self.tls_ca)
            return http.client.HTTPSConnection(self.host, self.port, timeout=timeout,
                                               source_address=src, context=ctx)
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout, source_address=src)

    def request(self, method, path, body=None, token=TOKEN, headers=None, source=None, timeout=5.0):
        h = dict(headers or {})
        if token is not None:
            h["Authorization"] = f"Bearer {token}"
        if isinstance(body, (dict, list)):
            body = json.dumps(body)
        c = self.connection(source, timeout)
        try:
            c.request(method, path, body=body, headers=h)
            r = c.getresponse()
            data = r.read()
            return r.status, dict(r.getheaders()), data
        finally:
            c.close()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        return self.proc.returncode


def write_config(tmp_path, listen, allow=None, tls=None):
    (tmp_path / "notify.token").write_text(TOKEN + "\n")
    lines = ["[provider]", "endpoints = http://127.0.0.1:9", "",
             "[notify]", f"listen = {listen}", f"token_file = {tmp_path / 'notify.token'}"]
    if allow:
        lines.append(f"allow = {allow}")
    if tls:
        lines += [f"tls_cert = {tls[0]}", f"tls_key = {tls[1]}"]
    # control_socket = off: dsm-agent-syncctl must ask this listener, not a
    # control socket the machine may have at the default path.
    lines += ["", "[daemon]", f"state_file = {tmp_path / 'state.json'}", "log_level = info",
              "log_target = stderr", "control_socket = off", ""]
    path = tmp_path / "agent-sync.ini"
    path.write_text("\n".join(lines))
    return path


def _start_server(tmp_path, host="127.0.0.1", allow=None, tls=None, activation_socket=None, env_extra=None):
    """The one place that knows which program serves the listener."""
    if not os.access(DRIVER, os.X_OK):
        pytest.skip(f"{DRIVER} not built")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    port = activation_socket.getsockname()[1] if activation_socket else free_port(host, family)
    listen = f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
    config = write_config(tmp_path, listen, allow, tls)
    stderr_path = tmp_path / "server.stderr"
    env = dict(os.environ)
    env.update(env_extra or {})
    argv = [DRIVER, str(config)]
    preexec = None
    if activation_socket is not None:
        fd = activation_socket.fileno()
        env["LISTEN_FDS"] = "1"
        # LISTEN_PID must be the pid that execs the server: the shell's own.
        argv = ["/bin/sh", "-c", 'LISTEN_PID=$$; export LISTEN_PID; exec "$0" "$@"'] + argv

        def preexec():
            os.dup2(fd, 3)

    with open(stderr_path, "w") as err:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, text=True, env=env,
                                preexec_fn=preexec, close_fds=activation_socket is None)
    server = Server(proc, host, port, tls[2] if tls else None, stderr_path, config)
    if not server.wait_line("ready", timeout=10):
        server.stop()
        pytest.fail(f"server did not start: {server.stderr()}")
    return server


@pytest.fixture
def notify_server(tmp_path):
    started = []

    def start(**kw):
        s = _start_server(tmp_path, **kw)
        started.append(s)
        return s

    yield start
    codes = [s.stop() for s in started]
    # A clean stop on SIGTERM; under SANITIZE=1 a leak or error fails here.
    assert codes == [0] * len(codes), [s.stderr()[-2000:] for s in started]


@pytest.fixture
def server(notify_server):
    return notify_server()


def body_json(data):
    return json.loads(data.decode())


# ---- the table of contract section 6 ------------------------------------

def test_healthz_needs_no_token(server):
    status, headers, data = server.request("GET", "/healthz", token=None)
    assert status == 200
    assert headers["Content-Type"] == "application/json"
    assert body_json(data) == {"status": "ok"}


def test_notify_accepted_and_reported(server):
    status, headers, data = server.request("POST", "/v1/notify", {"reason": "primary promoted", "epoch": 8})
    assert status == 202
    assert headers["Content-Type"] == "application/json"
    assert body_json(data) == {"status": "accepted"}
    line = server.wait_line("notify ")
    assert line == 'notify 127.0.0.1 reason="primary promoted" epoch=8'


def test_notify_empty_body(server):
    status, _, data = server.request("POST", "/v1/notify")
    assert status == 202 and body_json(data) == {"status": "accepted"}
    assert server.wait_line("notify 127.0.0.1 empty body")


def test_endpoints_patch(server):
    path = "/onboarding/api/agent/rabbitmq/endpoints"
    status, _, data = server.request("PATCH", path, {"endpoint": "p2.example", "port": 5671})
    assert status == 202 and body_json(data) == {"status": "accepted"}
    assert server.wait_line("notify 127.0.0.1 endpoint=p2.example port=5671")
    for bad, word in [({"port": 5671}, "endpoint"), ({"endpoint": "p2.example"}, "port"),
                      ({"endpoint": "p2.example", "port": 0}, "port"),
                      ({"endpoint": "p2.example", "port": 65536}, "port"),
                      ({"endpoint": "p2.example", "port": "5671"}, "port"),
                      ({"endpoint": "", "port": 5671}, "endpoint"),
                      ({"endpoint": "a" * 254, "port": 5671}, "endpoint"),
                      ({"endpoint": 5, "port": 5671}, "endpoint")]:
        status, _, data = server.request("PATCH", path, bad)
        assert status == 400, bad
        assert word in body_json(data)["error"]


def test_status_with_token(server):
    status, headers, data = server.request("GET", "/v1/status")
    assert status == 200
    assert headers["Content-Type"] == "application/json"
    assert body_json(data)["daemon_version"]


@pytest.mark.parametrize("method,path", [("POST", "/v1/notify"), ("GET", "/v1/status"),
                                         ("PATCH", "/onboarding/api/agent/rabbitmq/endpoints")])
@pytest.mark.parametrize("token", [None, "wrong", TOKEN + "x", TOKEN[:-1], ""])
def test_missing_or_wrong_token(server, method, path, token):
    status, headers, data = server.request(method, path, {"reason": "x"}, token=token)
    assert status == 401
    assert headers["Content-Type"] == "application/json"
    assert "error" in body_json(data)
    assert not server.wait_line("notify ", timeout=0.05)


def test_rejections_logged_with_peer_and_limited(server):
    # Past the failure bucket's burst the answer is 429 (see
    # test_auth_failures_rate_limited); both are logged, rate-limited.
    statuses = [server.request("POST", "/v1/notify", token="guess-zzz")[0] for _ in range(60)]
    assert set(statuses) <= {401, 429} and statuses.count(401) >= 10, statuses
    time.sleep(0.2)
    err = server.stderr()
    rejected = [l for l in err.splitlines() if "3df29a54da1c49828e32990bcbad1b87" in l]
    assert 1 <= len(rejected) <= 12, rejected
    assert "DSM_PEER=127.0.0.1" in rejected[0]
    # Neither the real token nor the guess is logged.
    assert TOKEN not in err and "guess-zzz" not in err and "Bearer" not in err


def test_auth_failures_rate_limited(server):
    """Failed authentications have a bucket of their own (5/s, burst 10):
    once it is empty, a request that needs the token is answered 429 with
    Retry-After before the token is looked at, so guessing is slow. The
    bucket is checked before the comparison, so right after a
    flood of guesses the right token gets 429 too (anything else would
    tell a guesser it guessed right); it succeeds once Retry-After has
    passed, and the guesses never spend the notify bucket. (The bucket is
    the peer's own: test_one_peers_guesses_lock_out_no_other_peer.)"""
    answers = []
    c = server.connection()
    try:
        for _ in range(50):
            c.request("POST", "/v1/notify", body="{}", headers={"Authorization": "Bearer wrong-guess"})
            r = c.getresponse()
            body = r.read()
            answers.append((r.status, r.getheader("Retry-After"), body))
    finally:
        c.close()
    statuses = [a[0] for a in answers]
    assert set(statuses) == {401, 429}, statuses
    assert 10 <= statuses.count(401) <= 14, statuses
    assert statuses[:10] == [401] * 10
    limited = [a for a in answers if a[0] == 429]
    assert all(ra and ra.isdigit() and int(ra) >= 1 for _, ra, _ in limited), limited
    assert all("error" in body_json(b) for _, _, b in limited)
    assert not server.wait_line("notify ", timeout=0.05)
    # Over the limit the token is not compared: the right one waits too...
    status, headers, _ = server.request("POST", "/v1/notify", {"reason": "right after"})
    assert status == 429 and int(headers["Retry-After"]) >= 1
    # ... and /healthz needs no token, so it is not limited.
    assert server.request("GET", "/healthz", token=None)[0] == 200
    time.sleep(int(headers["Retry-After"]) + 0.1)
    # The right token now succeeds, on the notify bucket's own full burst
    # (the 50 guesses spent none of it), and spends nothing of the failure
    # bucket: a wrong token afterwards is a plain 401 again.
    statuses = []
    c = server.connection()
    try:
        for _ in range(30):
            c.request("POST", "/v1/notify", body="{}", headers={"Authorization": f"Bearer {TOKEN}"})
            r = c.getresponse()
            r.read()
            statuses.append(r.status)
    finally:
        c.close()
    assert statuses == [202] * 30, statuses
    assert server.request("GET", "/v1/status", token="wrong-again")[0] == 401


def test_one_peers_guesses_lock_out_no_other_peer(server):
    """Contract section 6: a peer that keeps failing to authenticate is
    slowed down by its own failed-login budget. 12 wrong tokens from
    127.0.0.2 exhaust that peer's budget (burst 10): the right token from
    127.0.0.2 waits (429), the right token from 127.0.0.1 (where
    dsm-agent-syncctl comes from) is served at once."""
    statuses = [server.request("POST", "/v1/notify", token="wrong-guess", source="127.0.0.2")[0]
                for _ in range(12)]
    assert statuses[:10] == [401] * 10 and 429 in statuses, statuses
    status, headers, _ = server.request("POST", "/v1/notify", {"reason": "guesser"}, source="127.0.0.2")
    assert status == 429 and int(headers["Retry-After"]) >= 1
    for path, want in (("/v1/notify", 202), ("/v1/status", 200)):
        status, _, data = server.request("POST" if path == "/v1/notify" else "GET", path,
                                         {"reason": "other peer"} if path == "/v1/notify" else None,
                                         source="127.0.0.1")
        assert status == want, (path, status, data)
    # The other peer's own budget is untouched: its first wrong token is a 401.
    assert server.request("POST", "/v1/notify", token="typo", source="127.0.0.3")[0] == 401


def test_unknown_path_and_wrong_method(server):
    status, _, data = server.request("GET", "/nope")
    assert status == 404 and "error" in body_json(data)
    for method, path, allow in [("GET", "/v1/notify", "POST"), ("PUT", "/v1/notify", "POST"),
                                ("POST", "/healthz", "GET, HEAD"), ("DELETE", "/v1/status", "GET, HEAD"),
                                ("GET", "/onboarding/api/agent/rabbitmq/endpoints", "PATCH")]:
        status, headers, data = server.request(method, path)
        assert status == 405, (method, path)
        assert headers["Allow"] == allow
        assert headers["Content-Type"] == "application/json"


def test_body_too_large_content_length(server):
    status, headers, data = server.request("POST", "/v1/notify", "x" * 4097)
    assert status == 413 and "4096" in body_json(data)["error"]
    assert headers.get("Connection", "").lower() == "close"
    body = json.dumps({"reason": "r" * (4096 - 14)})
    assert len(body) == 4096
    assert server.request("POST", "/v1/notify", body)[0] == 202


def raw_request(server, raw, source=None, timeout=5.0):
    with socket.create_connection((server.host, server.port), timeout=timeout,
                                  source_address=(source, 0) if source else None) as s:
        s.sendall(raw)
        data = b""
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            data += chunk
            if b"\r\n\r\n" in data:
                head, _, rest = data.partition(b"\r\n\r\n")
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:") and len(rest) >= int(line.split(b":")[1]):
                        return data
        return data


def chunked_request(n_chunks, size, end=True):
    chunks = b"".join(b"%x\r\n%s\r\n" % (size, b"a" * size) for _ in range(n_chunks))
    return (b"POST /v1/notify HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN.encode() +
            b"\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks + (b"0\r\n\r\n" if end else b""))


def assert_413_close(data):
    assert data.startswith(b"HTTP/1.1 413"), data[:200]
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"\r\nconnection: close" in head.lower(), head
    assert b"4096" in body


def test_body_too_large_chunked(server):
    assert_413_close(raw_request(server, chunked_request(6, 1000)))
    # However large the chunked body, it is drained (never stored) and
    # answered 413 once it ends, not closed unanswered: 1 MiB here.
    assert_413_close(raw_request(server, chunked_request(256, 4096), timeout=10))
    assert server.request("GET", "/healthz", token=None)[0] == 200


def test_body_too_large_chunked_never_ending(server):
    # A chunked body that never ends is never stored, and the connection is
    # closed (MHD's idle timeout, 5 s) without an answer.
    with socket.create_connection((server.host, server.port), timeout=10) as s:
        s.sendall(chunked_request(40, 4096, end=False))
        t0 = time.monotonic()
        data = b""
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            data += chunk
        assert data == b"", data[:200]
        assert time.monotonic() - t0 < 8
    assert server.request("GET", "/healthz", token=None)[0] == 200


@pytest.mark.parametrize("body,word", [
    ("not json", "JSON"), ("[1, 2]", "object"), ('"s"', "object"), ("42", "object"),
    ('{"reason": 5}', "reason"), ('{"epoch": "8"}', "epoch"), ('{"epoch": -1}', "epoch"),
    ('{"epoch": 1.5}', "epoch"), ('{"reason": "a", "reason": "b"}', "JSON"),
    ('{"primary_id": "bad id!"}', "primary_id"), ("{", "JSON"), ('{"a":1} x', "JSON")])
def test_bad_bodies(server, body, word):
    status, headers, data = server.request("POST", "/v1/notify", body)
    assert status == 400
    assert word in body_json(data)["error"]


def test_rate_limit_429_with_retry_after(server):
    answers = []
    c = server.connection()
    try:
        for _ in range(120):
            c.request("POST", "/v1/notify", body="{}", headers={"Authorization": f"Bearer {TOKEN}"})
            r = c.getresponse()
            r.read()
            answers.append((r.status, r.getheader("Retry-After")))
    finally:
        c.close()
    statuses = {s for s, _ in answers}
    assert statuses <= {202, 429}
    assert 429 in statuses and 202 in statuses
    assert all(ra and int(ra) >= 1 for s, ra in answers if s == 429)
    # healthz is not limited.
    assert server.request("GET", "/healthz", token=None)[0] == 200
    time.sleep(1.1)
    assert server.request("POST", "/v1/notify", {})[0] == 202


# ---- transport ----------------------------------------------------------

def make_test_ca(tmp_path):
    if not shutil.which("openssl"):
        pytest.skip("openssl CLI not installed")
    d = tmp_path / "pki"
    d.mkdir()
    run = lambda *a: subprocess.run(["openssl", *a], cwd=d, check=True, capture_output=True, timeout=60)
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
        "-days", "2", "-subj", "/CN=dsm test CA")
    (d / "ext.cnf").write_text("subjectAltName = IP:127.0.0.1, DNS:localhost\n")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
        "-subj", "/CN=localhost")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.pem", "-days", "2", "-extfile", "ext.cnf")
    return str(d / "server.pem"), str(d / "server.key"), str(d / "ca.pem")


def test_https(notify_server, tmp_path):
    tls = make_test_ca(tmp_path)
    s = notify_server(tls=tls)
    assert s.request("GET", "/healthz", token=None)[0] == 200
    status, _, data = s.request("POST", "/v1/notify", {"reason": "over tls"})
    assert status == 202
    assert s.wait_line('notify 127.0.0.1 reason="over tls"')
    assert s.request("GET", "/v1/status")[0] == 200
    # Plain HTTP to the HTTPS port gets no HTTP answer.
    c = http.client.HTTPConnection(s.host, s.port, timeout=5)
    with pytest.raises((http.client.HTTPException, ConnectionError, OSError)):
        c.request("GET", "/healthz")
        c.getresponse()
    c.close()


def test_socket_activation(notify_server):
    ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind(("127.0.0.1", 0))
        ls.listen(16)
        s = notify_server(activation_socket=ls)
        assert "socket passed by systemd" in s.stderr()
        assert s.request("GET", "/healthz", token=None)[0] == 200
        assert s.request("POST", "/v1/notify", {})[0] == 202
    finally:
        ls.close()


def test_ipv6_loopback(notify_server):
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        free_port("::1", socket.AF_INET6)
    except OSError:
        pytest.skip("no IPv6 loopback")
    s = notify_server(host="::1", allow="::1")
    assert s.request("GET", "/healthz", token=None)[0] == 200
    assert s.request("POST", "/v1/notify", {})[0] == 202
    assert s.wait_line("notify ::1 ")


def test_peer_outside_allow_refused_at_accept(notify_server):
    s = notify_server(allow="127.0.0.2/32")
    data = raw_request(s, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", source="127.0.0.1")
    assert data == b""
    assert s.request("GET", "/healthz", token=None, source="127.0.0.2")[0] == 200
    assert "peer not allowed" in s.stderr()


def is_closed(sock):
    r, _, _ = select.select([sock], [], [], 0)
    if not r:
        return False
    try:
        return sock.recv(1, socket.MSG_PEEK) == b""
    except (ConnectionResetError, BlockingIOError):
        return True


def test_per_peer_connection_limit(server):
    socks = []
    try:
        for _ in range(12):
            socks.append(socket.create_connection((server.host, server.port), timeout=2,
                                                  source_address=("127.0.0.5", 0)))
        time.sleep(0.5)
        closed = sum(is_closed(x) for x in socks)
        assert closed == 4
        # Another peer is not affected.
        assert server.request("GET", "/healthz", token=None, source="127.0.0.6")[0] == 200
    finally:
        for x in socks:
            x.close()


def open_idle(server, source, n):
    return [socket.create_connection((server.host, server.port), timeout=2, source_address=(source, 0))
            for _ in range(n)]


def test_idle_connections_do_not_lock_out_a_peer(server):
    socks = open_idle(server, "127.0.0.30", 8)
    try:
        time.sleep(0.3)
        # The 9th connection from the same peer evicts the oldest idle one
        # (MHD's per-address limit is only a backstop above ours).
        ninth = server.connection(source="127.0.0.30")
        ninth.request("POST", "/v1/notify", body='{"reason": "ninth"}',
                      headers={"Authorization": f"Bearer {TOKEN}"})
        r = ninth.getresponse()
        assert r.status == 202 and body_json(r.read()) == {"status": "accepted"}
        assert server.wait_line('notify 127.0.0.30 reason="ninth"')
        time.sleep(0.2)
        assert [is_closed(x) for x in socks] == [True] + [False] * 7
        # The ninth stays open (keep-alive); the 10th evicts the next oldest
        # idle connection: socks[1], not the ninth, idle only since its answer.
        assert server.request("GET", "/healthz", token=None, source="127.0.0.30")[0] == 200
        time.sleep(0.2)
        assert [is_closed(x) for x in socks] == [True, True] + [False] * 6
        ninth.request("GET", "/healthz")
        assert ninth.getresponse().status == 200
        ninth.close()
    finally:
        for x in socks:
            x.close()


def test_idle_tls_connections_do_not_lock_out_a_peer(notify_server, tmp_path):
    # Over TLS, handshake bytes hide whether a request has begun: a
    # connection counts as idle once quiet for 1 s.
    s = notify_server(tls=make_test_ca(tmp_path))
    socks = open_idle(s, "127.0.0.33", 8)
    try:
        time.sleep(1.2)
        assert s.request("GET", "/healthz", token=None, source="127.0.0.33")[0] == 200
        time.sleep(0.2)
        assert [is_closed(x) for x in socks] == [True] + [False] * 7
    finally:
        for x in socks:
            x.close()


def test_per_peer_limit_refuses_when_all_mid_request(server):
    socks = open_idle(server, "127.0.0.31", 8)
    try:
        # All eight are inside a request (headers still arriving slowly).
        for x in socks:
            x.sendall(b"POST /v1/notify HTTP/1.1\r\nHo")
        time.sleep(0.3)
        try:
            data = raw_request(server, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", source="127.0.0.31")
        except (BrokenPipeError, ConnectionResetError):
            data = b""
        assert data == b""
        time.sleep(0.2)
        assert not any(is_closed(x) for x in socks)
        err = server.stderr()
        refused = [l for l in err.splitlines() if "per-peer connection limit reached" in l]
        assert refused and "DSM_PEER=127.0.0.31" in refused[0], err[-2000:]
        # Another peer is not affected.
        assert server.request("GET", "/healthz", token=None, source="127.0.0.32")[0] == 200
        # One request completes; its connection stays open, between
        # requests (keep-alive), and is the one a new connection evicts.
        socks[3].sendall(b"st: x\r\nAuthorization: Bearer " + TOKEN.encode() + b"\r\nContent-Length: 2\r\n\r\n{}")
        socks[3].settimeout(5)
        answer = socks[3].recv(65536)
        assert answer.startswith(b"HTTP/1.1 202"), answer[:200]
        time.sleep(0.1)
        assert server.request("GET", "/healthz", token=None, source="127.0.0.31")[0] == 200
        time.sleep(0.2)
        assert [is_closed(x) for x in socks] == [False] * 3 + [True] + [False] * 4
    finally:
        for x in socks:
            x.close()


def test_connection_without_fd_is_never_counted_as_evicted(notify_server):
    # The listener is told no fd for any connection: it cannot evict one,
    # so at the total limit (64) new connections are refused, not
    # accepted on the pretence that an old one was closed.
    s = notify_server(env_extra={"NOTIFY_DRIVE_HIDE_FD": "1"})
    socks = []
    try:
        for a in range(40, 48):
            socks += open_idle(s, f"127.0.0.{a}", 8)
        time.sleep(0.3)
        extra = open_idle(s, "127.0.0.48", 8)
        socks += extra
        time.sleep(0.5)
        closed = [is_closed(x) for x in socks]
        assert closed == [False] * 64 + [True] * 8, closed
        assert "connection limit reached" in s.stderr()
    finally:
        for x in socks:
            x.close()
    time.sleep(0.3)
    assert s.request("GET", "/healthz", token=None)[0] == 200


def test_slow_clients_dropped(server):
    slow = []
    try:
        for i in range(4):
            x = socket.create_connection((server.host, server.port), timeout=2,
                                         source_address=(f"127.0.0.{20 + i}", 0))
            slow.append(x)
        request = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 100
        start = time.monotonic()
        dropped_at = [None] * len(slow)
        i = 0
        while time.monotonic() - start < 16 and None in dropped_at:
            for n, x in enumerate(slow):
                if dropped_at[n] is not None:
                    continue
                try:
                    x.send(request[i:i + 1] if i < len(request) else b"a")
                except OSError:
                    dropped_at[n] = time.monotonic() - start
                    continue
                if is_closed(x):
                    dropped_at[n] = time.monotonic() - start
            # Others are unaffected while the slow ones trickle.
            t0 = time.monotonic()
            assert server.request("GET", "/healthz", token=None, timeout=2)[0] == 200
            assert time.monotonic() - t0 < 0.5
            i += 1
            time.sleep(1.0)
        assert None not in dropped_at, dropped_at
        assert max(dropped_at) < 13
    finally:
        for x in slow:
            x.close()


def test_idle_connection_flood(server):
    socks = []
    max_fds = 0
    try:
        for a in range(2, 127):
            for _ in range(8):
                x = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                x.setblocking(False)
                x.bind((f"127.0.0.{a}", 0))
                try:
                    x.connect((server.host, server.port))
                except BlockingIOError:
                    pass
                socks.append(x)
            if a % 10 == 0:
                max_fds = max(max_fds, server.n_fds())
        assert len(socks) == 1000
        for _ in range(10):
            time.sleep(0.1)
            max_fds = max(max_fds, server.n_fds())
        # A peer that is not flooding still gets its answer, promptly.
        t0 = time.monotonic()
        status, _, _ = server.request("POST", "/v1/notify", {"reason": "during flood"}, timeout=5)
        assert status == 202
        assert time.monotonic() - t0 < 2.0
        max_fds = max(max_fds, server.n_fds())
        assert max_fds <= MAX_FDS, max_fds
    finally:
        for x in socks:
            x.close()
    assert server.request("GET", "/healthz", token=None)[0] == 200


FLOOD = r"""
import http.client, sys, threading, json
host, port, token, n_clients, total = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
counts, lock = {}, threading.Lock()
def client(i):
    for _ in range(total // n_clients):
        try:
            c = http.client.HTTPConnection(host, port, timeout=5, source_address=(f"127.0.1.{i + 1}", 0))
            c.request("POST", "/v1/notify", body="{}", headers={"Authorization": "Bearer " + token})
            r = c.getresponse(); r.read(); k = str(r.status); c.close()
        except Exception as e:
            k = type(e).__name__
        with lock:
            counts[k] = counts.get(k, 0) + 1
ts = [threading.Thread(target=client, args=(i,)) for i in range(n_clients)]
[t.start() for t in ts]; [t.join() for t in ts]
print(json.dumps(counts))
"""


def test_notify_flood_stays_responsive(server):
    flood = subprocess.Popen(["/usr/bin/python3", "-c", FLOOD, server.host, str(server.port), TOKEN, "50", "2000"],
                             stdout=subprocess.PIPE, text=True)
    latencies = []
    try:
        while flood.poll() is None and len(latencies) < 2000:
            t0 = time.monotonic()
            assert server.request("GET", "/healthz", token=None, timeout=2)[0] == 200
            latencies.append(time.monotonic() - t0)
            time.sleep(0.02)
        out, _ = flood.communicate(timeout=120)
    finally:
        if flood.poll() is None:
            flood.kill()
            flood.wait(timeout=5)
    counts = json.loads(out)
    assert sum(counts.values()) == 2000
    assert set(counts) <= {"202", "429"}, counts
    assert counts.get("202", 0) >= 20
    latencies.sort()
    print(f"healthz during flood: n={len(latencies)} median={latencies[len(latencies) // 2] * 1000:.1f}ms "
          f"max={latencies[-1] * 1000:.1f}ms; answers {counts}")
    # Not a speed goal (the bench's notify section measures that): a bound
    # no loaded machine misses, which a loop that blocks on the flood (a
    # slow client, a full socket) would still exceed.
    assert latencies[-1] < 1.0, latencies[-5:]


# ---- dsm-agent-syncctl ----------------------------------------------------

def run_ctl(*args, timeout=20):
    if not os.access(CTL, os.X_OK):
        pytest.skip(f"{CTL} not built")
    return subprocess.run([CTL, *args], capture_output=True, text=True, timeout=timeout)


def test_ctl_status_and_notify(server):
    r = run_ctl("-c", str(server.config), "status", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["daemon_version"]
    r = run_ctl("-c", str(server.config), "status")
    assert r.returncode == 0, r.stderr
    assert "Primary:" in r.stdout and "Update:" in r.stdout
    r = run_ctl("-c", str(server.config), "notify")
    assert r.returncode == 0, r.stderr
    assert server.wait_line('notify 127.0.0.1 reason="dsm-agent-syncctl"')


def test_ctl_https(notify_server, tmp_path):
    s = notify_server(tls=make_test_ca(tmp_path))
    r = run_ctl("-c", str(s.config), "status", "--json")
    assert r.returncode == 0, r.stderr


def test_ctl_errors(tmp_path):
    config = write_config(tmp_path, f"127.0.0.1:{free_port()}")
    r = run_ctl("-c", str(config), "status")
    assert r.returncode == 1
    assert "is not answering on 127.0.0.1:" in r.stderr and "Connection refused" in r.stderr
    assert run_ctl("-c", str(config), "bogus").returncode == 2
    assert run_ctl("-c", str(config)).returncode == 2
    bad = tmp_path / "bad.ini"
    bad.write_text("[nope]\nx = 1\n")
    r = run_ctl("-c", str(bad), "status")
    assert r.returncode == 78 and "bad.ini:" in r.stderr
    assert run_ctl("--version").stdout.startswith("dsm-agent-syncctl ")
    assert run_ctl("--help").returncode == 0


def test_ctl_wrong_token(server, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    config = write_config(other, f"127.0.0.1:{server.port}")
    (other / "notify.token").write_text("not-the-token\n")
    r = run_ctl("-c", str(config), "status")
    assert r.returncode == 1 and "401" in r.stderr
