"""Runs the real dsm-agent-syncd for whole-process tests.

    d = Daemon(workdir, sim=s, overrides={"provider": {"poll_interval": "1s"}})
    d.start()                       # waits for READY=1 (notify socket) or /healthz
    d.wait_for_settings(lambda st: st["provider"]["primary_id"] == "p2", 10)
    d.read_settings(); d.read_state(); d.log_lines(); d.wait_for_log(r"committed", 5)
    d.status()  -> (http status, JSON)
    d.notify({"reason": "test"}) -> (http status, JSON)
    d.signal(signal.SIGHUP); d.stop() -> exit code

The binary is $DSM_BUILD_DIR/dsm-agent-syncd (default: <repo>/build).
Config overrides: {section: {key: value}}; a value of None removes the key
(written config follows contract section 2).
"""

import configparser
import json
import os
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request

from . import util

BUILD_DIR = os.environ.get("DSM_BUILD_DIR") or os.path.join(util.REPO_ROOT, "build")
DAEMON_BIN = os.path.join(BUILD_DIR, "dsm-agent-syncd")
CTL_BIN = os.path.join(BUILD_DIR, "dsm-agent-syncctl")

SETTINGS_HEADER = "# Managed by dsm-agent-syncd. Local changes are overwritten."


def write_secret(path, value):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
    return path


def write_recorder(path, record_file, exit_code_file=None, sleep=0):
    """Writes an executable that appends one JSON line per run to
    record_file: {"argv": [...], "env": {DSM_*...}, "t": time}. Its exit
    status is read from exit_code_file when that file exists (default 0).
    Usable as on_change or as the update command."""
    with open(path, "w") as f:
        f.write("""#!/usr/bin/python3
import json, os, sys, time
time.sleep(%r)
rec = {"argv": sys.argv, "t": time.time(), "pid": os.getpid(),
       "env": {k: v for k, v in os.environ.items() if k.startswith("DSM_")}}
with open(%r, "a") as f:
    f.write(json.dumps(rec) + "\\n")
code = 0
ecf = %r
if ecf and os.path.exists(ecf):
    code = int(open(ecf).read().strip() or 0)
sys.exit(code)
""" % (float(sleep), record_file, exit_code_file or ""))
    os.chmod(path, 0o755)
    return path


def read_records(record_file):
    try:
        with open(record_file) as f:
            return [json.loads(x) for x in f if x.strip()]
    except FileNotFoundError:
        return []


def parse_settings(text):
    """Parses the settings file of contract section 5 into
    {"rabbitmq": {...}, "provider": {...}} (string values)."""
    cp = configparser.ConfigParser(interpolation=None, delimiters=("=",),
                                   comment_prefixes=("#", ";"), strict=True)
    cp.optionxform = str
    cp.read_string(text)
    return {s: dict(cp.items(s)) for s in cp.sections()}


def format_ini(sections):
    out = []
    for sec, kv in sections.items():
        out.append("[%s]" % sec)
        for k, v in kv.items():
            if v is None:
                continue
            if isinstance(v, bool):
                v = "true" if v else "false"
            out.append("%s = %s" % (k, v))
        out.append("")
    return "\n".join(out)


class Daemon:
    def __init__(self, workdir, sim=None, overrides=None, notify_socket=None,
                 watchdog_usec=None, watchdog_pid=False, binary=None, env=None,
                 provider_token=None, notify_token="test-notify-token",
                 broker_password="guest", agent_version="9.0.1"):
        self.workdir = os.path.abspath(workdir)
        os.makedirs(self.workdir, exist_ok=True)
        self.binary = binary or DAEMON_BIN
        self.sim = sim
        self.notify_socket = notify_socket
        self.watchdog_usec = watchdog_usec
        self.watchdog_pid = watchdog_pid
        self.extra_env = dict(env or {})
        self.proc = None
        self.log_path = os.path.join(self.workdir, "daemon.log")
        self.stdout_path = os.path.join(self.workdir, "daemon.stdout")
        self.config_path = os.path.join(self.workdir, "agent-sync.ini")
        self.settings_file = os.path.join(self.workdir, "rabbitmq.ini")
        self.state_file = os.path.join(self.workdir, "state.json")
        self.download_dir = os.path.join(self.workdir, "updates")
        os.makedirs(self.download_dir, exist_ok=True)
        self.agent_version_file = os.path.join(self.workdir, "VERSION")
        with open(self.agent_version_file, "w") as f:
            f.write(agent_version + "\n")
        self.on_change_record = os.path.join(self.workdir, "on_change.jsonl")
        self.update_record = os.path.join(self.workdir, "update.jsonl")
        self.update_exit_file = os.path.join(self.workdir, "update.exit")
        self.on_change_exit_file = os.path.join(self.workdir, "on_change.exit")
        self.on_change_script = write_recorder(os.path.join(self.workdir, "on_change"),
                                               self.on_change_record, self.on_change_exit_file)
        self.update_script = write_recorder(os.path.join(self.workdir, "apply-update"),
                                            self.update_record, self.update_exit_file)
        self.provider_token = provider_token or (sim.token if sim else "test-provider-token")
        self.provider_token_file = write_secret(os.path.join(self.workdir, "provider.token"),
                                                self.provider_token)
        self.notify_token = notify_token
        self.notify_token_file = write_secret(os.path.join(self.workdir, "notify.token"),
                                              notify_token)
        self.broker_password_file = write_secret(os.path.join(self.workdir, "broker.password"),
                                                 broker_password)
        self.notify_port = util.free_port()
        self.config = self.default_config()
        self.apply_overrides(overrides or {})
        self.write_config()

    # ----- configuration ------------------------------------------------------

    def default_config(self):
        prov = {}
        if self.sim is not None:
            prov["endpoints"] = ", ".join(self.sim.urls[k] for k in sorted(self.sim.urls))
        prov.update({
            "token_file": self.provider_token_file,
            "poll_interval": "5s",
            "poll_jitter": "0",
            "fast_poll_interval": "200ms",
            "request_timeout": "2s",
        })
        return {
            "provider": prov,
            "broker": {
                "username": "guest",
                "password_file": self.broker_password_file,
                "exchange": "dsm.provider.events",
                "heartbeat": "2s",
                "settings_file": self.settings_file,
                "settings_mode": "0640",
                "on_change": self.on_change_script,
                "on_change_timeout": "10s",
            },
            "notify": {
                "listen": "127.0.0.1:%d" % self.notify_port,
                "token_file": self.notify_token_file,
            },
            "update": {
                "enabled": "true",
                "stable_rounds": "2",
                "max_delay": "0s",
                "agent_version_file": self.agent_version_file,
                "download_dir": self.download_dir,
                "command": self.update_script,
                "command_timeout": "30s",
            },
            "daemon": {
                "state_file": self.state_file,
                "log_level": "debug",
                "log_target": "stderr",
                # Off unless a test asks for it: the tests of the notify
                # listener must reach it, and the default path is the
                # machine's. tests/integration/test_control_socket.py
                # turns it on with a path of its own.
                "control_socket": "off",
            },
        }

    def apply_overrides(self, overrides):
        for sec, kv in overrides.items():
            if kv is None:
                self.config.pop(sec, None)
                continue
            d = self.config.setdefault(sec, {})
            for k, v in kv.items():
                if v is None:
                    d.pop(k, None)
                else:
                    d[k] = v
        listen = self.config.get("notify", {}).get("listen", "off")
        m = re.match(r"^\[?([0-9a-fA-F.:]+?)\]?:(\d+)$", listen)
        if m:
            self.notify_host, self.notify_port = m.group(1), int(m.group(2))
        else:
            self.notify_host = None

    def write_config(self, text=None):
        with open(self.config_path + ".tmp", "w") as f:
            f.write(text if text is not None else format_ini(self.config))
        os.replace(self.config_path + ".tmp", self.config_path)

    def reconfigure(self, overrides, reload=True):
        """Applies overrides, rewrites the config, and sends SIGHUP."""
        self.apply_overrides(overrides)
        self.write_config()
        if reload:
            self.signal(signal.SIGHUP)

    # ----- process ----------------------------------------------------------

    def env(self):
        e = {k: v for k, v in os.environ.items()
             if not k.startswith("DSM_") and k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS",
                          "LISTEN_PID", "INVOCATION_ID", "JOURNAL_STREAM")}
        if self.notify_socket is not None:
            e.update(self.notify_socket.env(self.watchdog_usec))
        e.update(self.extra_env)
        return e

    def argv(self, *extra):
        return [self.binary, "-c", self.config_path] + list(extra)

    def start(self, wait=True, timeout=15.0):
        if not os.path.exists(self.binary):
            raise FileNotFoundError("daemon binary not built: %s" % self.binary)
        argv = self.argv()
        if self.watchdog_pid:
            argv = ["/bin/sh", "-c", 'WATCHDOG_PID=$$; export WATCHDOG_PID; exec "$@"', "sh"] + argv
        self._log = open(self.log_path, "ab")
        self._out = open(self.stdout_path, "ab")
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self._out,
                                     stderr=self._log, env=self.env(), cwd=self.workdir,
                                     start_new_session=True, preexec_fn=util.pdeathsig_term)
        self.pid = self.proc.pid
        util.register_cleanup(("daemon", self.proc.pid), lambda p=self.proc: util.stop_popen(p, timeout=5))
        if wait:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout=15.0):
        """READY=1 on the notify socket when there is one, else /healthz."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("daemon exited with %s during start:\n%s"
                                   % (self.proc.returncode, self.log_tail()))
            if self.notify_socket is not None:
                if self.notify_socket.ready():
                    return True
            elif self.notify_host:
                try:
                    if self.http("GET", "/healthz", token="", timeout=0.5)[0] == 200:
                        return True
                except OSError:
                    pass
            else:
                time.sleep(0.5)
                return True
            time.sleep(0.02)
        raise TimeoutError("daemon not ready within %.1fs:\n%s" % (timeout, self.log_tail()))

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self):
        return None if self.proc is None else self.proc.poll()

    def signal(self, sig):
        os.kill(self.proc.pid, sig)

    def wait_exit(self, timeout=10.0):
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError("daemon still running after %.1fs" % timeout)

    def stop(self, timeout=10.0):
        """SIGTERM, bounded wait, SIGKILL fallback. Returns the exit code
        (negative: killed by that signal)."""
        if self.proc is None:
            return None
        rc = util.stop_popen(self.proc, signal.SIGTERM, timeout=timeout, group=True)
        util.unregister_cleanup(("daemon", self.proc.pid))
        for f in (getattr(self, "_log", None), getattr(self, "_out", None)):
            if f:
                f.close()
        return rc

    def kill(self):
        """SIGKILL the daemon (a crash). Returns the exit code."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
        return self.stop()

    def run(self, *args, timeout=30.0, env=None):
        """Runs the binary with -c CONFIG and args (e.g. "--once",
        "--check-config") to completion. Returns CompletedProcess (text)."""
        e = self.env()
        e.update(env or {})
        return subprocess.run(self.argv(*args), stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, env=e, timeout=timeout, cwd=self.workdir)

    def ctl(self, *args, timeout=15.0):
        return subprocess.run([CTL_BIN, "-c", self.config_path] + list(args),
                              stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=timeout, cwd=self.workdir)

    # ----- files ------------------------------------------------------------

    def settings_text(self):
        try:
            with open(self.settings_file) as f:
                return f.read()
        except FileNotFoundError:
            return None

    def read_settings(self):
        """The settings file parsed, or None when it does not exist."""
        t = self.settings_text()
        return None if t is None else parse_settings(t)

    def wait_for_settings(self, predicate=lambda s: True, timeout=10.0):
        """Waits until the settings file exists and predicate(settings) is
        true; returns the settings. Raises TimeoutError with the log tail."""
        deadline = time.monotonic() + timeout
        last = None
        while True:
            try:
                s = self.read_settings()
            except configparser.Error as e:
                s, last = None, "unparsable: %s" % e
            if s is not None:
                last = s
                try:
                    if predicate(s):
                        return s
                except (KeyError, ValueError, TypeError):
                    pass
            if time.monotonic() >= deadline:
                raise TimeoutError("settings not as expected within %.1fs; last: %r\n%s"
                                   % (timeout, last, self.log_tail()))
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError("daemon exited with %s; last settings %r\n%s"
                                   % (self.proc.returncode, last, self.log_tail()))
            time.sleep(0.02)

    def wait_for_primary(self, primary_id, epoch=None, timeout=10.0):
        return self.wait_for_settings(
            lambda s: s["provider"]["primary_id"] == primary_id
            and (epoch is None or int(s["provider"]["epoch"]) == epoch), timeout)

    def read_state(self):
        try:
            with open(self.state_file) as f:
                return json.load(f)
        except FileNotFoundError:
            return None

    def on_change_runs(self):
        return read_records(self.on_change_record)

    def update_runs(self):
        return read_records(self.update_record)

    # ----- logs -------------------------------------------------------------

    def log_text(self):
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def log_lines(self):
        return self.log_text().splitlines()

    def log_mark(self):
        """The current number of log lines: pass as start= to wait_for_log."""
        return len(self.log_lines())

    def wait_for_log(self, regex, timeout=10.0, start=0):
        """Waits for a log line (index >= start) matching regex; returns the match."""
        rx = re.compile(regex)
        deadline = time.monotonic() + timeout
        while True:
            for line in self.log_lines()[start:]:
                m = rx.search(line)
                if m:
                    return m
            if time.monotonic() >= deadline:
                raise TimeoutError("no log line matching %r within %.1fs\n%s"
                                   % (regex, timeout, self.log_tail()))
            time.sleep(0.02)

    def log_tail(self, n=60):
        return "--- daemon log (%s) ---\n%s" % (self.log_path, "\n".join(self.log_lines()[-n:]))

    # ----- notify endpoint --------------------------------------------------

    def base_url(self):
        host = self.notify_host or "127.0.0.1"
        if host in ("0.0.0.0", ""):
            host = "127.0.0.1"
        if host == "::":
            host = "::1"
        if ":" in host:
            host = "[%s]" % host
        return "http://%s:%d" % (host, self.notify_port)

    def http(self, method, path, body=None, token=None, headers=None, timeout=5.0):
        """One request to the notify listener. token=None: the notify token;
        token="": no Authorization. body: dict (JSON), bytes or str.
        Returns (status, headers, parsed JSON or raw bytes)."""
        h = dict(headers or {})
        tok = self.notify_token if token is None else token
        if tok:
            h["Authorization"] = "Bearer " + tok
        data = None
        if body is not None:
            if isinstance(body, (dict, list)):
                data = json.dumps(body).encode()
                h.setdefault("Content-Type", "application/json")
            elif isinstance(body, str):
                data = body.encode()
            else:
                data = body
        req = urllib.request.Request(self.base_url() + path, data=data, method=method, headers=h)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                status, rh, raw = r.status, dict(r.headers), r.read()
        except urllib.error.HTTPError as e:
            status, rh, raw = e.code, dict(e.headers), e.read()
        try:
            return status, rh, json.loads(raw)
        except ValueError:
            return status, rh, raw

    def status(self, token=None):
        """GET /v1/status: (http status, document). A 429 (the listener's
        rate limit) is waited out a few times, as a careful client would."""
        for _ in range(10):
            s, headers, doc = self.http("GET", "/v1/status", token=token)
            if s != 429:
                break
            retry = 1.0
            try:
                retry = float(dict((k.lower(), v) for k, v in headers.items()).get("retry-after", 1))
            except (AttributeError, TypeError, ValueError):
                pass
            time.sleep(min(retry, 1.0))
        return s, doc

    def notify(self, body=None, token=None):
        """POST /v1/notify: (http status, document)."""
        s, _, doc = self.http("POST", "/v1/notify", body=body, token=token)
        return s, doc

    def wait_for_status(self, predicate, timeout=10.0):
        deadline = time.monotonic() + timeout
        last = None
        while True:
            try:
                code, doc = self.status()
                last = doc
                if code == 200 and predicate(doc):
                    return doc
            except (OSError, KeyError, TypeError, ValueError):
                pass
            if time.monotonic() >= deadline:
                raise TimeoutError("status not as expected within %.1fs; last: %r\n%s"
                                   % (timeout, last, self.log_tail()))
            time.sleep(0.1)
