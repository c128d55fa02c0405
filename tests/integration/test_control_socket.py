"""The local control socket ([daemon] control_socket, issue 13): the real
daemon serves status and notify as HTTP on an AF_UNIX socket that root and
the daemon's group may use with no token, while the network listener keeps
the bearer token. dsm-agent-syncctl asks through the socket and falls back
to the network listener. The socket file is the daemon's: mode 0660, a
stale one replaced at start, a live one or a non-socket left alone, moved
by SIGHUP, removed at stop.

Each test keeps its socket in a short directory of its own under /tmp
(sun_path holds 107 bytes; pytest's tmp_path may be longer)."""

import http.client
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time

import pytest

from harness import daemon as daemon_mod
from harness import util

MID_NOTIFY_ACCEPTED = "37e50e3188e74df3b5cb1cf22f7f44aa"
MID_CONFIG_REJECTED = "7973658656e64425b0beaf0a576b2dce"
QUIET = {"provider": {"poll_interval": "30s", "fast_poll_interval": "30s", "request_timeout": "2s"}}
NOBODY = 65534
# An interpreter another user may run (not one under /root).
PYTHON = shutil.which("python3", path="/usr/bin:/bin") or sys.executable

# A client for the socket, runnable as another user: prints the HTTP status
# and body, or "ERR <errno name>" when the connection is refused.
CLIENT = r"""
import errno, http.client, socket, sys
class C(http.client.HTTPConnection):
    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(5)
        self.sock.connect(sys.argv[1])
try:
    c = C("localhost")
    c.request(sys.argv[2], sys.argv[3], body=sys.argv[4] if len(sys.argv) > 4 else None)
    r = c.getresponse()
    print(r.status, r.read().decode())
except OSError as e:
    print("ERR", errno.errorcode.get(e.errno, e.errno))
"""


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path, timeout=5.0):
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.path)


def ask_status_raw(path, request):
    """Sends request bytes on the control socket and returns the status code
    of the answer. A server that answers early (413 on the Content-Length)
    and closes may make the rest of the send fail: the answer still counts."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sk:
        sk.settimeout(5.0)
        sk.connect(path)
        try:
            sk.sendall(request)
        except (BrokenPipeError, ConnectionResetError):
            pass
        head = b""
        while b"\r\n" not in head:
            chunk = sk.recv(4096)
            if not chunk:
                break
            head += chunk
    return int(head.split(b" ", 2)[1])


def ask(path, method, url, body=None, headers=None):
    """One request on the control socket: (status, headers, JSON or bytes)."""
    c = UnixHTTPConnection(path)
    try:
        h = dict(headers or {})
        if isinstance(body, (dict, list)):
            body = json.dumps(body)
            h["Content-Type"] = "application/json"
        c.request(method, url, body=body, headers=h)
        r = c.getresponse()
        raw = r.read()
        try:
            return r.status, dict(r.getheaders()), json.loads(raw)
        except ValueError:
            return r.status, dict(r.getheaders()), raw
    finally:
        c.close()


@pytest.fixture
def sockdir():
    d = tempfile.mkdtemp(prefix="dsmc-", dir="/tmp")
    os.chmod(d, 0o755)  # others may enter: the socket's own mode must refuse them
    yield d
    shutil.rmtree(d, ignore_errors=True)


def control_overrides(path, token=True, listen=True, extra=None):
    o = {"provider": dict(QUIET["provider"]), "daemon": {"control_socket": path}}
    if not token:
        o["notify"] = {"token_file": None}
    if not listen:
        o.setdefault("notify", {})["listen"] = "off"
    for k, v in (extra or {}).items():
        o.setdefault(k, {}).update(v)
    return o


def start(daemon_factory, sim, path, notify_socket=None, **kw):
    """A daemon with the control socket at path; ready once it answers there."""
    d = daemon_factory(sim, overrides=control_overrides(path, **kw), notify_socket=notify_socket,
                       start=False)
    d.start(wait=False)
    wait_listening(d, path)
    return d


def wait_listening(d, path, timeout=15):
    def up():
        if not d.alive():
            raise AssertionError("daemon exited %s:\n%s" % (d.returncode, d.log_tail()))
        try:
            return ask(path, "GET", "/healthz")[0] == 200
        except OSError:
            return False
    util.wait_until(up, timeout, what="control socket %s" % path)


def strip_line(text, key):
    """The 1-based line of `key = ...` in text."""
    for i, ln in enumerate(text.splitlines(), 1):
        if re.match(r"\s*%s\s*=" % re.escape(key), ln):
            return i
    raise AssertionError("no %s in config" % key)


def as_user(uid, gid, *argv, timeout=15):
    if os.geteuid() != 0:
        pytest.skip("needs root to run a client as another user")
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv not installed")
    return subprocess.run(["setpriv", "--reuid=%d" % uid, "--regid=%d" % gid, "--clear-groups", *argv],
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def stale_socket(path):
    """A socket file nobody listens on, as a crashed daemon leaves it."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.close()
    assert stat.S_ISSOCK(os.lstat(path).st_mode)


# ---- status and notify without a token ---------------------------------------

def test_status_and_notify_with_no_token_configured(daemon_factory, sim_nobroker, sockdir):
    path = os.path.join(sockdir, "control.sock")
    d = start(daemon_factory, sim_nobroker, path, token=False)
    assert "token_file" not in d.config.get("notify", {})

    status, headers, doc = ask(path, "GET", "/v1/status")
    assert status == 200, doc
    assert doc["daemon_version"] and "counters" in doc
    assert headers.get("Content-Type") == "application/json"

    mark = d.log_mark()
    notifies = doc["counters"]["notifies"]
    status, _, doc = ask(path, "POST", "/v1/notify", body={"reason": "support", "epoch": 3})
    assert (status, doc) == (202, {"status": "accepted"})
    # The accepted notify names the local peer as the kernel gave it.
    m = d.wait_for_log(MID_NOTIFY_ACCEPTED + r".*local uid %d pid \d+" % os.getuid(), start=mark)
    assert "support" in m.string and "epoch=3" in m.string, m.string
    status, _, doc = ask(path, "PATCH", "/onboarding/api/agent/rabbitmq/endpoints",
                         body={"endpoint": "p2.example", "port": 5671})
    assert status == 202, doc
    util.wait_until(lambda: ask(path, "GET", "/v1/status")[2]["counters"]["notifies"] >= notifies + 2, 10)

    # The network listener keeps the bearer token: with none configured it
    # refuses everything but /healthz, exactly as before.
    assert d.http("GET", "/v1/status", token="")[0] == 401
    assert d.http("POST", "/v1/notify", token="anything")[0] == 401
    assert d.http("GET", "/healthz", token="")[0] == 200


def test_same_checks_but_the_token(daemon_factory, sim_nobroker, sockdir):
    path = os.path.join(sockdir, "control.sock")
    d = start(daemon_factory, sim_nobroker, path, token=False, listen=False)
    assert ask(path, "POST", "/v1/notify", body="[1]")[0] == 400
    big = b"x" * 5000
    assert ask_status_raw(path, b"POST /v1/notify HTTP/1.1\r\nHost: localhost\r\n"
                                b"Content-Length: %d\r\n\r\n" % len(big) + big) == 413
    assert ask(path, "PATCH", "/onboarding/api/agent/rabbitmq/endpoints", body={"port": 1})[0] == 400
    status, headers, _ = ask(path, "DELETE", "/v1/notify")
    assert status == 405 and headers.get("Allow") == "POST"
    assert ask(path, "GET", "/nope")[0] == 404
    # A wrong token is not even looked at: the socket's permissions decide.
    assert ask(path, "GET", "/v1/status", headers={"Authorization": "Bearer wrong"})[0] == 200
    assert d.alive()


def test_request_rate_limit_is_per_listener(daemon_factory, sim_nobroker, sockdir):
    """A flood on the socket meets the same request bucket as on the
    network, and the network listener's bucket is untouched by it."""
    path = os.path.join(sockdir, "control.sock")
    d = start(daemon_factory, sim_nobroker, path)
    codes = [ask(path, "POST", "/v1/notify")[0] for _ in range(60)]
    assert 429 in codes and codes[0] == 202, codes
    assert d.notify()[0] == 202


# ---- the socket file ------------------------------------------------------------

def test_mode_owner_and_removal_at_stop(daemon_factory, sim_nobroker, sockdir):
    path = os.path.join(sockdir, "control.sock")
    d = start(daemon_factory, sim_nobroker, path)
    st = os.lstat(path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o660, oct(st.st_mode)
    assert (st.st_uid, st.st_gid) == (os.geteuid(), os.getegid())
    d.wait_for_log(r"control: listening on %s \(mode 0660" % re.escape(path))
    assert d.stop() == 0
    assert not os.path.lexists(path)


def test_other_user_refused_by_the_file_mode(daemon_factory, sim_nobroker, sockdir):
    path = os.path.join(sockdir, "control.sock")
    start(daemon_factory, sim_nobroker, path, token=False)
    client = [PYTHON, "-c", CLIENT, path]
    # nobody, in no group of the socket: the kernel refuses the connect.
    r = as_user(NOBODY, NOBODY, *client, "GET", "/v1/status")
    assert r.stdout.strip() == "ERR EACCES", (r.stdout, r.stderr)
    r = as_user(NOBODY, NOBODY, *client, "POST", "/v1/notify")
    assert r.stdout.strip() == "ERR EACCES", (r.stdout, r.stderr)
    # The same user in the socket's group gets in.
    r = as_user(NOBODY, os.lstat(path).st_gid, *client, "GET", "/v1/status")
    assert r.stdout.startswith("200 "), (r.stdout, r.stderr)


def test_ready_only_when_the_socket_listens(daemon_factory, sim_nobroker, sockdir, notify_socket):
    path = os.path.join(sockdir, "control.sock")
    d = daemon_factory(sim_nobroker, overrides=control_overrides(path, listen=False),
                       notify_socket=notify_socket, start=False)
    d.start(wait=False)
    notify_socket.wait_ready(15)
    # No wait between READY=1 and the first request.
    assert ask(path, "GET", "/v1/status")[0] == 200


def test_stale_socket_replaced_at_start(daemon_factory, sim_nobroker, sockdir):
    path = os.path.join(sockdir, "control.sock")
    stale_socket(path)
    d = start(daemon_factory, sim_nobroker, path)
    d.wait_for_log(r"control: removed the stale socket %s" % re.escape(path))
    assert ask(path, "GET", "/v1/status")[0] == 200
    # A crash leaves the file behind; the next start replaces it.
    d.kill()
    assert stat.S_ISSOCK(os.lstat(path).st_mode)
    d.start(wait=False)
    wait_listening(d, path)
    assert ask(path, "GET", "/v1/status")[0] == 200


def test_live_socket_and_other_files_are_left_alone(daemon_factory, sim_nobroker, sockdir):
    path = os.path.join(sockdir, "control.sock")
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    other.bind(path)
    other.listen(4)
    try:
        d = daemon_factory(sim_nobroker, overrides=control_overrides(path), start=False)
        d.start(wait=False)
        assert d.wait_exit(15) == 1
        assert re.search(r"control: %s is in use" % re.escape(path), d.log_text())
        ino = os.lstat(path).st_ino
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.connect(path)  # still the other listener's
        c.close()
    finally:
        other.close()
    assert os.lstat(path).st_ino == ino
    os.unlink(path)

    with open(path, "w") as f:
        f.write("not a socket\n")
    d = daemon_factory(sim_nobroker, overrides=control_overrides(path), start=False)
    d.start(wait=False)
    assert d.wait_exit(15) == 1
    assert "exists and is not a socket" in d.log_text()
    with open(path) as f:
        assert f.read() == "not a socket\n"


# ---- SIGHUP -----------------------------------------------------------------------

def test_sighup_moves_the_socket(daemon_factory, sim_nobroker, sockdir):
    old = os.path.join(sockdir, "control.sock")
    new = os.path.join(sockdir, "moved.sock")
    d = start(daemon_factory, sim_nobroker, old)

    mark = d.log_mark()
    d.reconfigure({"daemon": {"control_socket": new}})
    d.wait_for_log(r"Configuration reloaded", start=mark)
    assert ask(new, "GET", "/v1/status")[0] == 200
    assert not os.path.lexists(old)

    # A path that cannot be opened is rejected whole: the socket stays.
    mark = d.log_mark()
    d.reconfigure({"daemon": {"control_socket": os.path.join(sockdir, "missing-dir", "c.sock")}})
    line = d.wait_for_log(MID_CONFIG_REJECTED, start=mark).string
    assert "control_socket" in line and "missing-dir" in line, line
    assert ask(new, "GET", "/v1/status")[0] == 200

    # Removed under the daemon's feet: the next SIGHUP makes it anew.
    d.reconfigure({"daemon": {"control_socket": new}})
    d.wait_for_log(r"Configuration reloaded", start=mark)
    os.unlink(new)
    mark = d.log_mark()
    d.signal(signal.SIGHUP)
    d.wait_for_log(r"Configuration reloaded", start=mark)
    assert ask(new, "GET", "/v1/status")[0] == 200

    # off removes it; on again brings it back.
    mark = d.log_mark()
    d.reconfigure({"daemon": {"control_socket": "off"}})
    d.wait_for_log(r"Configuration reloaded", start=mark)
    assert not os.path.lexists(new)
    mark = d.log_mark()
    d.reconfigure({"daemon": {"control_socket": old}})
    d.wait_for_log(r"Configuration reloaded", start=mark)
    assert ask(old, "GET", "/v1/status")[0] == 200
    assert d.stop() == 0
    assert not os.path.lexists(old)


# ---- dsm-agent-syncctl --------------------------------------------------------------

def test_ctl_works_with_no_token(daemon_factory, sim_nobroker, sockdir):
    path = os.path.join(sockdir, "control.sock")
    d = start(daemon_factory, sim_nobroker, path, token=False)
    r = d.ctl("status")
    assert r.returncode == 0, r.stderr
    assert "Primary:" in r.stdout and "Update:" in r.stdout and r.stderr == ""
    r = d.ctl("status", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["daemon_version"]
    mark = d.log_mark()
    r = d.ctl("notify")
    assert r.returncode == 0, r.stderr
    d.wait_for_log(MID_NOTIFY_ACCEPTED + r".*local uid %d .*dsm-agent-syncctl" % os.getuid(), start=mark)
    # Also with the network listener off.
    mark = d.log_mark()
    d.reconfigure({"notify": {"listen": "off"}})
    d.wait_for_log(r"Configuration reloaded", start=mark)
    r = d.ctl("status")
    assert r.returncode == 0, r.stderr


def test_ctl_falls_back_to_the_network_listener(daemon_factory, sim_nobroker, sockdir):
    path = os.path.join(sockdir, "control.sock")
    # The daemon has no socket: ctl reads control_socket = off and asks the
    # listener with the token.
    d = daemon_factory(sim_nobroker, overrides=QUIET)
    assert d.config["daemon"]["control_socket"] == "off"
    r = d.ctl("status")
    assert r.returncode == 0 and r.stderr == "", r.stderr

    # ctl's config names a socket that is not there: the listener, silently.
    text = open(d.config_path).read().replace("control_socket = off", "control_socket = " + path)
    cfg = os.path.join(sockdir, "ctl.ini")
    with open(cfg, "w") as f:
        f.write(text)
    r = subprocess.run([daemon_mod.CTL_BIN, "-c", cfg, "status"], capture_output=True, text=True, timeout=15)
    assert r.returncode == 0 and r.stderr == "", r.stderr

    # A stale socket: it says so and which listener it tries next.
    stale_socket(path)
    r = subprocess.run([daemon_mod.CTL_BIN, "-c", cfg, "status"], capture_output=True, text=True, timeout=15)
    assert r.returncode == 0, r.stderr
    assert "control socket %s" % path in r.stderr and "Connection refused" in r.stderr, r.stderr
    assert "trying the notify listener 127.0.0.1:%d" % d.notify_port in r.stderr, r.stderr

    # Nothing answers: both are named.
    os.unlink(path)
    assert d.stop() == 0
    r = subprocess.run([daemon_mod.CTL_BIN, "-c", cfg, "status"], capture_output=True, text=True, timeout=15)
    assert r.returncode == 1
    assert "not answering on 127.0.0.1:%d" % d.notify_port in r.stderr, r.stderr
    assert "no control socket at %s" % path in r.stderr, r.stderr
    # And with the listener off as well, ctl says it cannot ask.
    with open(cfg, "w") as f:
        f.write(re.sub(r"(?m)^listen = .*$", "listen = off", text))
    r = subprocess.run([daemon_mod.CTL_BIN, "-c", cfg, "status"], capture_output=True, text=True, timeout=15)
    assert r.returncode == 1 and "cannot be asked" in r.stderr and path in r.stderr, r.stderr


def test_ctl_as_other_user_is_refused_with_a_reason(daemon_factory, sim_nobroker, sockdir):
    path = os.path.join(sockdir, "control.sock")
    d = start(daemon_factory, sim_nobroker, path, token=False, listen=False)
    # A config the other user can read, naming no secret file.
    cfg = os.path.join(sockdir, "ctl.ini")
    with open(cfg, "w") as f:
        f.write("[provider]\nendpoints = http://127.0.0.1:9\n[notify]\nlisten = off\n"
                "[daemon]\ncontrol_socket = %s\n" % path)
    os.chmod(cfg, 0o644)
    r = as_user(NOBODY, NOBODY, daemon_mod.CTL_BIN, "-c", cfg, "status")
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "no permission to use the control socket %s" % path in r.stderr, r.stderr
    r = as_user(NOBODY, os.lstat(path).st_gid, daemon_mod.CTL_BIN, "-c", cfg, "status")
    assert r.returncode == 0 and "Primary:" in r.stdout, r.stderr
    assert d.alive()


# ---- configuration --------------------------------------------------------------------

@pytest.mark.parametrize("value,word", [
    ("", "absolute"),
    ("run/control.sock", "absolute"),
    ("/run/dsm-agent-sync/", "absolute"),
    ("/run/a b", "absolute"),
    ("/run/" + "x" * 110 + ".sock", "longer than 107 bytes"),
])
def test_bad_values_rejected_with_file_and_line(daemon_factory, sim_nobroker, value, word):
    d = daemon_factory(sim_nobroker, overrides={"daemon": {"control_socket": value}}, start=False)
    text = open(d.config_path).read()
    line = strip_line(text, "control_socket")
    for r in (d.run("--check-config"), d.run()):
        assert r.returncode == 78, (r.returncode, r.stderr)
        assert "%s:%d: control_socket:" % (d.config_path, line) in r.stderr, r.stderr
        assert word in r.stderr, r.stderr
    r = d.ctl("status")
    assert r.returncode == 78 and "%s:%d:" % (d.config_path, line) in r.stderr, r.stderr
