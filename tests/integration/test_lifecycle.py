#!/usr/bin/python3
"""Whole-process lifecycle tests of dsm-agent-syncd (issue 2): command line,
exit codes, --check-config, --once, signals (SIGTERM, SIGINT, SIGHUP with a
good and a bad config), systemd's notify socket and watchdog, restarts that
keep the epoch, and the SIGKILL loop of the issue's "Done when".

Run: DSM_BUILD_DIR=$PWD/build-XX /usr/bin/python3 -m pytest -q -s \
         -p no:cacheprovider tests/integration/test_lifecycle.py
"""

import json
import os
import random
import re
import signal
import statistics
import threading
import time

import pytest

from harness.rounds import expected_settings, mid_lines, mode_of, poll_now, polls, wait_polls

MID_CONFIG_REJECTED = "7973658656e64425b0beaf0a576b2dce"
MID_COMMITTED = "ded36cf01a5547829b18395ff8df2196"

QUIET = {"provider": {"poll_interval": "30s", "fast_poll_interval": "30s",
                      "request_timeout": "2s"}}
BUSY = {"provider": {"poll_interval": "1s", "fast_poll_interval": "200ms",
                     "request_timeout": "2s"}}

SETTINGS_RE = re.compile(
    r"\A# Managed by dsm-agent-syncd\. Local changes are overwritten\.\n"
    r"\[rabbitmq\]\n"
    r"host = (?P<host>[^\s]+)\n"
    r"port = (?P<port>[0-9]+)\n"
    r"vhost = (?P<vhost>[^\n]+)\n"
    r"tls = (?P<tls>true|false)\n"
    r"\n"
    r"\[provider\]\n"
    r"primary_id = (?P<primary_id>[A-Za-z0-9._-]{1,64})\n"
    r"epoch = (?P<epoch>[1-9][0-9]*)\n"
    r"api_url = (?P<api_url>[^\s]+)\n\Z")


# ----- helpers -----------------------------------------------------------------

def line_of(text, startswith):
    for i, ln in enumerate(text.splitlines(), 1):
        if ln.startswith(startswith):
            return i
    raise AssertionError("no line starting with %r" % startswith)


# ----- command line -------------------------------------------------------------

def test_version_and_help(daemon_factory):
    d = daemon_factory(None, start=False)
    r = d.run("--version", timeout=10)
    assert r.returncode == 0, r.stderr
    assert re.match(r"^dsm-agent-syncd \d+\.\d+\.\d+\S*\n\Z", r.stdout), r.stdout
    r = d.run("--help", timeout=10)
    assert r.returncode == 0, r.stderr
    for word in ("-c", "--check-config", "--once", "--version", "--help"):
        assert word in r.stdout, word


def _bad_configs(d):
    """(name, config text, the key whose line is reported or None)."""
    good = open(d.config_path).read()
    out = []
    out.append(("unknown_key", good.replace("poll_interval = ", "poll_intervall = ", 1),
                "poll_intervall"))
    out.append(("bad_duration", good.replace("request_timeout = 2s", "request_timeout = 2parsecs"),
                "request_timeout"))
    out.append(("bad_mode", good.replace("settings_mode = 0640", "settings_mode = rw-r-----"),
                "settings_mode"))
    out.append(("unknown_section", good + "\n[bogus]\nx = 1\n", "[bogus]"))
    out.append(("bad_jitter", good.replace("poll_jitter = 0", "poll_jitter = lots"), "poll_jitter"))
    return out


@pytest.mark.parametrize("case", ["unknown_key", "bad_duration", "bad_mode", "unknown_section",
                                  "bad_jitter"])
def test_invalid_config_exits_78_with_file_line(sim_nobroker, daemon_factory, case):
    d = daemon_factory(sim_nobroker, BUSY, start=False)
    name, text, key = [c for c in _bad_configs(d) if c[0] == case][0]
    d.write_config(text)
    line = line_of(text, key)
    for args in ((), ("--check-config",)):
        r = d.run(*args, timeout=15)
        assert r.returncode == 78, (args, r.returncode, r.stderr)
        assert "%s:%d: " % (d.config_path, line) in r.stderr, (args, r.stderr)
    assert not os.path.exists(d.settings_file)
    assert not os.path.exists(d.state_file)


def test_missing_endpoints_and_lb_exits_78(sim_nobroker, daemon_factory):
    d = daemon_factory(sim_nobroker, {"provider": {"endpoints": None}}, start=False)
    r = d.run(timeout=15)
    assert r.returncode == 78, r.stderr
    assert re.search(r"^%s:\d+: .+" % re.escape(d.config_path), r.stderr, re.M), r.stderr


def test_check_config_ok(sim_nobroker, daemon_factory):
    d = daemon_factory(sim_nobroker, BUSY, start=False)
    r = d.run("--check-config", timeout=15)
    assert r.returncode == 0, r.stderr
    assert not os.path.exists(d.settings_file)  # validates only
    assert sim_nobroker.counters("p1").get("requests", 0) == 0


def test_corrupt_state_file_is_fatal_exit_1(sim_nobroker, daemon_factory):
    d = daemon_factory(sim_nobroker, BUSY, start=False)
    with open(d.state_file, "w") as f:
        f.write('{"version": 1, "epoch": ')
    r = d.run(timeout=15)
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert d.state_file in r.stderr
    assert not os.path.exists(d.settings_file)


# ----- --once -----------------------------------------------------------------

def test_once_commits_and_prints_one_line(sim_nobroker, daemon_factory):
    s = sim_nobroker
    d = daemon_factory(s, BUSY, start=False)
    t0 = time.monotonic()
    r = d.run("--once", timeout=30)
    took = time.monotonic() - t0
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 1 and r.stdout.endswith("\n"), r.stdout
    assert re.search(r"\bp1\b", lines[0]) and re.search(r"\bepoch 1\b", lines[0]), lines[0]
    assert d.settings_text() == expected_settings(s, "p1", 1)
    assert d.read_state()["epoch"] == 1
    runs = d.on_change_runs()
    assert len(runs) == 1 and runs[0]["env"]["DSM_EPOCH"] == "1"
    # a second --once with nothing new: still 0, no rewrite
    ino = os.stat(d.settings_file).st_ino
    r = d.run("--once", timeout=30)
    assert r.returncode == 0 and len(r.stdout.splitlines()) == 1, (r.stdout, r.stderr)
    assert os.stat(d.settings_file).st_ino == ino
    print("\n--once took %.2fs" % took)


def test_once_fails_when_no_node_answers(sim_nobroker, daemon_factory):
    s = sim_nobroker
    for nid in ("p1", "p2", "p3"):
        s.kill(nid)
    d = daemon_factory(s, BUSY, start=False)
    t0 = time.monotonic()
    r = d.run("--once", timeout=30)
    took = time.monotonic() - t0
    assert r.returncode not in (0, 78), (r.returncode, r.stdout, r.stderr)
    assert r.returncode > 0  # an exit, not a crash
    assert len(r.stdout.splitlines()) <= 1, r.stdout
    assert not os.path.exists(d.settings_file)
    assert took < 15, took


def test_once_follows_a_promotion_made_while_stopped(sim_nobroker, daemon_factory):
    s = sim_nobroker
    d = daemon_factory(s, BUSY, start=False)
    assert d.run("--once", timeout=30).returncode == 0
    s.kill("p1")
    s.promote("p2", event=False)
    r = d.run("--once", timeout=30)
    assert r.returncode == 0, r.stderr
    assert "p2" in r.stdout and "epoch 2" in r.stdout, r.stdout
    assert d.settings_text() == expected_settings(s, "p2", 2)


# ----- signals ----------------------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stop_signal_exits_0_quickly(sim_nobroker, daemon_factory, sig):
    d = daemon_factory(sim_nobroker, BUSY)
    d.wait_for_primary("p1", 1, timeout=15)
    t0 = time.monotonic()
    d.signal(sig)
    rc = d.wait_exit(10)
    took = time.monotonic() - t0
    assert rc == 0, d.log_tail()
    assert took < 3.0, took
    # the settings file is intact after the stop
    assert d.settings_text() == expected_settings(sim_nobroker, "p1", 1)


def test_sighup_good_config_settings_mode(sim_nobroker, daemon_factory):
    s = sim_nobroker
    d = daemon_factory(s, QUIET)
    d.wait_for_primary("p1", 1, timeout=15)
    poll_now(d, 1)
    text = d.settings_text()
    assert mode_of(d.settings_file) == 0o640
    # settings_mode: the file is rewritten at once with the new mode
    mark = d.log_mark()
    d.reconfigure({"broker": {"settings_mode": "0600"}})
    d.wait_for_log(r"Configuration reloaded", 10, start=mark)
    deadline = time.monotonic() + 10
    while mode_of(d.settings_file) != 0o600:
        assert time.monotonic() < deadline, "settings file mode still %o" % mode_of(d.settings_file)
        time.sleep(0.05)
    assert d.settings_text() == text
    assert not mid_lines(d, MID_CONFIG_REJECTED)
    # a settings_file path change: the new file is written at once
    new_path = os.path.join(d.workdir, "moved.ini")
    mark = d.log_mark()
    d.reconfigure({"broker": {"settings_file": new_path}})
    d.wait_for_log(r"Configuration reloaded", 10, start=mark)
    deadline = time.monotonic() + 10
    while not os.path.exists(new_path):
        assert time.monotonic() < deadline, "settings file not written at the new path"
        time.sleep(0.05)
    with open(new_path) as f:
        assert f.read() == text
    assert mode_of(new_path) == 0o600
    # a later promotion goes to the new path; the old file is left alone
    s.promote("p2", event=False)
    poll_now(d)
    d.settings_file = new_path
    d.wait_for_primary("p2", 2, timeout=10)
    assert d.read_state()["epoch"] == 2


def test_sighup_poll_interval_takes_effect(sim_nobroker, daemon_factory):
    """poll_interval 30s -> 1s by SIGHUP: a promotion is followed without any
    event or notify within a few seconds (old config: 30 s). Regression test:
    the fast-poll backoff of the old config used to survive the reload."""
    s = sim_nobroker
    d = daemon_factory(s, QUIET)
    d.wait_for_primary("p1", 1, timeout=15)
    poll_now(d, 1)
    mark = d.log_mark()
    before = polls(d)
    d.reconfigure({"provider": {"poll_interval": "1s", "fast_poll_interval": "200ms"}})
    d.wait_for_log(r"Configuration reloaded", 10, start=mark)
    wait_polls(d, before + 1, timeout=10)  # the round the reload starts
    t0 = time.monotonic()
    s.promote("p2", event=False)
    d.wait_for_primary("p2", 2, timeout=6)
    print("\nafter SIGHUP poll_interval 1s: promote followed in %.2fs" % (time.monotonic() - t0))


def test_sighup_bad_config_rejected_old_kept(sim_nobroker, daemon_factory):
    s = sim_nobroker
    d = daemon_factory(s, QUIET)
    d.wait_for_primary("p1", 1, timeout=15)
    poll_now(d, 1)
    good = open(d.config_path).read()
    bad = good.replace("settings_mode = 0640", "settings_mode = 0600").replace(
        "request_timeout = 2s", "request_timeout = 2s\nrequest_timeot = 3s")
    line = line_of(bad, "request_timeot")
    mark = d.log_mark()
    d.write_config(bad)
    d.signal(signal.SIGHUP)
    m = d.wait_for_log(r"MESSAGE_ID=%s" % MID_CONFIG_REJECTED, 10, start=mark)
    rejected = [ln for ln in d.log_lines()[mark:] if MID_CONFIG_REJECTED in ln]
    assert len(rejected) == 1
    assert "%s:%d: " % (d.config_path, line) in rejected[0], rejected[0]
    assert "PRIORITY=err" in rejected[0]
    assert m and d.alive()
    code, doc = d.status()  # the listener still answers
    assert code == 200 and doc["epoch"] == 1
    # the old configuration stays whole: mode 0640, also on the next rewrite
    assert mode_of(d.settings_file) == 0o640
    s.promote("p2", event=False)
    poll_now(d)
    d.wait_for_primary("p2", 2, timeout=10)
    assert mode_of(d.settings_file) == 0o640
    # and a good config after the bad one is taken
    mark = d.log_mark()
    d.write_config(good.replace("settings_mode = 0640", "settings_mode = 0600"))
    d.signal(signal.SIGHUP)
    d.wait_for_log(r"Configuration reloaded", 10, start=mark)
    deadline = time.monotonic() + 10
    while mode_of(d.settings_file) != 0o600:
        assert time.monotonic() < deadline
        time.sleep(0.05)


# ----- systemd notify socket and watchdog ---------------------------------------

def test_notify_socket_ready_status_and_watchdog(sim_nobroker, daemon_factory, notify_socket):
    s = sim_nobroker
    ns = notify_socket
    d = daemon_factory(s, BUSY, notify_socket=ns, watchdog_usec=1_000_000, watchdog_pid=True)
    ns.wait_ready(10)
    ns.wait_status(r"\bprimary p1\b.*\bepoch 1\b", timeout=15)
    s.promote("p2", event=False)
    ns.wait_status(r"\bprimary p2\b.*\bepoch 2\b", timeout=15)
    d.wait_for_primary("p2", 2, timeout=10)

    # WATCHDOG=1 at about half of WATCHDOG_USEC (1 s)
    start = len(ns.watchdog_times())
    deadline = time.monotonic() + 10
    while len(ns.watchdog_times()) < start + 6:
        assert time.monotonic() < deadline, ns.watchdog_times()
        time.sleep(0.05)
    iv = ns.watchdog_intervals()[start:]
    med = statistics.median(iv)
    print("\nwatchdog intervals (WATCHDOG_USEC 1s): median %.3fs %s"
          % (med, " ".join("%.2f" % x for x in iv)))
    assert 0.3 <= med <= 0.75, iv
    assert max(iv) < 1.0, iv  # never late enough for systemd to kill it

    # frozen: no pings; after SIGCONT: pings again
    t_stop = time.monotonic()
    d.signal(signal.SIGSTOP)
    try:
        frozen = threading.Event()
        frozen.wait(2.5)  # the frozen period itself is what is observed
    finally:
        t_cont = time.monotonic()
        d.signal(signal.SIGCONT)
    during = [t for t in ns.watchdog_times() if t_stop + 0.2 < t < t_cont]
    assert during == [], during
    ns.wait_for(lambda m: m.fields.get("WATCHDOG") == "1" and m.t > t_cont, timeout=3)
    # and it still works
    s.promote("p3", event=False)
    ns.wait_status(r"\bprimary p3\b.*\bepoch 3\b", timeout=15)

    # stop: STOPPING=1, exit 0
    d.signal(signal.SIGTERM)
    assert d.wait_exit(10) == 0
    assert any(m.fields.get("STOPPING") == "1" for m in ns.snapshot())


def test_sighup_sends_reloading_then_ready(sim_nobroker, daemon_factory, notify_socket):
    ns = notify_socket
    d = daemon_factory(sim_nobroker, QUIET, notify_socket=ns)
    ns.wait_ready(10)
    d.wait_for_primary("p1", 1, timeout=15)
    n0 = ns.count()
    d.signal(signal.SIGHUP)
    ns.wait_field("RELOADING", "1", timeout=10, start=n0)
    ns.wait_for(lambda m: m.fields.get("READY") == "1", 10, start=n0 + 1)


# ----- restarts keep the epoch ------------------------------------------------

def test_restart_keeps_epoch_never_lower(sim_nobroker, sim_factory, daemon_factory):
    s = sim_nobroker
    d = daemon_factory(s, BUSY)
    d.wait_for_primary("p1", 1, timeout=15)
    s.promote("p2", event=False)
    d.wait_for_primary("p2", 2, timeout=15)
    assert d.stop() == 0

    # promoted while the daemon is down
    s.promote("p3", event=False)
    d.start()
    s_now = d.read_settings()
    assert int(s_now["provider"]["epoch"]) >= 2
    d.wait_for_primary("p3", 3, timeout=15)
    assert d.read_state()["epoch"] == 3
    assert d.stop() == 0

    # restart with no change: same epoch, the settings file is not rewritten
    ino = os.stat(d.settings_file).st_ino
    text = d.settings_text()
    d.start()
    poll_now(d, 2)
    assert d.settings_text() == text
    assert os.stat(d.settings_file).st_ino == ino
    assert d.read_state()["epoch"] == 3
    assert d.stop() == 0

    # pointed at another cluster that is at epoch 1 (the old one gone):
    # never back to a lower epoch
    s.stop()
    other = sim_factory(brokers={nid: ("127.0.0.1", 1) for nid in ("p1", "p2", "p3")})
    d.reconfigure({"provider": {"endpoints": ", ".join(other.urls[k] for k in sorted(other.urls)),
                                "poll_interval": "30s", "fast_poll_interval": "30s"}},
                  reload=False)
    d.start()
    poll_now(d, 3)
    assert d.settings_text() == text
    assert d.read_state()["epoch"] == 3
    code, doc = d.status()
    assert doc["epoch"] == 3 and doc["primary"]["id"] == "p3"
    assert any("stale primary" in w and "p1" in w for w in doc["warnings"]), doc["warnings"]
    assert len(mid_lines(d, MID_COMMITTED)) == 3  # epochs 1, 2, 3 only


# ----- the "Done when": SIGKILL loop ------------------------------------

class SettingsReader(threading.Thread):
    """Reads the settings file in a tight, bounded loop; records violations.
    Starts no processes (only the main thread does)."""

    def __init__(self, path, sim_urls, brokers, max_seconds):
        super().__init__(name="settings-reader", daemon=True)
        self.path = path
        self.urls = sim_urls
        self.brokers = brokers
        self.max_seconds = max_seconds
        self.stop_ev = threading.Event()
        self.reads = 0
        self.max_epoch = 0
        self.epochs_seen = set()
        self.errors = []
        self.seen_file = False

    def run(self):
        deadline = time.monotonic() + self.max_seconds
        while not self.stop_ev.is_set() and time.monotonic() < deadline and len(self.errors) < 20:
            try:
                with open(self.path, "rb") as f:
                    raw = f.read()
            except FileNotFoundError:
                if self.seen_file:
                    self.errors.append("settings file disappeared")
                time.sleep(0.001)
                continue
            self.seen_file = True
            self.reads += 1
            try:
                text = raw.decode()
            except UnicodeDecodeError:
                self.errors.append("not UTF-8: %r" % raw[:200])
                continue
            m = SETTINGS_RE.match(text)
            if not m:
                self.errors.append("partial or malformed read: %r" % text)
                continue
            ep = int(m.group("epoch"))
            nid = m.group("primary_id")
            if ep < self.max_epoch:
                self.errors.append("epoch went back from %d to %d" % (self.max_epoch, ep))
            if self.urls.get(nid) != m.group("api_url"):
                self.errors.append("api_url %s does not belong to %s" % (m.group("api_url"), nid))
            if self.brokers.get(nid) != (m.group("host"), int(m.group("port"))):
                self.errors.append("broker of %s wrong: %s:%s" % (nid, m.group("host"), m.group("port")))
            self.max_epoch = max(self.max_epoch, ep)
            self.epochs_seen.add(ep)
            time.sleep(0.0005)


class Promoter(threading.Thread):
    """Moves the Primary every few hundred milliseconds (simulator control
    calls only)."""

    def __init__(self, sim, period, max_seconds):
        super().__init__(name="promoter", daemon=True)
        self.sim = sim
        self.period = period
        self.max_seconds = max_seconds
        self.stop_ev = threading.Event()
        self.count = 0
        self.last = None
        self.error = None

    def run(self):
        order = ["p2", "p3", "p1"]
        deadline = time.monotonic() + self.max_seconds
        try:
            while not self.stop_ev.wait(self.period) and time.monotonic() < deadline:
                self.last = self.sim.promote(order[self.count % 3], event=False)
                self.count += 1
        except Exception as e:  # reported by the test
            self.error = e


def crash(d, timeout=5.0):
    """SIGKILL the daemon like a crash and wait until every process of its
    session is gone, as systemd does for the unit's cgroup before a restart
    (harness Daemon.kill() SIGKILLs the group but does not wait for it)."""
    from harness import util
    sid = d.proc.pid
    d.kill()
    deadline = time.monotonic() + timeout
    while True:
        left = [p for p in util.pids_in_session(sid) if p[2] != "Z"]
        if not left:
            return
        assert time.monotonic() < deadline, "left after SIGKILL: %r" % left
        for pid, _, _ in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.01)


def test_sigkill_loop_never_partial_never_older(sim_nobroker, daemon_factory):
    s = sim_nobroker
    st = s.state()["nodes"]
    brokers = {nid: (n["broker"]["host"], n["broker"]["port"]) for nid, n in st.items()}
    d = daemon_factory(s, {"provider": {"poll_interval": "1s", "fast_poll_interval": "100ms",
                                        "request_timeout": "2s"}})
    d.wait_for_primary("p1", 1, timeout=15)
    reader = SettingsReader(d.settings_file, dict(s.urls), brokers, max_seconds=150)
    promoter = Promoter(s, period=0.3, max_seconds=150)
    reader.start()
    promoter.start()
    rng = random.Random(12)
    kills = 0
    state_epochs = []
    t_begin = time.monotonic()
    try:
        for i in range(25):
            time.sleep(rng.uniform(0.05, 0.9))  # a random instant to crash at
            crash(d)
            kills += 1
            with open(d.state_file) as f:
                doc = json.load(f)  # must always be complete JSON
            state_epochs.append(doc["epoch"])
            assert state_epochs == sorted(state_epochs), state_epochs
            assert not reader.errors, reader.errors[:5]
            d.start(timeout=15)
    finally:
        promoter.stop_ev.set()
        promoter.join(10)
    assert promoter.error is None, promoter.error
    final = s.state()
    d.wait_for_primary(final["primary_id"], final["epoch"], timeout=20)
    reader.stop_ev.set()
    reader.join(10)
    took = time.monotonic() - t_begin
    known = {"agent-sync.ini", "rabbitmq.ini", "state.json", "daemon.log", "daemon.stdout",
             "on_change", "on_change.jsonl", "apply-update", "provider.token", "notify.token",
             "broker.password", "VERSION", "updates"}
    leftovers = sorted(set(os.listdir(d.workdir)) - known)
    print("\nSIGKILL loop: %d kills in %.1fs, %d promotions, %d reads, %d distinct epochs "
          "seen by the reader, state epochs %s, leftover temp files %s"
          % (kills, took, promoter.count, reader.reads, len(reader.epochs_seen),
             state_epochs, leftovers))
    assert not reader.errors, reader.errors[:5]
    assert reader.reads > 100
    assert len(reader.epochs_seen) > 5  # it did move while being killed
    assert d.read_state()["epoch"] == final["epoch"]
    assert d.settings_text() == expected_settings(s, final["primary_id"], final["epoch"])
