#!/usr/bin/python3
"""Whole-process fault tests of dsm-agent-syncd (issue 8).

Every fault is injected from outside the real daemon: a full or read-only
tmpfs under the settings file, SIGKILL at random moments, misbehaving
Provider nodes (the simulator's hang/fail modes), a broker blackholed by an
nft drop rule inside a network namespace the test creates, SIGSTOP of the
daemon, a CLOCK_MONOTONIC offset (time namespace), and on_change hooks that
hang or fail. docs/reliability.md lists each one with what the daemon does.

Run: DSM_BUILD_DIR=$PWD/build /usr/bin/python3 -m pytest -q -p no:cacheprovider \
         tests/integration/test_faults.py
Knobs: DSM_FAULT_KILLS (SIGKILL iterations, default 16).
"""

import contextlib
import errno
import json
import os
import random
import re
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from harness import daemon as daemon_mod  # noqa: E402
from harness import util  # noqa: E402
from harness.daemon import SETTINGS_HEADER, parse_settings  # noqa: E402

REPO = util.REPO_ROOT
TMP_RE = re.compile(r"^\..+\.tmp-")


# ----- helpers ----------------------------------------------------------------


def run(cmd, check=True, timeout=15):
    p = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                       timeout=timeout)
    if check and p.returncode != 0:
        raise RuntimeError("%s failed (%d): %s%s" % (cmd, p.returncode, p.stdout, p.stderr))
    return p


@contextlib.contextmanager
def tmpfs(path, size="256k"):
    """A small tmpfs mounted at path; always unmounted."""
    os.makedirs(path, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs")
    r = run(["mount", "-t", "tmpfs", "-o", "size=%s,mode=0755" % size, "dsmh14", path], check=False)
    if r.returncode != 0:
        pytest.skip("cannot mount tmpfs: %s" % r.stderr.strip())
    try:
        yield path
    finally:
        if run(["umount", path], check=False).returncode != 0:
            run(["umount", "-l", path], check=False)


def fill(directory, name="filler"):
    """Writes a file until the file system is full; returns its path."""
    p = os.path.join(directory, name)
    chunk = b"\0" * 4096
    with open(p, "wb", buffering=0) as f:
        for _ in range(1 << 20):  # bounded: 4 GiB at most
            try:
                f.write(chunk)
            except OSError as e:
                if e.errno == errno.ENOSPC:
                    break
                raise
    with pytest.raises(OSError) as ei:
        with open(os.path.join(directory, ".probe"), "wb", buffering=0) as f:
            f.write(chunk)
    assert ei.value.errno == errno.ENOSPC
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(directory, ".probe"))
    return p


def temp_files(directory):
    try:
        return sorted(x for x in os.listdir(directory) if TMP_RE.match(x))
    except FileNotFoundError:
        return []


def read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def vm_kib(pid, key="VmRSS"):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def is_sanitized(binary):
    if os.environ.get("DSM_SANITIZE") == "1":
        return True
    try:
        with open(binary, "rb") as f:
            return b"__asan_init" in f.read()
    except OSError:
        return False


def settings_complete(text):
    """A settings file is whole: the header, both sections, every key."""
    assert text.startswith(SETTINGS_HEADER + "\n"), repr(text)
    assert text.endswith("\n"), repr(text)
    s = parse_settings(text)
    assert set(s) == {"rabbitmq", "provider"}, s
    assert set(s["rabbitmq"]) == {"host", "port", "vhost", "tls"}, s
    assert set(s["provider"]) == {"primary_id", "epoch", "api_url"}, s
    return s


def restart(d, attempts=3):
    """d.start() after a kill. The harness picks the notify port once (a port
    free a moment ago, in the ephemeral range); on a busy shared machine
    another process's outgoing connection can take it while the daemon is
    down (EADDRINUSE). Then the test moves the listener to a new port."""
    for i in range(attempts):
        try:
            return d.start()
        except RuntimeError:
            d.stop()
            if i == attempts - 1 or "Address already in use" not in "\n".join(d.log_lines()[-3:]):
                raise
            d.apply_overrides({"notify": {"listen": "127.0.0.1:%d" % util.free_port()}})
            d.write_config()


def warnings_match(doc, rx):
    return any(re.search(rx, w) for w in doc.get("warnings", []))


def node_entry(doc, nid):
    for n in doc.get("nodes", []):
        if n.get("id") == nid:
            return n
    return None


# ----- settings directory full / read-only ------------------------------------


def _settings_fault(tmp_path, sim, daemon_factory, notify_socket, inject, heal, errtext):
    mnt = str(tmp_path / "mnt")
    with tmpfs(mnt):
        settings = os.path.join(mnt, "rabbitmq.ini")
        d = daemon_factory(sim=sim, notify_socket=notify_socket, start=False,
                           overrides={"broker": {"settings_file": settings},
                                      "provider": {"poll_interval": "2s"}})
        d.settings_file = settings
        try:
            d.start()
            d.wait_for_primary("p1", 1, timeout=15)
            old = read_bytes(settings)
            old_mode = os.stat(settings).st_mode & 0o7777
            util.wait_until(lambda: len(d.on_change_runs()) == 1, 10, what="on_change for epoch 1")
            runs0 = 1
            filler = inject(mnt)
            mark = d.log_mark()
            sim.promote("p2", event=False)
            assert d.notify({"reason": "h14 fault"})[0] == 202
            m = d.wait_for_log(r"Cannot write settings file .*keeping the old one.*" + errtext,
                               timeout=15, start=mark)
            assert m
            # the commit itself happened: the state file (elsewhere) moved on
            util.wait_until(lambda: (d.read_state() or {}).get("epoch") == 2, 10,
                            what="state file at epoch 2")
            doc = d.wait_for_status(
                lambda doc: warnings_match(doc, r"settings file .* not written: " + errtext), 10)
            assert doc["epoch"] == 2 and doc["primary"]["id"] == "p2"
            util.wait_until(lambda: "settings write failed: " in (notify_socket.latest_status() or ""),
                            10, what="STATUS= with the write failure")
            assert re.search(errtext, notify_socket.latest_status())
            # the old file is intact, byte for byte, and no temp file is left
            time.sleep(1.5)  # at least one retry happens meanwhile (1 s backoff)
            assert read_bytes(settings) == old
            assert os.stat(settings).st_mode & 0o7777 == old_mode
            assert temp_files(mnt) == []
            assert len(d.on_change_runs()) == runs0  # nothing changed: no hook
            retries = [x for x in d.log_lines()[mark:] if "Cannot write settings" in x]
            assert len(retries) == 1, "the error is logged once, not per retry: %r" % retries
            # healing is the only action: no promote, no notify, no signal
            heal(mnt, filler)
            d.wait_for_primary("p2", 2, timeout=40)
            settings_complete(d.settings_text())
            d.wait_for_log(r"Settings file .* is current again", timeout=5, start=mark)
            assert temp_files(mnt) == []
            d.wait_for_status(lambda doc: not warnings_match(doc, r"not written"), 15)
            util.wait_until(lambda: "settings write failed" not in (notify_socket.latest_status() or ""),
                            15, what="STATUS= without the failure")
            util.wait_until(lambda: len(d.on_change_runs()) > runs0, 10, what="on_change after the write")
            assert d.on_change_runs()[-1]["env"]["DSM_EPOCH"] == "2"
        finally:
            d.stop()


def test_settings_dir_full(tmp_path, sim_nobroker, daemon_factory, notify_socket):
    def inject(mnt):
        return fill(mnt)

    def heal(mnt, filler):
        os.unlink(filler)

    _settings_fault(tmp_path, sim_nobroker, daemon_factory, notify_socket, inject, heal,
                    "No space left on device")


def test_settings_dir_read_only(tmp_path, sim_nobroker, daemon_factory, notify_socket):
    def inject(mnt):
        run(["mount", "-o", "remount,ro", mnt])
        return None

    def heal(mnt, filler):
        run(["mount", "-o", "remount,rw", mnt])

    _settings_fault(tmp_path, sim_nobroker, daemon_factory, notify_socket, inject, heal,
                    "Read-only file system")


def test_state_dir_full_no_epoch_regression(tmp_path, sim_nobroker, daemon_factory):
    """The state file on a full tmpfs while the Primary moves, then a
    restart while the Provider is unreachable: the settings file must never
    go back to a lower epoch (contract 3: the committed pair survives
    restarts; section 5/issue: no lower epoch)."""
    s = sim_nobroker
    mnt = str(tmp_path / "mnt")
    with tmpfs(mnt):
        state = os.path.join(mnt, "state.json")
        d = daemon_factory(sim=s, start=False, overrides={"daemon": {"state_file": state},
                                                         "provider": {"poll_interval": "1s"}})
        d.state_file = state
        try:
            d.start()
            d.wait_for_primary("p1", 1, timeout=15)
            util.wait_until(lambda: (d.read_state() or {}).get("epoch") == 1, 10, what="state epoch 1")
            filler = fill(mnt)
            s.promote("p2", event=False)
            d.notify()
            # The commit waits for the state file: nothing acts on epoch 2
            # before it is durable (a restart could otherwise go back).
            d.wait_for_status(lambda st: any("state file" in w for w in st.get("warnings", [])),
                              timeout=15)
            assert int(settings_complete(d.settings_text())["provider"]["epoch"]) == 1
            os.unlink(filler)
            d.wait_for_primary("p2", 2, timeout=15)
            assert d.read_state()["epoch"] == 2
            filler = fill(mnt)
            d.kill()
            os.unlink(filler)
            for n in ("p1", "p2", "p3"):
                s.kill(n)
            restart(d)
            time.sleep(3)
            se = settings_complete(d.settings_text())
            assert int(se["provider"]["epoch"]) >= 2, (
                "settings file went back to epoch %s (state file: %r)"
                % (se["provider"]["epoch"], d.read_state()))
        finally:
            d.stop()


# ----- SIGKILL during settings and state writes --------------------------------


def test_sigkill_during_writes(sim_nobroker, daemon_factory):
    """Kills the daemon at random moments right after a promotion (the
    commit writes the state file, then the settings file). Every file is
    always whole, epochs never go down, leftovers are swept at start."""
    s = sim_nobroker
    iterations = int(os.environ.get("DSM_FAULT_KILLS", "16"))
    rnd = random.Random(int(os.environ.get("DSM_FAULT_SEED", str(int(time.time())))))
    d = daemon_factory(sim=s, overrides={"provider": {"poll_interval": "1s"}})
    wd = d.workdir
    d.wait_for_primary("p1", 1, timeout=15)
    prev_state = prev_settings = 1
    epoch, leftovers = 1, 0
    order = ["p2", "p3", "p1"]
    for i in range(iterations):
        nxt = order[i % 3]
        s.promote(nxt, event=False)
        epoch += 1
        try:
            d.notify({"reason": "kill %d" % i})
        except OSError:
            pass
        time.sleep(rnd.uniform(0, 0.06))
        d.kill()
        # no partial file, no lower epoch
        st = d.read_state()
        assert isinstance(st, dict)
        st_epoch = int(st["epoch"])
        se = settings_complete(d.settings_text())
        se_epoch = int(se["provider"]["epoch"])
        assert st_epoch >= prev_state and se_epoch >= prev_settings, (i, st_epoch, se_epoch)
        assert se_epoch <= st_epoch <= epoch, "settings are written after the state file"
        prev_state, prev_settings = st_epoch, se_epoch
        leftovers += len(temp_files(wd))
        # the next start sweeps leftovers and catches up
        restart(d)
        d.wait_for_primary(nxt, epoch, timeout=15)
        util.wait_until(lambda: (d.read_state() or {}).get("epoch") == epoch, 10,
                        what="state at epoch %d" % epoch)
        assert temp_files(wd) == [], "leftover temp files after a start"
        prev_state = prev_settings = epoch
    sys.stderr.write("\nsigkill: %d iterations, %d leftover temp files seen after kills\n"
                     % (iterations, leftovers))
    assert d.stop() == 0


def test_sweep_of_planted_temp_files(sim_nobroker, daemon_factory):
    """Leftovers of a crash (any `.<base>.tmp-*`) are removed at start;
    other files in the directory are not touched."""
    d = daemon_factory(sim=sim_nobroker, start=False)
    wd = d.workdir
    planted = [".rabbitmq.ini.tmp-AbC123", ".state.json.tmp-XyZ789"]
    for p in planted + ["keep.tmp-1", ".other.tmp"]:
        with open(os.path.join(wd, p), "w") as f:
            f.write("partial")
    d.start()
    d.wait_for_primary("p1", 1, timeout=15)
    util.wait_until(lambda: temp_files(wd) == [".other.tmp"] or temp_files(wd) == [], 10,
                    what="planted temp files swept")
    assert os.path.exists(os.path.join(wd, "keep.tmp-1"))
    assert os.path.exists(os.path.join(wd, ".other.tmp"))


# ----- misbehaving Provider nodes ----------------------------------------------


def test_bad_provider_nodes(sim_factory, daemon_factory):
    """Nodes that hang after accepting, reset mid-body, answer 500 or 10 MiB:
    the daemon follows the Primary through the healthy nodes, shows each
    error, and its memory stays small (the body limit is 1 MiB)."""
    s = sim_factory(brokers={nid: ("127.0.0.1", util.closed_port())
                             for nid in ("p1", "p2", "p3", "p4")}, nodes=4)
    d = daemon_factory(sim=s, overrides={"provider": {"poll_interval": "1s",
                                                      "request_timeout": "1s"}})
    d.wait_for_primary("p1", 1, timeout=15)
    sanitized = is_sanitized(d.binary)
    rss0 = vm_kib(d.pid)

    def errors_shown(faulty):
        def pred(doc):
            return all(node_entry(doc, n) and node_entry(doc, n).get("error") for n in faulty)
        return pred

    # phase 1: p3 hangs, p4 answers 10 MiB; p2 is promoted
    s.hang("p3", True)
    s.fail("p4", "huge")
    s.promote("p2", event=False)
    d.notify()
    d.wait_for_primary("p2", 2, timeout=20)
    doc = d.wait_for_status(errors_shown(["p3", "p4"]), 20)
    sys.stderr.write("\nerrors: p3=%r p4=%r\n" % (node_entry(doc, "p3")["error"],
                                                 node_entry(doc, "p4")["error"]))
    assert node_entry(doc, "p2")["error"] is None

    # phase 2: p3 back to normal; p1 answers 500, p4 resets mid-body; p3 promoted
    s.hang("p3", False)
    s.fail("p4", "reset")
    s.fail("p1", "500")
    s.promote("p3", event=False)
    d.notify()
    d.wait_for_primary("p3", 3, timeout=20)
    doc = d.wait_for_status(errors_shown(["p1", "p4"]), 20)
    sys.stderr.write("errors: p1=%r p4=%r\n" % (node_entry(doc, "p1")["error"],
                                               node_entry(doc, "p4")["error"]))
    assert re.search(r"500", node_entry(doc, "p1")["error"])
    assert node_entry(doc, "p3")["error"] is None

    # phase 3: three nodes answer 10 MiB for many rounds; memory stays bounded
    for n in ("p1", "p2", "p4"):
        s.fail(n, "huge")
    s.promote("p3", event=False)  # epoch 4, p3 confirms itself
    d.notify()
    d.wait_for_primary("p3", 4, timeout=20)
    polls0 = d.status()[1]["counters"]["polls"]
    deadline = time.monotonic() + 60
    peak = 0
    while d.status()[1]["counters"]["polls"] < polls0 + 15 and time.monotonic() < deadline:
        d.notify()
        peak = max(peak, vm_kib(d.pid))
        time.sleep(0.1)
    assert d.status()[1]["counters"]["polls"] >= polls0 + 15, "polls stalled"
    peak = max(peak, vm_kib(d.pid), vm_kib(d.pid, "VmHWM"))
    sys.stderr.write("VmRSS at start %d KiB, peak %d KiB (sanitized=%s)\n" % (rss0, peak, sanitized))
    if not sanitized:
        assert peak < 30 * 1024, "VmRSS/VmHWM %d KiB with 10 MiB answers" % peak
    doc = d.wait_for_status(errors_shown(["p1", "p2", "p4"]), 10)
    # all healthy again: errors clear, the daemon keeps following
    for n in ("p1", "p2", "p4"):
        s.fail(n, "none")
    s.promote("p1", event=False)
    d.notify()
    d.wait_for_primary("p1", 5, timeout=20)
    d.wait_for_status(lambda doc: all(node_entry(doc, n) and node_entry(doc, n).get("error") is None
                                      for n in ("p1", "p2", "p3", "p4")), 20)
    assert d.alive()
    assert d.stop() == 0


# ----- the broker blackholed (nft drop inside the daemon's network namespace) --


class Forwarder:
    """A TCP forwarder (one thread): listen on (host, port) in the root
    namespace, forward each connection to target."""

    def __init__(self, host, target):
        self.target = target
        self.lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind((host, 0))
        self.lsock.listen(64)
        self.lsock.setblocking(False)
        self.port = self.lsock.getsockname()[1]
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.lsock, selectors.EVENT_READ, None)
        self.stop_ev = threading.Event()
        self.socks = set()
        self.thread = threading.Thread(target=self._run, daemon=True, name="h14-forwarder")
        self.thread.start()

    def _close_pair(self, a, b):
        for x in (a, b):
            with contextlib.suppress(Exception):
                self.sel.unregister(x)
            with contextlib.suppress(Exception):
                x.close()
            self.socks.discard(x)

    def _run(self):
        while not self.stop_ev.is_set():
            for key, _ in self.sel.select(0.1):
                if key.data is None:
                    try:
                        c, _ = self.lsock.accept()
                    except OSError:
                        continue
                    try:
                        u = socket.create_connection(self.target, timeout=3)
                    except OSError:
                        c.close()
                        continue
                    c.setblocking(True)
                    u.setblocking(True)
                    c.settimeout(5)
                    u.settimeout(5)
                    self.socks.update((c, u))
                    self.sel.register(c, selectors.EVENT_READ, (c, u))
                    self.sel.register(u, selectors.EVENT_READ, (u, c))
                    continue
                src, dst = key.data
                try:
                    data = src.recv(65536)
                    if data:
                        dst.sendall(data)
                except OSError:
                    data = b""
                if not data:
                    self._close_pair(src, dst)
        for x in list(self.socks):
            with contextlib.suppress(Exception):
                x.close()
        with contextlib.suppress(Exception):
            self.lsock.close()

    def stop(self):
        self.stop_ev.set()
        self.thread.join(5)


@contextlib.contextmanager
def daemon_netns():
    """A network namespace with a veth to the root namespace. Yields
    (name, root-side address, namespace-side address)."""
    if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("nft"):
        pytest.skip("needs root, iproute2 and nftables")
    tag = "%d%03d" % (os.getpid() % 10000, random.randrange(1000))
    ns, va, vb = "dsmh14-" + tag, "h14a" + tag, "h14b" + tag
    used = run(["ip", "-o", "-4", "addr"], check=False).stdout
    for _ in range(50):
        a, b = random.randrange(200, 250), random.randrange(256)
        net = "10.%d.%d." % (a, b)
        if net not in used:
            break
    host, inner = net + "1", net + "2"
    try:
        run(["ip", "netns", "add", ns])
        run(["ip", "link", "add", va, "type", "veth", "peer", "name", vb])
        run(["ip", "link", "set", vb, "netns", ns])
        run(["ip", "addr", "add", host + "/30", "dev", va])
        run(["ip", "link", "set", va, "up"])
        run(["ip", "netns", "exec", ns, "ip", "addr", "add", inner + "/30", "dev", vb])
        run(["ip", "netns", "exec", ns, "ip", "link", "set", vb, "up"])
        run(["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"])
        util.wait_until(lambda: util.port_open(host, 9, 0.2) or run(
            ["ip", "netns", "exec", ns, "ping", "-c1", "-W1", host], check=False).returncode == 0
            if shutil.which("ping") else True, 10, interval=0.2, what="veth up")
        yield ns, host, inner
    finally:
        run(["ip", "netns", "exec", ns, "nft", "delete", "table", "inet", "dsmh14"], check=False)
        run(["ip", "link", "del", va], check=False)
        run(["ip", "netns", "del", ns], check=False)


def nft_blackhole(ns, host, ports, on):
    if on:
        ps = ", ".join(str(p) for p in ports)
        script = ("table inet dsmh14 {\n"
                  " chain out { type filter hook output priority 0; policy accept;\n"
                  "  ip daddr %s tcp dport { %s } drop\n }\n"
                  " chain in { type filter hook input priority 0; policy accept;\n"
                  "  ip saddr %s tcp sport { %s } drop\n }\n"
                  "}\n" % (host, ps, host, ps))
        p = subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=script,
                           capture_output=True, text=True, timeout=10)
        assert p.returncode == 0, p.stderr
    else:
        run(["ip", "netns", "exec", ns, "nft", "delete", "table", "inet", "dsmh14"])


def test_broker_blackholed_and_restored(tmp_path, rabbit_ok, sim_factory, daemon_bin):
    """Packets to and from the broker are dropped (nft in the daemon's own
    network namespace): the connection is declared lost within about two
    heartbeats, and it comes back after the rule is deleted. Meanwhile the
    Provider API stays reachable, so a promotion is still followed."""
    with daemon_netns() as (ns, host, inner):
        fw = [Forwarder(host, (r.host, r.port)) for r in rabbit_ok[:2]]
        d = None
        try:
            s = sim_factory(brokers={"p1": (host, fw[0].port), "p2": (host, fw[1].port),
                                     "p3": (host, fw[1].port)},
                            extra_args=("--host", host))
            wrapper = tmp_path / "in-netns"
            wrapper.write_text("#!/bin/sh\nexec ip netns exec %s %s \"$@\"\n" % (ns, daemon_bin))
            wrapper.chmod(0o755)
            port = util.free_port()
            d = daemon_mod.Daemon(str(tmp_path / "d"), sim=s, binary=str(wrapper),
                                  overrides={"notify": {"listen": "%s:%d" % (inner, port),
                                                        "allow": "%s0/30, 127.0.0.0/8" % host[:-1]},
                                             "provider": {"poll_interval": "3s"},
                                             "broker": {"heartbeat": "2s"}})
            d.start(timeout=20)
            d.wait_for_primary("p1", 1, timeout=20)
            d.wait_for_status(lambda doc: doc["broker_connection"] == "connected", 30)
            mark = d.log_mark()
            nft_blackhole(ns, host, [f.port for f in fw], True)
            t0 = time.monotonic()
            d.wait_for_status(lambda doc: doc["broker_connection"] != "connected", 15)
            lost_after = time.monotonic() - t0
            d.wait_for_log(r"broker connection to .* lost", timeout=5, start=mark)
            sys.stderr.write("\nblackhole: loss detected after %.1fs (heartbeat 2s)\n" % lost_after)
            assert lost_after <= 2 * 2 + 2.5, "loss detected after %.1fs" % lost_after
            # the Provider API still answers: a promotion is followed
            s.promote("p2", event=False)
            d.notify()
            d.wait_for_primary("p2", 2, timeout=20)
            time.sleep(1)
            assert d.status()[1]["broker_connection"] != "connected"
            mark = d.log_mark()
            nft_blackhole(ns, host, [f.port for f in fw], False)
            t0 = time.monotonic()
            d.wait_for_status(lambda doc: doc["broker_connection"] == "connected", 45)
            d.wait_for_log(r"broker .*:%d connected" % fw[1].port, timeout=5, start=mark)
            sys.stderr.write("restored: reconnected after %.1fs\n" % (time.monotonic() - t0))
            assert d.stop() == 0
        finally:
            if d is not None:
                d.stop()
            for f in fw:
                f.stop()


# ----- SIGSTOP of the daemon ----------------------------------------------------


def test_daemon_sigstop_longer_than_heartbeat(sim, daemon_factory):
    d = daemon_factory(sim=sim, overrides={"provider": {"poll_interval": "3s"},
                                           "broker": {"heartbeat": "2s"}})
    d.wait_for_primary("p1", 1, timeout=15)
    d.wait_for_status(lambda doc: doc["broker_connection"] == "connected", 30)
    d.signal(signal.SIGSTOP)
    try:
        time.sleep(1)
        sim.promote("p2")  # the event is published while the daemon is frozen
        time.sleep(5)
    finally:
        d.signal(signal.SIGCONT)
    d.wait_for_primary("p2", 2, timeout=20)
    d.wait_for_status(lambda doc: doc["broker_connection"] == "connected"
                      and doc["primary"]["id"] == "p2", 30)
    assert d.http("GET", "/healthz", token="")[0] == 200
    # healthy afterwards: a further promotion is followed through the event
    sim.promote("p3")
    d.wait_for_primary("p3", 3, timeout=15)
    assert d.alive()
    assert d.stop() == 0


# ----- clocks -------------------------------------------------------------------


def test_timers_use_monotonic_clock_sources():
    """Every timer source in the daemon is on CLOCK_MONOTONIC: a jump of
    the wall clock cannot stall or rush polls, heartbeats, timeouts or
    retries. CLOCK_REALTIME is only read for timestamps and for the
    wall-clock parts of the update gate (window, persisted delay)."""
    bad = []
    realtime_reads = []
    for sub in ("agent", "common"):
        for name in sorted(os.listdir(os.path.join(REPO, sub))):
            if not name.endswith(".c"):
                continue
            path = os.path.join(REPO, sub, name)
            with open(path) as f:
                text = f.read()
            for m in re.finditer(r"sd_event_add_time(?:_relative)?\s*\(([^;]*?)\)\s*[;<]", text, re.S):
                args = m.group(1)
                if "CLOCK_MONOTONIC" not in args:
                    bad.append("%s: %s" % (name, " ".join(args.split())[:100]))
            for m in re.finditer(r"\b(timerfd_create|setitimer|alarm|timer_create)\s*\(", text):
                bad.append("%s: %s" % (name, m.group(1)))
            for m in re.finditer(r"pthread_cond_timedwait", text):
                if "pthread_condattr_setclock(&attr, CLOCK_MONOTONIC)" not in text:
                    bad.append("%s: pthread_cond_timedwait on CLOCK_REALTIME" % name)
            for i, line in enumerate(text.splitlines(), 1):
                if "CLOCK_REALTIME" in line:
                    realtime_reads.append("%s:%d" % (name, i))
    assert not bad, bad
    sys.stderr.write("\nCLOCK_REALTIME reads (timestamps/gate): %s\n" % ", ".join(realtime_reads))


def test_timers_fire_under_monotonic_offset(tmp_path, sim_nobroker, daemon_factory, daemon_bin):
    """The daemon runs in a time namespace whose CLOCK_MONOTONIC is 10^9 s
    ahead (unshare --time): polls still come at poll_interval and a
    promotion is followed. The wall clock cannot be changed on a shared
    machine; time namespaces do not offset CLOCK_REALTIME."""
    if not shutil.which("unshare") or not shutil.which("nsenter"):
        pytest.skip("util-linux unshare/nsenter missing")
    holder = subprocess.Popen(["unshare", "--time", "--monotonic", "1000000000", "--fork",
                               "sleep", "300"], stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              start_new_session=True, preexec_fn=util.pdeathsig_term)
    try:
        child = util.wait_until(
            lambda: next((pid for pid, comm, st in util.pids_in_session(holder.pid)
                          if pid != holder.pid and comm == "sleep"), None) or holder.poll() is not None,
            5, what="time namespace holder")
        if child is True:
            pytest.skip("unshare --time failed: %s" % holder.stderr.read().decode(errors="replace"))
        wrapper = tmp_path / "in-timens"
        wrapper.write_text("#!/bin/sh\nexec nsenter -t %d --time -- %s \"$@\"\n" % (child, daemon_bin))
        wrapper.chmod(0o755)
        d = daemon_mod.Daemon(str(tmp_path / "d"), sim=sim_nobroker, binary=str(wrapper),
                              overrides={"provider": {"poll_interval": "1s",
                                                      "fast_poll_interval": "1s"}})
        try:
            d.start()
            assert os.readlink("/proc/%d/ns/time" % d.pid) != os.readlink("/proc/self/ns/time")
            d.wait_for_primary("p1", 1, timeout=15)
            p0 = d.status()[1]["counters"]["polls"]
            t0 = time.monotonic()
            time.sleep(6)
            p1 = d.status()[1]["counters"]["polls"]
            dt = time.monotonic() - t0
            assert dt * 0.6 <= p1 - p0 <= dt + 3, "polls %d in %.1fs at 1s interval" % (p1 - p0, dt)
            sim_nobroker.promote("p2", event=False)
            d.wait_for_primary("p2", 2, timeout=10)  # by the poll timer alone
            assert d.stop() == 0
        finally:
            d.stop()
    finally:
        util.stop_popen(holder, timeout=3)


# ----- on_change that hangs or fails -------------------------------------------


HOOK = """#!/bin/sh
# h14 test hook: the mode file says hang, fail or ok
mode=$(cat %(mode)s 2>/dev/null || echo ok)
sleep 600 &
kid=$!
echo "$$ $kid $DSM_EPOCH $mode $(date +%%s.%%N)" >> %(runs)s
case "$mode" in
  hang) wait $kid ;;
  fail) kill $kid; exit 1 ;;
  *) kill $kid; exit 0 ;;
esac
"""


def hook_runs(path):
    try:
        with open(path) as f:
            rows = [x.split() for x in f if x.strip()]
    except FileNotFoundError:
        return []
    return [{"pid": int(r[0]), "kid": int(r[1]), "epoch": int(r[2]), "mode": r[3],
             "t": float(r[4])} for r in rows]


def make_hook(tmp_path, mode):
    modef, runsf, hookf = tmp_path / "hook.mode", tmp_path / "hook.runs", tmp_path / "hook.sh"
    modef.write_text(mode + "\n")
    hookf.write_text(HOOK % {"mode": modef, "runs": runsf})
    hookf.chmod(0o755)
    return str(hookf), modef, str(runsf)


def gone(pid):
    return util.proc_stat(pid) is None


def test_on_change_hang_killed_at_timeout_and_retried(tmp_path, sim_nobroker, daemon_factory):
    hook, modef, runsf = make_hook(tmp_path, "hang")
    d = daemon_factory(sim=sim_nobroker, overrides={"broker": {"on_change": hook,
                                                              "on_change_timeout": "1s"}})
    d.wait_for_primary("p1", 1, timeout=15)
    util.wait_until(lambda: len(hook_runs(runsf)) >= 1, 10, what="first on_change run")
    first = hook_runs(runsf)[0]
    # killed at the timeout: the hook and its own child are gone, reaped
    util.wait_until(lambda: gone(first["pid"]) and gone(first["kid"]), 5,
                    what="hung hook (pid %d, child %d) killed and reaped" % (first["pid"], first["kid"]))
    d.wait_for_log(r"on_change for epoch 1 failed \(timed out\)", timeout=5)
    # retried (backoff 1 s, then 2 s), each one killed again
    util.wait_until(lambda: len(hook_runs(runsf)) >= 3, 15, what="retries of the hung hook")
    runs = hook_runs(runsf)
    for r in runs[:-1]:
        assert gone(r["pid"]) and gone(r["kid"]), r
    for a, b in zip(runs, runs[1:]):
        assert b["t"] - a["t"] >= 1.0 + 0.8, "killed after ~1s, then backoff >= 1s"
    # no zombies among the daemon's children
    kids = [p for p, comm, st in util.pids_in_session(d.pid) if p != d.pid]
    assert all(util.proc_stat(p)[1] != "Z" for p in kids if util.proc_stat(p)), kids
    modef.write_text("ok\n")
    util.wait_until(lambda: hook_runs(runsf)[-1]["mode"] == "ok", 20, what="a successful run")
    d.wait_for_log(r"on_change for epoch 1 succeeded", timeout=5)
    n = len(hook_runs(runsf))
    time.sleep(3)
    assert len(hook_runs(runsf)) == n, "no more runs after success"
    assert d.stop() == 0


def test_on_change_failure_backoff_success_and_supersede(tmp_path, sim_nobroker, daemon_factory):
    hook, modef, runsf = make_hook(tmp_path, "fail")
    d = daemon_factory(sim=sim_nobroker, overrides={"broker": {"on_change": hook,
                                                              "on_change_timeout": "5s"},
                                                   "provider": {"poll_interval": "2s"}})
    d.wait_for_primary("p1", 1, timeout=15)
    util.wait_until(lambda: len(hook_runs(runsf)) >= 3, 15, what="retries of the failing hook")
    runs = hook_runs(runsf)
    gaps = [b["t"] - a["t"] for a, b in zip(runs, runs[1:])]
    assert gaps[0] >= 0.8 and gaps[1] >= 1.6 and gaps[1] > gaps[0] * 1.5, gaps  # 1 s, 2 s, ...
    assert all(r["epoch"] == 1 for r in runs)
    # a newer change supersedes the failing one
    d.wait_for_log(r"on_change for epoch 1 failed \(exit 1\), retrying in 2s", timeout=10)
    sim_nobroker.promote("p2", event=False)
    d.notify()
    d.wait_for_primary("p2", 2, timeout=10)
    util.wait_until(lambda: any(r["epoch"] == 2 for r in hook_runs(runsf)), 10, what="a run for epoch 2")
    runs = hook_runs(runsf)
    i2 = next(i for i, r in enumerate(runs) if r["epoch"] == 2)
    # the retry for epoch 2 starts from the smallest step (superseded backoff)
    util.wait_until(lambda: len([r for r in hook_runs(runsf) if r["epoch"] == 2]) >= 2, 10,
                    what="a retry for epoch 2")
    r2 = [r for r in hook_runs(runsf) if r["epoch"] == 2]
    assert r2[1]["t"] - r2[0]["t"] < 1.9, "backoff reset by the newer change"
    # the operator fixes the hook: the next retry succeeds, for the newest epoch only
    modef.write_text("ok\n")
    util.wait_until(lambda: hook_runs(runsf)[-1]["mode"] == "ok", 20, what="a successful run")
    runs = hook_runs(runsf)
    assert all(r["epoch"] == 2 for r in runs[i2:]), "epoch 1 never runs again after epoch 2"
    assert runs[-1]["epoch"] == 2
    d.wait_for_log(r"on_change for epoch 2 succeeded", timeout=5)
    n = len(runs)
    time.sleep(3)
    assert len(hook_runs(runsf)) == n
    assert d.stop() == 0
