"""The updater against a real HTTP server on loopback (contract section 8).

Each test writes a config into its own temp dir, serves packages from a tiny
threaded http.server in this process, and runs tests/updater_drive (one
Updater attempt in an sd-event loop). Checked: a good package reaches the
command with FILE VERSION; a tampered, truncated, oversized, missing or too
slow download fails with its reason and leaves nothing under download_dir;
a failing command is reported with its exit code, signal or timeout; a
SIGTERM during a download leaves no partial file. The provider token goes
only to the trusted api_url's origin, a plain http offer is refused when that
api_url is https, an oversized offer is refused, a backoff stays within 1 h
even when the stored time lies far ahead (clock stepped back), and a verified
package is reused after a failed command while packages of other versions
are removed. A verified package waits (READY) until the caller applies it,
and only the very offer that was verified may be applied.
"""

import hashlib
import http.server
import json
import os
import signal
import socket
import subprocess
import threading
import time

import pytest

BUILD = os.environ.get("DSM_BUILD_DIR", os.path.join(os.path.dirname(__file__), "..", "..", "build"))
DRIVE = os.path.join(BUILD, "tests", "updater_drive")
TOKEN = "s3cret-provider-token"
PKG = bytes(range(256)) * 800  # 204800 bytes
PKG_SHA = hashlib.sha256(PKG).hexdigest()
BIG = bytes((i * 7) & 0xFF for i in range(256)) * (12 * 1024 + 3)  # 3 MiB + 768: several hash slices
BIG_SHA = hashlib.sha256(BIG).hexdigest()
SIZE_MAX = 2 << 30  # UPDATER_PACKAGE_SIZE_MAX
RUN_TIMEOUT = 30


pytestmark = pytest.mark.skipif(not os.access(DRIVE, os.X_OK), reason=f"{DRIVE} not built")


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def setup(self):
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, fmt, *args):
        pass

    def _body(self, data, length=None):
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        if length is not None:
            self.send_header("Content-Length", str(length))
        else:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()

    def _trickle(self, chunk, interval, total_seconds):
        """Sends chunk every interval seconds; bounded and stoppable."""
        self.send_response(200)
        self.send_header("Content-Length", str(len(PKG)))
        self.end_headers()
        deadline = time.monotonic() + total_seconds
        sent = 0
        try:
            while time.monotonic() < deadline and not self.server.stopping.is_set() and sent < len(PKG):
                self.wfile.write(PKG[sent : sent + chunk])
                self.wfile.flush()
                sent += chunk
                self.server.stopping.wait(interval)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def do_GET(self):
        self.server.requests.append((self.path, self.headers.get("Authorization")))
        route = self.path.rsplit("/", 1)[-1]
        if route == "good":
            self._body(PKG, len(PKG))
        elif route == "big":
            self._body(BIG, len(BIG))
        elif route == "tampered":
            bad = bytearray(PKG)
            bad[1000] ^= 0xFF
            self._body(bytes(bad), len(bad))
        elif route == "truncated":
            self._body(PKG[:-100], len(PKG) - 100)
        elif route == "oversized":
            self._body(PKG + b"x" * 4096, len(PKG) + 4096)
        elif route == "oversized-nolength":
            self.close_connection = True
            self._body(PKG + b"x" * 4096)
        elif route == "slow":
            self._trickle(64, 0.25, 10)
        elif route == "stall":
            self._trickle(4096, 0.5, 20)
        else:
            self.send_error(404)


@pytest.fixture
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads = True
    srv.requests = []
    srv.stopping = threading.Event()
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    srv.port = srv.server_address[1]
    srv.url = f"http://127.0.0.1:{srv.port}/api/v1/agent/packages"
    yield srv
    srv.stopping.set()
    srv.shutdown()
    srv.server_close()
    t.join(timeout=5)


class Env:
    """One test's temp dir: config, token, version file, recording command."""

    def __init__(self, tmp_path):
        self.dir = tmp_path
        self.dl = tmp_path / "updates"
        self.args = tmp_path / "args"
        self.cmd = tmp_path / "apply-update"
        self.ini = tmp_path / "agent-sync.ini"
        self.state = tmp_path / "state.json"
        (tmp_path / "token").write_text(TOKEN + "\n")
        (tmp_path / "VERSION").write_text("  9.0.0 \nsecond line\n")
        (tmp_path / "expected.pkg").write_bytes(PKG)
        self.write_command("exit 0")
        self.write_config()

    def write_command(self, tail):
        """The command records its arguments, the expected hash it was
        given, and whether FILE holds the package, then runs tail."""
        self.cmd.write_text(
            "#!/bin/sh\n"
            f'printf "%s\\n" "$*" > "{self.args}"\n'
            f'printf "%s\\n" "$DSM_UPDATE_SHA256" >> "{self.args}"\n'
            f'cmp -s "$1" "{self.dir}/expected.pkg" && echo same >> "{self.args}"\n' + tail + "\n"
        )
        self.cmd.chmod(0o755)

    def write_config(self, command_timeout="10s"):
        self.ini.write_text(
            "[provider]\n"
            "endpoints = http://127.0.0.1:9\n"
            f"token_file = {self.dir}/token\n"
            "[notify]\n"
            "listen = off\n"
            "[update]\n"
            f"agent_version_file = {self.dir}/VERSION\n"
            f"download_dir = {self.dl}\n"
            f"command = {self.cmd}\n"
            f"command_timeout = {command_timeout}\n"
            "[daemon]\n"
            f"state_file = {self.dir}/state.json\n"
        )

    def argv(self, url, version="9.0.1", sha=PKG_SHA, size=len(PKG), trusted=None):
        """trusted: the Primary's api_url; None lets the drive use url itself."""
        return [DRIVE, str(self.ini), url, version, sha, str(size)] + ([] if trusted is None else [trusted])

    def run(self, url, version="9.0.1", sha=PKG_SHA, size=len(PKG), trusted=None, **extra_env):
        environ = dict(os.environ)
        environ.update({k: str(v) for k, v in extra_env.items()})
        p = subprocess.run(
            self.argv(url, version, sha, size, trusted),
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT,
            env=environ,
        )
        out = dict(line.split("=", 1) for line in p.stdout.splitlines() if "=" in line)
        return p.returncode, out, p.stderr

    def leftovers(self):
        return sorted(os.listdir(self.dl)) if self.dl.exists() else []

    def temp_files(self):
        return [n for n in self.leftovers() if n.startswith(".dl-")]


@pytest.fixture
def env(tmp_path):
    return Env(tmp_path)


def test_good_package_applied(env, server):
    rc, out, err = env.run(f"{server.url}/good")
    assert rc == 0, err
    assert out["result"] == "applied"
    assert out["reason"] == ""
    assert out["applied_version"] == "9.0.1"
    assert out["failures"] == "0"
    assert out["installed"] == "9.0.0"
    assert out["second_start"] == "EBUSY"  # never two at once
    pkg = env.dl / "dsm-agent-9.0.1.pkg"
    assert env.args.read_text().splitlines() == [f"{pkg} 9.0.1", PKG_SHA, "same"]
    assert pkg.read_bytes() == PKG
    assert (pkg.stat().st_mode & 0o777) == 0o600
    assert env.leftovers() == ["dsm-agent-9.0.1.pkg"]
    assert server.requests == [("/api/v1/agent/packages/good", f"Bearer {TOKEN}")]
    assert "MESSAGE_ID=9c88fee5e86945daae2ee2da79934825" in err
    assert TOKEN not in err


def test_old_packages_removed_after_success(env, server):
    env.dl.mkdir()
    (env.dl / "dsm-agent-9.0.0.pkg").write_bytes(b"old")
    (env.dl / "unrelated.txt").write_bytes(b"keep")
    rc, out, err = env.run(f"{server.url}/good")
    assert rc == 0, err
    assert env.leftovers() == ["dsm-agent-9.0.1.pkg", "unrelated.txt"]


def test_sweep_removes_leftover_temp_files(env, server):
    env.dl.mkdir()
    (env.dl / ".dl-9.0.0.AbC123").write_bytes(b"partial")
    (env.dl / "keep.txt").write_bytes(b"keep")
    rc, out, err = env.run(f"{server.url}/good")
    assert rc == 0, err
    assert out["swept"] == "1"
    assert env.leftovers() == ["dsm-agent-9.0.1.pkg", "keep.txt"]


@pytest.mark.parametrize(
    "route,reason",
    [
        ("tampered", "sha256_mismatch"),
        ("truncated", "size_mismatch"),
        ("oversized", "size_mismatch"),
        ("oversized-nolength", "size_mismatch"),
        ("missing", "download_failed: HTTP 404"),
    ],
)
def test_bad_download_never_reaches_command(env, server, route, reason):
    rc, out, err = env.run(f"{server.url}/{route}")
    assert rc == 1, err
    assert out["result"] == "failed"
    assert out["reason"] == reason
    assert out["failures"] == "1"
    assert out["retry_start"] == "EAGAIN"  # backing off
    assert not env.args.exists()
    assert env.leftovers() == []
    assert f"DSM_REASON={reason}" in err or f'DSM_REASON="{reason}"' in err
    assert "MESSAGE_ID=b3b8508b198c4f8b824068025961d91e" in err


def test_connection_refused(env):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again before the download
    rc, out, err = env.run(f"http://127.0.0.1:{port}/pkg")
    assert rc == 1, err
    assert out["reason"].startswith("download_failed: ")
    assert env.leftovers() == []


def test_slow_download_times_out(env, server):
    started = time.monotonic()
    rc, out, err = env.run(
        f"{server.url}/slow", UPDATER_DRIVE_LOW_SPEED_BYTES=1024, UPDATER_DRIVE_LOW_SPEED_MS=1000
    )
    assert rc == 1, err
    assert out["reason"].startswith("download_failed: ")
    assert "too slow" in out["reason"].lower() or "timed out" in out["reason"].lower()
    assert time.monotonic() - started < 8
    assert env.leftovers() == []
    assert not env.args.exists()


def test_total_timeout(env, server):
    rc, out, err = env.run(f"{server.url}/stall", UPDATER_DRIVE_LOW_SPEED_BYTES=1, UPDATER_DRIVE_TOTAL_MS=1500)
    assert rc == 1, err
    assert out["reason"].startswith("download_failed: ")
    assert env.leftovers() == []


@pytest.mark.parametrize(
    "tail,reason",
    [
        ("exit 3", "command_failed: exit 3"),
        ("kill -9 $$", "command_failed: signal 9"),
        ("exec sleep 30", "command_failed: timeout"),
    ],
)
def test_command_failure(env, server, tail, reason):
    env.write_command(tail)
    env.write_config(command_timeout="1s")
    rc, out, err = env.run(f"{server.url}/good")
    assert rc == 1, err
    assert out["reason"] == reason
    assert out["applied_version"] == ""
    assert out["failures"] == "1"
    assert out["retry_start"] == "EAGAIN"
    assert env.args.read_text().splitlines()[2] == "same"  # it got the verified file
    assert env.temp_files() == []


def test_sigterm_during_download_leaves_no_partial_file(env, server):
    p = subprocess.Popen(
        env.argv(f"{server.url}/stall"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            temps = env.temp_files()
            if temps and (env.dl / temps[0]).stat().st_size > 0:
                break
            time.sleep(0.05)
        else:
            pytest.fail("no partial download appeared")
        assert oct((env.dl / temps[0]).stat().st_mode & 0o777) == oct(0o600)
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=10)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(timeout=5)
    assert p.returncode == 4, err
    assert "result=stopped" in out
    assert env.leftovers() == []
    assert not env.args.exists()


@pytest.mark.parametrize("version", ["../x", "a/b", ".hidden", ""])
def test_unsafe_version_rejected(env, server, version):
    rc, out, err = env.run(f"{server.url}/good", version=version)
    assert rc == 1, err
    assert out["reason"] == "start: EINVAL"
    assert server.requests == []
    assert env.leftovers() == []


def test_missing_version_file_reads_empty(env, server):
    (env.dir / "VERSION").unlink()
    rc, out, err = env.run(f"{server.url}/good")
    assert rc == 0, err
    assert out["installed"] == ""


# ---- the provider token goes only to the Provider's own origin ----


def bearer_sent(server):
    return [auth for _, auth in server.requests if auth and TOKEN in auth]


@pytest.mark.parametrize("trusted", ["http://127.0.0.1:{port}/", "HTTP://127.0.0.1:{port}/api/v1/state?x=1"])
def test_token_sent_to_same_origin(env, server, trusted):
    rc, out, err = env.run(f"{server.url}/good", trusted=trusted.format(port=server.port))
    assert rc == 0, err
    assert server.requests == [("/api/v1/agent/packages/good", f"Bearer {TOKEN}")]
    assert "with the provider token" in err
    assert TOKEN not in err


@pytest.mark.parametrize(
    "url,trusted",
    [
        ("http://127.0.0.1:{port}/p/good", "http://127.0.0.1:{other}/"),  # other port
        ("http://127.0.0.1:{port}/p/good", "http://localhost:{port}/"),  # other host
        ("http://127.0.0.1:{port}/p/good", "http://127.0.0.1:{port}@evil.example/"),  # its host is evil.example
        ("http://u:p@127.0.0.1:{port}/p/good", "http://127.0.0.1:{port}/"),  # credentials of its own
        ("http://127.0.0.1:{port}/p/good", ""),  # no trusted origin at all
        ("http://127.0.0.1:{port}/p/good", "not a url"),
    ],
)
def test_no_token_to_other_origin(env, server, url, trusted):
    if trusted in ("", "not a url"):
        # No trusted http origin: a plain http offer is refused outright.
        rc, out, err = env.run(url.format(port=server.port), trusted=trusted)
        assert rc == 1, err
        assert out["reason"] == "download_failed: insecure url"
        assert server.requests == []
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        other = s.getsockname()[1]
    rc, out, err = env.run(url.format(port=server.port), trusted=trusted.format(port=server.port, other=other))
    assert rc == 0, err  # the download itself goes ahead, only without the token
    assert len(server.requests) == 1
    assert bearer_sent(server) == []
    assert "without the provider token" in err
    assert TOKEN not in err


@pytest.mark.parametrize(
    "url,trusted,sent",
    [
        ("http://127.0.0.1:80/pkg", "http://127.0.0.1/", True),
        ("http://127.0.0.1/pkg", "http://127.0.0.1:0080/", True),
        ("https://127.0.0.1/pkg", "https://127.0.0.1:443/", True),
        ("https://127.0.0.1/pkg", "https://127.0.0.1:8443/", False),
        ("https://127.0.0.1:80/pkg", "http://127.0.0.1/", False),  # same port, other scheme
        ("http://[::1]/pkg", "http://[::1]:80/", True),
        ("http://[::1%25lo]/pkg", "http://[::1]/", False),  # a zone id of its own
        ("http://[::1]/pkg", "http://[::1%25lo]/", False),  # a zone id in the trusted api_url
        ("http://;opt@127.0.0.1/pkg", "http://127.0.0.1/", False),  # login options count as userinfo
    ],
)
def test_default_ports(env, url, trusted, sent):
    """Only the decision is checked (its log line); nothing need listen there."""
    rc, out, err = env.run(url, trusted=trusted, UPDATER_DRIVE_TIMEOUT_MS=20000)
    assert out["result"] in ("applied", "failed"), err
    assert ("with the provider token" in err) == sent
    assert ("without the provider token" in err) == (not sent)


@pytest.mark.parametrize("trusted", ["https://127.0.0.1:{port}/", "https://primary.example/"])
def test_http_offer_refused_with_https_primary(env, server, trusted):
    rc, out, err = env.run(f"{server.url}/good", trusted=trusted.format(port=server.port))
    assert rc == 1, err
    assert out["result"] == "failed"
    assert out["reason"] == "download_failed: insecure url"
    assert out["failures"] == "1"
    assert out["retry_start"] == "EAGAIN"
    assert server.requests == []
    assert env.leftovers() == []
    assert not env.args.exists()
    assert "MESSAGE_ID=b3b8508b198c4f8b824068025961d91e" in err


# ---- backoff ----


def test_backoff_capped_at_one_hour(env, server):
    """A retry time far ahead (the clock stepped back, or a bad state file)
    is pulled in to at most 1 h from now, and saved that way."""
    rc, out, err = env.run(f"{server.url}/missing", UPDATER_DRIVE_STATE=env.state)
    assert rc == 1, err
    assert 0 < int(out["retry_in_s"]) <= 60
    state = json.loads(env.state.read_text())
    assert state["update"]["failed_version"] == "9.0.1"

    ten_years = 10 * 365 * 86400 * 10**6
    state["update"]["retry_not_before_usec"] = int(time.time() * 1e6) + ten_years
    env.state.write_text(json.dumps(state))
    rc, out, err = env.run(f"{server.url}/good", UPDATER_DRIVE_STATE=env.state)
    assert rc == 1, err
    assert out["reason"] == "start: EAGAIN"  # still backing off, but not for ten years
    assert 3500 < int(out["retry_in_s"]) <= 3600
    state = json.loads(env.state.read_text())
    assert state["update"]["retry_not_before_usec"] <= int(time.time() * 1e6) + 3600 * 10**6

    # An hour later (the capped time moved back by an hour): retried.
    state["update"]["retry_not_before_usec"] -= 3601 * 10**6
    env.state.write_text(json.dumps(state))
    rc, out, err = env.run(f"{server.url}/good", UPDATER_DRIVE_STATE=env.state)
    assert rc == 0, err
    assert out["result"] == "applied"
    assert json.loads(env.state.read_text())["update"]["applied_version"] == "9.0.1"


# ---- READY: the command runs only when the caller says so (contract 8) ----


def test_verified_package_waits_ready_until_applied(env, server):
    """The updater never runs the command by itself: a verified package
    waits in READY (here the gate stays closed), is kept, and a later
    attempt checks it again and runs it when told to."""
    rc, out, err = env.run(f"{server.url}/good", UPDATER_DRIVE_READY="hold", UPDATER_DRIVE_STATE=env.state)
    assert rc == 5, err
    assert out["early_apply"] == "ESTALE"  # nothing verified yet
    assert out["ready"] == "9.0.1" and out["result"] == "ready", out
    assert out["applied_version"] == ""
    assert not env.args.exists()  # the command never ran
    assert (env.dl / "dsm-agent-9.0.1.pkg").read_bytes() == PKG  # kept
    assert json.loads(env.state.read_text())["update"]["applied_version"] == ""

    rc, out, err = env.run(f"{server.url}/good", UPDATER_DRIVE_STATE=env.state)
    assert rc == 0, err
    assert out["result"] == "applied" and out["ready"] == "9.0.1", out
    assert len(server.requests) == 1  # the kept package, checked again
    assert "Reusing the verified package" in err
    assert env.args.read_text().splitlines() == [f"{env.dl}/dsm-agent-9.0.1.pkg 9.0.1", PKG_SHA, "same"]


def test_apply_of_another_offer_refused(env, server):
    """updater_apply() with an offer that differs from the verified one in
    its version, url, sha256 or size is refused and keeps the package
    READY; the verified offer itself then runs."""
    rc, out, err = env.run(f"{server.url}/good", UPDATER_DRIVE_READY="stale")
    assert rc == 0, err
    assert out["stale_apply"] == "ESTALE,ESTALE,ESTALE,ESTALE", out
    assert out["phase_after_stale"] == "ready", out
    assert out["result"] == "applied" and out["applied_version"] == "9.0.1", out
    assert env.args.read_text().splitlines()[1:] == [PKG_SHA, "same"]


# ---- reusing a verified package, keeping download_dir small ----


def test_package_reused_after_failed_command(env, server):
    env.write_command("exit 3")
    rc, out, err = env.run(f"{server.url}/good")
    assert rc == 1, err
    assert out["reason"] == "command_failed: exit 3"
    assert env.leftovers() == ["dsm-agent-9.0.1.pkg"]  # kept for the retry

    env.args.unlink()
    env.write_command("exit 0")
    rc, out, err = env.run(f"{server.url}/good")
    assert rc == 0, err
    assert len(server.requests) == 1  # not downloaded again
    assert "Reusing the verified package" in err
    assert env.args.read_text().splitlines()[1:] == [PKG_SHA, "same"]
    assert env.leftovers() == ["dsm-agent-9.0.1.pkg"]


def test_large_package_reused(env, server):
    """More than one hash slice (1 MiB each)."""
    (env.dir / "expected.pkg").write_bytes(BIG)
    env.write_command("exit 3")
    rc, out, err = env.run(f"{server.url}/big", sha=BIG_SHA, size=len(BIG))
    assert rc == 1, err
    env.write_command("exit 0")
    rc, out, err = env.run(f"{server.url}/big", sha=BIG_SHA, size=len(BIG))
    assert rc == 0, err
    assert len(server.requests) == 1
    assert env.args.read_text().splitlines()[2] == "same"


@pytest.mark.parametrize(
    "kept",
    [
        bytes(len(PKG)),  # the right size, the wrong bytes
        PKG[:-1] + b"x",  # one byte off at the very end
        PKG[:1000],  # short
        PKG + b"x",  # long
    ],
    ids=["zeros", "last-byte", "short", "long"],
)
def test_changed_kept_package_downloaded_again(env, server, kept):
    env.dl.mkdir()
    (env.dl / "dsm-agent-9.0.1.pkg").write_bytes(kept)
    rc, out, err = env.run(f"{server.url}/good")
    assert rc == 0, err
    assert len(server.requests) == 1
    assert "Reusing" not in err
    assert env.args.read_text().splitlines()[2] == "same"
    assert (env.dl / "dsm-agent-9.0.1.pkg").read_bytes() == PKG


def test_kept_package_symlink_not_followed(env, server, tmp_path):
    """A symlink under the package's name is not hashed or used."""
    env.dl.mkdir()
    (env.dl / "dsm-agent-9.0.1.pkg").symlink_to(env.dir / "expected.pkg")
    rc, out, err = env.run(f"{server.url}/good")
    assert rc == 0, err
    assert len(server.requests) == 1
    assert not (env.dl / "dsm-agent-9.0.1.pkg").is_symlink()


def test_packages_of_other_versions_removed_on_failure(env, server):
    env.dl.mkdir()
    (env.dl / "dsm-agent-9.0.0.pkg").write_bytes(b"applied earlier")
    (env.dl / "dsm-agent-8.pkg").write_bytes(b"failed earlier")
    (env.dl / "unrelated.txt").write_bytes(b"keep")
    rc, out, err = env.run(f"{server.url}/missing")
    assert rc == 1, err
    assert env.leftovers() == ["unrelated.txt"]


def test_failed_package_removed_when_another_version_is_offered(env, server):
    env.write_command("exit 3")
    rc, out, err = env.run(f"{server.url}/good", version="9.0.1")
    assert rc == 1, err
    assert env.leftovers() == ["dsm-agent-9.0.1.pkg"]
    rc, out, err = env.run(f"{server.url}/good", version="9.0.2")
    assert rc == 1, err
    assert env.leftovers() == ["dsm-agent-9.0.2.pkg"]  # at most one package at any time


# ---- size limit ----


def test_oversized_offer_refused(env, server):
    rc, out, err = env.run(f"{server.url}/good", size=SIZE_MAX + 1)
    assert rc == 1, err
    assert out["reason"] == f"download_failed: size {SIZE_MAX + 1} exceeds the limit of {SIZE_MAX} bytes"
    assert out["retry_start"] == "EAGAIN"
    assert server.requests == []
    assert env.leftovers() == []


def test_offer_at_size_limit_accepted(env, server):
    rc, out, err = env.run(f"{server.url}/good", size=SIZE_MAX)
    assert rc == 1, err
    assert out["reason"] == "size_mismatch"  # it was downloaded (and found short)
    assert len(server.requests) == 1
