"""The package under a real systemd (issue 13): the .deb built from this
tree (packaging/build-deb.sh) is installed in a container booted with
systemd as PID 1 (systemd-nspawn on an overlay of this machine's root,
tests/harness/nspawn.py), and the service runs there against the Provider
simulator (on the host's loopback: the container shares the network) and a
RabbitMQ inside the container (Debian's rabbitmq-server.service).

Run with `make systemd-check` (make check runs it). Skipped, with the
reason, where systemd-nspawn cannot boot a container (not root, no
systemd-container, no overlayfs). The tests share one container and run in
file order, the support drills (tests/drills/) last; the module fixture
stops everything and checks that nothing is left mounted. The duration and
the unit's exposure score are printed.
"""

import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import threading
import time

import pytest

from drills import DRILLS
from harness import debs, nspawn, util
from harness.sim import Sim

UNIT = "dsm-agent-syncd.service"
CONF = "/etc/dsm-agent-sync/agent-sync.ini"
SETTINGS = "/etc/dsm-agent/rabbitmq.ini"
MID_COMMITTED = "ded36cf01a5547829b18395ff8df2196"
MID_APPLIED = "9c88fee5e86945daae2ee2da79934825"
MAX_EXPOSURE = 1.5
# The packaged WatchdogSec (30 s): the frozen daemon is caught in about 35 s.
# DSM_TEST_WATCHDOG_SEC=5 shortens it through a drop-in (quicker runs while
# working on the test).
WATCHDOG_SEC = int(os.environ.get("DSM_TEST_WATCHDOG_SEC", "30"))

# Units of this machine that have no business in the test container (the
# root is an overlay of the host, so whatever the host enables boots too).
MASK = ["postgresql.service", "postgresql@.service", "console-getty.service", "getty@.service",
        "getty.target", "epmd.socket", "epmd.service", "timers.target", "e2scrub_reap.service",
        "systemd-timesyncd.service", "ssh.service", "cron.service", "apt-daily.service",
        "apt-daily-upgrade.service", "man-db.service"]

REPORT = {}


class Box:
    """What the tests share: the container, the simulator, ports, packages."""

    def __init__(self, ct, sim, ports, workdir):
        self.ct = ct
        self.sim = sim
        self.ports = ports
        self.workdir = workdir
        self.agent_deb = None
        self.listen_port = ports["listen_a"]
        self.notify_token = None

    def sh(self, script, **kw):
        return self.ct.sh(script, **kw)

    def cursor(self):
        out = self.sh("journalctl -n 0 --show-cursor --no-pager").stdout
        m = re.search(r"-- cursor: (\S+)", out)
        return m.group(1) if m else None

    def journal(self, unit=None, cursor=None, **fields):
        """MESSAGE lines of the entries after cursor, of unit (its own and
        systemd's messages about it) and with the given fields. Filtered
        here: journalctl --after-cursor with matches skips the first match
        when the cursor's entry does not match."""
        after = " --after-cursor='%s'" % cursor if cursor else ""
        out = self.sh("journalctl --no-pager -o json%s" % after, check=False).stdout
        lines = []
        for raw in out.splitlines():
            try:
                e = json.loads(raw)
            except ValueError:
                continue
            if unit and unit not in (e.get("_SYSTEMD_UNIT"), e.get("UNIT"), e.get("OBJECT_SYSTEMD_UNIT")):
                continue
            if any(e.get(k) != v for k, v in fields.items()):
                continue
            msg = e.get("MESSAGE", "")
            if isinstance(msg, list):
                msg = bytes(msg).decode(errors="replace")
            lines.append(msg)
        return "\n".join(lines)

    def wait_journal(self, pattern, unit=None, cursor=None, timeout=30, what=None, **fields):
        return util.wait_until(lambda: re.search(pattern, self.journal(unit, cursor, **fields), re.M),
                               timeout, 0.3, what or pattern)

    def props(self, unit, *p):
        return self.ct.show(unit, *p)

    def settings(self):
        try:
            return self.ct.read(SETTINGS)
        except OSError:
            return ""

    def write_config(self, listen_port=None, broker=""):
        """The test's configuration; broker: extra [broker] lines."""
        self.listen_port = listen_port or self.listen_port
        s = self.sim
        notify = "token_file = /etc/dsm-agent-sync/notify.token\n" if self.notify_token else ""
        self.ct.write(CONF, CONFIG % {
            "endpoints": ", ".join(s.urls[n] for n in sorted(s.urls)),
            "listen": self.listen_port, "broker": broker, "notify": notify,
        })

    def reload(self):
        cur = self.cursor()
        self.sh("systemctl reload %s" % UNIT)
        self.wait_journal(r"^(Configuration reloaded|Configuration rejected)", UNIT, cur, what="the reload")

    def secret(self, path, value):
        """A secret file as packaged: root:dsm-agent-sync 0640."""
        self.sh("install -m 0640 -g dsm-agent-sync /dev/null %s && echo %s > %s" % (path, value, path))

    def offer_agent_update(self, version):
        """Offers a stand-in agent package of that version; returns (bytes, sha256)."""
        d = os.path.join(self.workdir, "agent-" + version)
        os.makedirs(d, exist_ok=True)
        with open(debs.build_agent_deb(d, version), "rb") as f:
            data = f.read()
        self.sim.offer_update(version, data)
        return data, hashlib.sha256(data).hexdigest()


# The daemon's configuration in the container: the simulator's nodes, fast
# polls, updates without delay. No notify token, as packaged (so that
# dsm-agent-syncctl has none to present either).
CONFIG = """\
[provider]
endpoints = %(endpoints)s
token_file = /etc/dsm-agent-sync/provider.token
poll_interval = 2s
fast_poll_interval = 200ms
request_timeout = 2s

[broker]
heartbeat = 5s
settings_file = /etc/dsm-agent/rabbitmq.ini
%(broker)s
[notify]
listen = 127.0.0.1:%(listen)d
allow = 127.0.0.0/8, ::1
%(notify)s
[update]
enabled = true
stable_rounds = 1
max_delay = 0
command_timeout = 2m

[daemon]
log_level = info
"""


def _prepare(ct, ports):
    """Files written into the container before it boots."""
    ct.mask(*MASK)
    # A fresh install starts its services: this machine's policy-rc.d
    # (a container image's "exit 101") is not part of the test.
    ct.remove("/usr/sbin/policy-rc.d")
    # RabbitMQ on ports of its own, with its own epmd, on loopback only:
    # the network is shared with the host and other test runs.
    ct.write("/etc/systemd/system/rabbitmq-server.service.d/dsm-test.conf", (
        "[Unit]\nWants=\nAfter=network.target\n"
        "[Service]\n"
        "Environment=RABBITMQ_NODENAME=dsmbox@localhost RABBITMQ_NODE_IP_ADDRESS=127.0.0.1\n"
        "Environment=RABBITMQ_NODE_PORT=%(amqp)d RABBITMQ_DIST_PORT=%(dist)d\n"
        "Environment=ERL_EPMD_ADDRESS=127.0.0.1 ERL_EPMD_PORT=%(epmd)d\n") % ports)
    ct.write("/etc/rabbitmq/rabbitmq.conf", "disk_free_limit.absolute = 10MB\n")
    # The agent that dsm-agent-sync-settings.path restarts (try-restart).
    ct.write("/etc/systemd/system/dsm-agent.service",
             "[Unit]\nDescription=Stand-in for the DSM agent\n"
             "[Service]\nExecStart=/bin/sleep infinity\n")


def _install(box, deb_path):
    ct = box.ct
    ct.copy_in(deb_path, "/root/" + os.path.basename(deb_path))
    box.sh("DEBIAN_FRONTEND=noninteractive dpkg -i /root/%s" % os.path.basename(deb_path), timeout=120)
    # The packaged conffile (a placeholder load balancer) let it start; now
    # the test's configuration and secrets.
    # The Agent as installed before any update: the privileged side updates
    # only an installed dsm-agent, to a higher version.
    d = os.path.join(box.workdir, "agent-9.0.0")
    os.makedirs(d)
    ct.copy_in(debs.build_agent_deb(d, "9.0.0"), "/root/dsm-agent_9.0.0_all.deb")
    box.sh("dpkg -i /root/dsm-agent_9.0.0_all.deb", timeout=60)
    box.secret("/etc/dsm-agent-sync/provider.token", box.sim.token)
    box.write_config()
    if WATCHDOG_SEC != 30:
        ct.write("/etc/systemd/system/%s.d/dsm-test.conf" % UNIT,
                 "[Service]\nWatchdogSec=%ds\n" % WATCHDOG_SEC)
    ct.write("/etc/systemd/system/dsm-agent-syncd.socket.d/dsm-test.conf",
             "[Socket]\nListenStream=\nListenStream=127.0.0.1:%d\n" % box.ports["socket"])
    box.sh("systemctl daemon-reload && systemctl start dsm-agent.service && "
           "systemctl restart %s" % UNIT, timeout=60)


@pytest.fixture(scope="module")
def box(request):
    t0 = time.monotonic()
    why = nspawn.Container.unavailable()
    if why:
        pytest.skip("real-systemd test skipped: " + why)
    workdir = tempfile.mkdtemp(prefix="dsm-systemd-")
    ct = nspawn.Container(name="dsmsd", log_dir=workdir)
    ports = {k: util.free_port() for k in ("amqp", "dist", "epmd", "listen_a", "listen_b", "socket")}

    # The .deb builds while the container boots (both take a while).
    built = {}

    def build():
        try:
            built["deb"] = debs.build_project_deb(workdir)
        except Exception as e:  # reported below
            built["error"] = e

    builder = threading.Thread(target=build)
    sim = None
    try:
        try:
            ct.prepare()
            _prepare(ct, ports)
            builder.start()
            ct.boot(timeout=150)
        except nspawn.ContainerError as e:
            # No overlay mount, or nspawn gave up: it cannot boot here. A
            # boot that starts and never settles is a failure.
            if ct.proc is None or ct.proc.poll() is not None:
                pytest.skip("real-systemd test skipped: systemd-nspawn cannot boot here: %s" % e)
            raise
        REPORT["boot"] = ct.boot_seconds
        sim = Sim.start(brokers={n: ("127.0.0.1", ports["amqp"]) for n in ("p1", "p2", "p3")},
                        workdir=os.path.join(workdir, "sim"))
        b = Box(ct, sim, ports, workdir)
        builder.join()
        if "error" in built:
            raise built["error"]
        REPORT["deb"] = os.path.basename(built["deb"])
        _install(b, built["deb"])
        yield b
    finally:
        if builder.is_alive():
            builder.join()
        if sim is not None:
            sim.stop()
        failed = any(getattr(i, "rep_call", None) is not None and i.rep_call.failed
                     for i in request.session.items if i.module is request.module)
        if failed and ct.leader:
            tail = ct.sh("journalctl --no-pager -n 80 -u 'dsm-agent*'", check=False).stdout
            _say(request, "\n--- container journal (dsm-agent*) ---\n%s\n--- container console ---\n%s\n"
                 "(simulator log and console kept in %s)\n" % (tail, ct.log_tail(), workdir))
        left = ct.stop()
        REPORT["duration"] = time.monotonic() - t0
        _say(request, "\nsystemd-check: container booted in %s s; exposure score of %s: %s; "
             "whole test %.1f s (build, boot, checks, stop)\n"
             % (("%.1f" % REPORT["boot"]) if "boot" in REPORT else "n/a", UNIT,
                REPORT.get("exposure", "n/a"), REPORT["duration"]))
        assert left == [], "still mounted after stop: %s" % left
        assert nspawn.mounts_below(workdir) == []
        if not failed:
            shutil.rmtree(workdir, ignore_errors=True)


def _say(request, text):
    """Straight to the terminal, past pytest's capture (teardown output is
    otherwise shown only when the teardown fails)."""
    capman = request.config.pluginmanager.getplugin("capturemanager")
    if capman:
        with capman.global_and_fixture_disabled():
            sys.stderr.write(text)
    else:
        sys.stderr.write(text)


def _committed(box, primary):
    return re.search(r"^primary_id = %s$" % primary, box.settings(), re.M)


# ----------------------------------------------------------------------------


def test_active_after_ready(box):
    """Type=notify: the unit is active only after READY=1."""
    util.wait_until(lambda: box.props(UNIT, "ActiveState")["ActiveState"] in ("active", "failed"),
                    30, 0.2, "the unit to start")
    p = box.props(UNIT, "Type", "ActiveState", "SubState", "NRestarts", "WatchdogUSec", "User")
    assert p["Type"] == "notify"
    assert (p["ActiveState"], p["SubState"]) == ("active", "running"), p
    assert p["NRestarts"] == "0"
    assert p["User"] == "dsm-agent-sync"
    util.wait_until(lambda: _committed(box, "p1"), 30, 0.2, "settings file naming p1")


def test_status_in_systemctl_status(box):
    def status_line():
        out = box.sh("systemctl status %s --no-pager" % UNIT, check=False).stdout
        return re.search(r'^\s*Status: "(.*)"$', out, re.M)

    m = util.wait_until(lambda: (lambda x: x if x and "broker connected" in x.group(1) else None)(status_line()),
                        30, 0.3, "Status: ... broker connected in systemctl status")
    assert m.group(1).startswith("primary p1 epoch 1, broker connected"), m.group(0)


def test_promote_followed_and_settings_path_fires(box):
    agent_pid = box.props("dsm-agent.service", "MainPID")["MainPID"]
    assert agent_pid != "0"
    cur = box.cursor()
    box.sim.promote("p2")
    util.wait_until(lambda: _committed(box, "p2"), 30, 0.2, "settings file naming p2")
    assert re.search(r"^epoch = 2$", box.settings(), re.M)
    # dsm-agent-sync-settings.path saw the rename and its service restarted
    # the agent (outside the daemon's sandbox).
    box.wait_journal(r"^Finished dsm-agent-sync-settings\.service", "dsm-agent-sync-settings.service",
                     cur, what="dsm-agent-sync-settings.service to run")
    util.wait_until(lambda: box.props("dsm-agent.service", "MainPID")["MainPID"] not in ("0", agent_pid),
                    15, 0.2, "dsm-agent.service restarted")
    assert box.props("dsm-agent-sync-settings.path", "ActiveState")["ActiveState"] == "active"


def test_journal_catalog_text(box):
    box.wait_journal(r"p2", UNIT, what="the committed message for p2", MESSAGE_ID=MID_COMMITTED)
    out = box.sh("journalctl -x --no-pager -u %s MESSAGE_ID=%s" % (UNIT, MID_COMMITTED)).stdout
    assert re.search(r"Subject: Provider Primary p2 committed at epoch 2", out), out
    assert "dsm-agent-syncd confirmed a new Provider Primary (p2, epoch" in out, out
    assert "Support: man:dsm-agent-syncd(8)" in out or "Defined-By: dsm-agent-sync" in out, out


def test_reload_applies_changed_config(box):
    pid = box.props(UNIT, "MainPID")["MainPID"]
    a, b = box.ports["listen_a"], box.ports["listen_b"]
    assert util.port_open("127.0.0.1", a)
    cur = box.cursor()
    box.write_config(listen_port=b)
    box.sh("systemctl reload %s" % UNIT)
    box.wait_journal(r"^Configuration reloaded from %s" % re.escape(CONF), UNIT, cur,
                     what="Configuration reloaded")
    util.wait_until(lambda: util.port_open("127.0.0.1", b), 10, 0.2, "the listener on the new port")
    assert not util.port_open("127.0.0.1", a)
    p = box.props(UNIT, "MainPID", "ActiveState")
    assert p == {"MainPID": pid, "ActiveState": "active"}


def test_update_through_privileged_handoff(box):
    cur = box.cursor()
    data, sha = box.agent_deb = box.offer_agent_update("9.0.1")
    box.wait_journal(r"9\.0\.1", UNIT, cur, timeout=90, what="the update applied", MESSAGE_ID=MID_APPLIED)
    # The privileged side installed the file it checked against the offer's
    # sha256 (DSM_UPDATE_SHA256), not a hash of its own.
    out = box.journal("dsm-agent-sync-apply-update.service", cur)
    assert re.search(r"installing \S+ \((dsm-agent )?version 9\.0\.1, sha256 %s\)" % sha, out), out
    assert "installed version 9.0.1" in out, out
    v = box.sh("dpkg-query -W -f '${Version}' dsm-agent").stdout
    assert v == "9.0.1"
    assert box.ct.read("/etc/dsm-agent/VERSION").strip() == "9.0.1"
    # The daemon still writes its settings directory after the install.
    st = box.sh("stat -c '%U:%G %a' /etc/dsm-agent").stdout.strip()
    assert st == "root:dsm-agent-sync 775", st


def test_tampered_file_refused_by_privileged_side(box):
    """A daemon taken over hands a file that is not the offer: the helper
    compares it with the sha256 it is given and installs nothing."""
    sha = box.agent_deb[1] if box.agent_deb else "0" * 64
    evil_dir = os.path.join(box.workdir, "evil")
    os.makedirs(evil_dir, exist_ok=True)
    box.ct.copy_in(debs.build_agent_deb(evil_dir, "9.0.2"), "/var/lib/dsm-agent-sync/updates/tampered.deb")
    box.sh("chown dsm-agent-sync: /var/lib/dsm-agent-sync/updates/tampered.deb")
    cur = box.cursor()
    r = box.sh("setpriv --reuid=dsm-agent-sync --regid=dsm-agent-sync --init-groups "
               "env DSM_UPDATE_SHA256=%s DSM_APPLY_TIMEOUT=60 /usr/lib/dsm-agent-sync/apply-update "
               "/var/lib/dsm-agent-sync/updates/tampered.deb 9.0.2" % sha, check=False, timeout=90)
    assert r.returncode == 65, (r.returncode, r.stdout, r.stderr)
    out = box.journal("dsm-agent-sync-apply-update.service", cur)
    assert re.search(r"sha256 mismatch .*expected %s.*not installed" % sha, out), out
    assert box.sh("dpkg-query -W -f '${Version}' dsm-agent").stdout == "9.0.1"


def test_ctl_status_as_root(box):
    r = box.sh("dsm-agent-syncctl status", check=False, timeout=30)
    text = r.stdout + r.stderr
    if r.returncode != 0 and "HTTP 401" in text:
        said = next(line for line in text.splitlines() if "HTTP 401" in line)
        pytest.xfail("dsm-agent-syncctl status as root needs the local control socket "
                     "(issue 13 deliverable 1), today: " + said.strip())
    assert r.returncode == 0, text
    assert "p2" in r.stdout, r.stdout


def test_socket_unit_activates_listener(box):
    port = box.ports["socket"]
    box.sh("systemctl stop %s && systemctl start dsm-agent-syncd.socket" % UNIT)
    cur = box.cursor()
    try:
        assert box.props(UNIT, "ActiveState")["ActiveState"] == "inactive"
        assert util.port_open("127.0.0.1", port)  # systemd holds the socket
        # The first request starts the service, which answers on the
        # socket it was handed (no token: 401 is an answer of the daemon).
        import urllib.error
        import urllib.request
        req = urllib.request.Request("http://127.0.0.1:%d/v1/notify" % port, data=b"{}", method="POST",
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=20) as resp:
                code = resp.status
        except urllib.error.HTTPError as e:
            code = e.code
        assert code in (202, 401, 403), code
        p = box.props(UNIT, "ActiveState", "TriggeredBy")
        assert p["ActiveState"] == "active" and "dsm-agent-syncd.socket" in p["TriggeredBy"], p
        box.wait_journal(r"^notify: listening on the socket passed by systemd$", UNIT, cur,
                         what="the daemon to take the passed socket")
        # The configured listen address is not opened: the socket is used.
        assert not util.port_open("127.0.0.1", box.ports["listen_b"])
    finally:
        box.sh("systemctl stop dsm-agent-syncd.socket %s; systemctl start %s" % (UNIT, UNIT))


def test_watchdog_restarts_frozen_daemon(box):
    util.wait_until(lambda: box.props(UNIT, "ActiveState")["ActiveState"] == "active", 30, 0.2, "active")
    p = box.props(UNIT, "MainPID", "NRestarts")
    cur = box.cursor()
    box.sh("kill -STOP %s" % p["MainPID"])
    box.wait_journal(r"Watchdog timeout", UNIT, cur, timeout=WATCHDOG_SEC + 30,
                     what="systemd's watchdog timeout")
    q = util.wait_until(
        lambda: (lambda x: x if x["ActiveState"] == "active" and x["MainPID"] not in ("0", p["MainPID"])
                 else None)(box.props(UNIT, "MainPID", "NRestarts", "ActiveState")),
        WATCHDOG_SEC + 60, 0.3, "the restarted daemon")
    assert int(q["NRestarts"]) == int(p["NRestarts"]) + 1
    util.wait_until(lambda: _committed(box, "p2"), 30, 0.3, "the restarted daemon on p2")


def test_exposure_score(box):
    out = box.sh("systemd-analyze security --no-pager %s" % UNIT).stdout
    m = re.search(r"Overall exposure level for %s: ([0-9.]+)" % re.escape(UNIT), out)
    assert m, out
    REPORT["exposure"] = float(m.group(1))
    assert float(m.group(1)) <= MAX_EXPOSURE


# ----------------------------------------------------------------------------
# Support drills (tests/drills/): a broken Agent, and what support sees first.

STATUS_SCREEN = 24  # lines: the first screen of `dsm-agent-syncctl status`


def _drill_screens(box):
    r = box.sh("dsm-agent-syncctl status 2>&1 | head -n %d" % STATUS_SCREEN, check=False)
    j = box.sh("journalctl --no-pager -u dsm-agent-syncd -n 20", check=False)
    return r.stdout, j.stdout


@pytest.mark.parametrize("drill", DRILLS, ids=lambda d: d.__name__.rsplit(".", 1)[-1])
def test_drill(box, drill):
    if not box.notify_token:
        # Until the local control socket lands, dsm-agent-syncctl needs the
        # notify token to read the status.
        box.notify_token = "drill-notify-token"
        box.secret("/etc/dsm-agent-sync/notify.token", box.notify_token)
        box.write_config()
        box.reload()
    drill.make(box)
    try:
        util.wait_until(lambda: re.search(drill.SYMPTOM, "\n".join(_drill_screens(box))),
                        20, 0.5, "drill %r: the broken Agent to show" % drill.NAME)
        time.sleep(2)  # a poll round more: what support sees a moment later
        status, journal = _drill_screens(box)
        screens = "\n--- dsm-agent-syncctl status ---\n%s\n--- journalctl -u dsm-agent-syncd -n 20 ---\n%s" % (
            status, journal)
        assert re.search(drill.SYMPTOM, status + journal), "drill %r did not break the Agent%s" % (drill.NAME, screens)
        failed = {(where, what) for where, text in (("status", status), ("journal", journal))
                  for what, rx in (("cause", drill.CAUSE), ("fix", drill.FIX)) if not re.search(rx, text)}
        unexpected = failed - set(drill.GAPS)
        assert not unexpected, "drill %r: %s%s" % (
            drill.NAME, ", ".join("%s does not name the %s" % x for x in sorted(unexpected)), screens)
    finally:
        drill.undo(box)
        util.wait_until(lambda: "broker connected" in box.props(UNIT, "StatusText")["StatusText"],
                        30, 0.5, "the repaired Agent back on its broker")
    if failed:
        pytest.xfail("drill %r, known gaps: %s" % (drill.NAME, "; ".join(
            "%s %s: %s" % (where, what, drill.GAPS[(where, what)]) for where, what in sorted(failed))))
