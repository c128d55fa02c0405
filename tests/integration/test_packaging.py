"""Packaging and operability: systemd units, sandbox score, journal catalog,
man pages, the update hand-over scripts, the .deb and the RPM spec.

Stdlib + pytest only. Every subprocess has a timeout. The .deb is built once
per session (packaging/build-deb.sh), which needs the daemon sources to build.
"""

import hashlib
import os
import re
import shutil
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

TOP = Path(__file__).resolve().parents[2]
PKG = TOP / "packaging"
UNIT_DIR = PKG / "systemd"
UNITS = [
    "dsm-agent-syncd.service",
    "dsm-agent-syncd.socket",
    "dsm-agent-sync-apply-update.service",
    "dsm-agent-sync-apply-update.path",
    "dsm-agent-sync-settings.service",
    "dsm-agent-sync-settings.path",
]
MAN_PAGES = ["dsm-agent-syncd.8", "dsm-agent-syncctl.8", "dsm-agent-sync.ini.5"]
MAX_EXPOSURE = 1.5


def need(tool):
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} not installed (run tests/install-deps.sh)")


def run(cmd, timeout=60, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)


# --------------------------------------------------------------------------
# systemd units


def _units_with_paths(tmp, exec_map):
    """Copies the units into tmp with executable paths rewritten through
    exec_map ({installed path: path on this machine})."""
    for name in UNITS:
        text = (UNIT_DIR / name).read_text()
        for src, dst in exec_map.items():
            text = text.replace(src, str(dst))
        (tmp / name).write_text(text)


def _stub_exec(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(0o755)
    return path


def test_units_verify(tmp_path):
    need("systemd-analyze")
    root = tmp_path / "root"
    exec_map = {
        "/usr/sbin/dsm-agent-syncd": _stub_exec(root / "usr/sbin/dsm-agent-syncd"),
        "/usr/lib/dsm-agent-sync/": str(PKG) + "/",
    }
    helper = PKG / "apply-update-helper"
    assert os.access(helper, os.X_OK)
    units = tmp_path / "units"
    units.mkdir()
    _units_with_paths(units, exec_map)
    r = run(["systemd-analyze", "verify", "--man=no"] + [str(units / u) for u in UNITS])
    assert r.returncode == 0 and r.stderr.strip() == "", r.stderr


def _service(name):
    """The [Service] settings of a unit as {key: [values]}."""
    out = {}
    section = None
    for line in (UNIT_DIR / name).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line
            continue
        k, _, v = line.partition("=")
        out.setdefault((section, k.strip()), []).append(v.strip())
    return out


def test_service_contract():
    s = _service("dsm-agent-syncd.service")
    S = "[Service]"
    assert s[(S, "Type")] == ["notify"]
    assert s[(S, "NotifyAccess")] == ["main"]
    assert s[(S, "WatchdogSec")] == ["30s"]
    assert s[(S, "ExecStart")] == ["/usr/sbin/dsm-agent-syncd -c /etc/dsm-agent-sync/agent-sync.ini"]
    assert s[(S, "ExecReload")] == ["/bin/kill -HUP $MAINPID"]
    assert s[(S, "Restart")] == ["on-failure"]
    assert s[(S, "User")] == ["dsm-agent-sync"]
    assert "dsm-agent-sync" in s[(S, "StateDirectory")][0].split()
    assert s[(S, "ReadWritePaths")] == ["-/etc/dsm-agent"]
    families = set(s[(S, "RestrictAddressFamilies")][0].split())
    assert families == {"AF_UNIX", "AF_INET", "AF_INET6"}
    # fork/exec stay allowed (on_change, the update command).
    filters = " ".join(s[(S, "SystemCallFilter")])
    assert "@process" not in filters and "execve" not in filters
    sock = _service("dsm-agent-syncd.socket")
    assert sock[("[Socket]", "ListenStream")] == ["8631"]
    path = _service("dsm-agent-sync-apply-update.path")
    assert path[("[Path]", "PathExists")] == ["/var/lib/dsm-agent-sync/apply/request"]
    settings = _service("dsm-agent-sync-settings.path")
    assert settings[("[Path]", "PathChanged")] == ["/etc/dsm-agent/rabbitmq.ini"]


def test_service_makes_the_control_socket_directory():
    """The control socket's default directory is the unit's RuntimeDirectory,
    which the service group may enter (the socket itself is 0660)."""
    s = _service("dsm-agent-syncd.service")
    S = "[Service]"
    assert s[(S, "RuntimeDirectory")] == ["dsm-agent-sync"]
    assert s[(S, "RuntimeDirectoryMode")] == ["0750"]
    assert s[(S, "Group")] == ["dsm-agent-sync"]
    conf = (TOP / "conf/agent-sync.ini").read_text()
    m = re.search(r"^control_socket\s*=\s*(\S+)\s*$", conf, re.M)
    assert m and m.group(1) == "/run/dsm-agent-sync/control.sock", "shipped control_socket"
    header = (TOP / "include/config.h").read_text()
    assert '"/run/dsm-agent-sync/control.sock"' in header


def exposure_score():
    r = run(["systemd-analyze", "security", "--offline=true", "--no-pager",
             str(UNIT_DIR / "dsm-agent-syncd.service")])
    m = re.search(r"Overall exposure level for \S+: ([0-9.]+)", r.stdout)
    assert m, r.stdout + r.stderr
    return float(m.group(1))


def test_security_score():
    need("systemd-analyze")
    score = exposure_score()
    print(f"exposure score of dsm-agent-syncd.service: {score}")
    assert score <= MAX_EXPOSURE


def test_sysusers_and_tmpfiles(tmp_path):
    need("systemd-sysusers")
    need("systemd-tmpfiles")
    (tmp_path / "etc").mkdir()
    r = run(["systemd-sysusers", f"--root={tmp_path}", str(PKG / "sysusers.conf")])
    assert r.returncode == 0, r.stderr
    passwd = (tmp_path / "etc/passwd").read_text()
    assert re.search(r"^dsm-agent-sync:x:\d+:\d+:.*:/var/lib/dsm-agent-sync:/usr/sbin/nologin$", passwd, re.M)
    r = run(["systemd-tmpfiles", f"--root={tmp_path}", "--create", str(PKG / "tmpfiles.conf")])
    assert r.returncode == 0, r.stderr
    st = (tmp_path / "etc/dsm-agent").stat()
    assert stat.S_IMODE(st.st_mode) == 0o775 and st.st_uid == 0


# --------------------------------------------------------------------------
# journal catalog


def message_ids_in_code():
    ids = {}
    for d in ("include", "agent", "common"):
        for f in sorted((TOP / d).glob("*.[ch]")):
            for m in re.finditer(r'#define\s+(MID_\w+)\s+"([0-9a-f]{32})"', f.read_text()):
                ids[m.group(2)] = m.group(1)
    return ids


def catalog_entries():
    text = (PKG / "catalog/dsm-agent-sync.catalog").read_text()
    entries = {}
    for block in re.split(r"^-- ", text, flags=re.M)[1:]:
        head, _, body = block.partition("\n")
        mid = head.strip()
        assert re.fullmatch(r"[0-9a-f]{32}", mid), head
        fields, _, explanation = body.partition("\n\n")
        keys = dict(line.split(": ", 1) for line in fields.splitlines())
        assert {"Subject", "Defined-By", "Support"} <= set(keys), mid
        assert explanation.strip(), mid
        assert mid not in entries, f"duplicate catalog entry {mid}"
        entries[mid] = keys
    return entries


def test_catalog_covers_every_message_id():
    code = message_ids_in_code()
    assert len(code) >= 11, code
    cat = catalog_entries()
    assert set(code) - set(cat) == set(), "MESSAGE_IDs without a catalog entry"
    assert set(cat) - set(code) == set(), "catalog entries for unknown MESSAGE_IDs"
    # Every 32-hex literal used as a MESSAGE_ID in code is one of the MID_s.
    for d in ("agent", "common"):
        for f in (TOP / d).glob("*.c"):
            for m in re.finditer(r'MESSAGE_ID=([0-9a-f]{32})', f.read_text()):
                assert m.group(1) in cat, f"{f}: {m.group(1)}"


def test_catalog_compiles(tmp_path):
    need("journalctl")
    d = tmp_path / "usr/lib/systemd/catalog"
    d.mkdir(parents=True)
    shutil.copy(PKG / "catalog/dsm-agent-sync.catalog", d)
    r = run(["journalctl", f"--root={tmp_path}", "--update-catalog"])
    assert r.returncode == 0 and r.stderr.strip() == "", r.stderr
    r = run(["journalctl", f"--root={tmp_path}", "--list-catalog"])
    listed = {line.split()[0] for line in r.stdout.splitlines() if line.strip()}
    assert listed == set(message_ids_in_code())


# --------------------------------------------------------------------------
# man pages and docs


@pytest.mark.parametrize("page", MAN_PAGES)
def test_man_page_renders_without_warnings(page):
    need("groff")
    need("man")
    f = TOP / "docs" / page
    r = run(["groff", "-man", "-ww", "-z", str(f)])
    assert r.returncode == 0 and r.stderr == "", r.stderr
    r = run(["man", "--warnings", "-l", str(f)], env=dict(os.environ, MANWIDTH="80", MAN_KEEP_FORMATTING="0"))
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert len(r.stdout) > 500


def test_operations_runbook_lists_every_message_id():
    text = (TOP / "docs/operations.md").read_text()
    for mid in message_ids_in_code():
        assert f"MESSAGE_ID={mid}" in text
    for word in ("dsm-agent-syncctl notify", "dsm-agent-syncctl status", "version_skew",
                 "node_unreachable", "settling", "outside_window", "delay", "sha256_mismatch",
                 "command_failed", "flapping", "cluster size", "stale primary"):
        assert word in text, word


# --------------------------------------------------------------------------
# the update hand-over: apply-update (sandboxed side) and the root helper


AGENT = "dsm-agent"  # the helper's default DSM_APPLY_PACKAGE


def make_deb(out, name=AGENT, version="9.0.1"):
    """A minimal real .deb (dpkg-deb --build), readable by the helper's
    setpriv'd reader."""
    need("dpkg-deb")
    tree = Path(tempfile.mkdtemp(prefix="dsm-debtree."))
    try:
        (tree / "DEBIAN").mkdir()
        (tree / "DEBIAN/control").write_text(
            f"Package: {name}\nVersion: {version}\nArchitecture: all\n"
            "Maintainer: Test <test@example.com>\nDescription: hand-over test package\n")
        (tree / "usr/share/doc" / name).mkdir(parents=True)
        (tree / "usr/share/doc" / name / "VERSION").write_text(version + "\n")
        r = run(["dpkg-deb", "--root-owner-group", "-Zgzip", "--build", str(tree), str(out)])
        assert r.returncode == 0, r.stderr
    finally:
        shutil.rmtree(tree, ignore_errors=True)
    out.chmod(0o644)
    return out


def dpkg_status(admindir, installed):
    """A dpkg database (for dpkg-query --admindir) holding {name: version}."""
    admindir.mkdir(parents=True, exist_ok=True)
    (admindir / "status").write_text("".join(
        f"Package: {n}\nStatus: install ok installed\nPriority: optional\nVersion: {v}\n"
        "Architecture: all\nMaintainer: Test <test@example.com>\nDescription: installed\n\n"
        for n, v in installed.items()))


class Handover:
    def __init__(self, tmp, installed="9.0.0"):
        self.base = tmp / "state"
        self.spool = self.base / "apply"
        self.updates = self.base / "updates"
        for p in (self.base, self.spool, self.updates):
            p.mkdir(parents=True)
            p.chmod(0o755)
        tmp.chmod(0o755)
        self.pkg = make_deb(self.updates / "agent_9.0.1.deb")
        self.admindir = tmp / "dpkg"
        dpkg_status(self.admindir, {AGENT: installed} if installed else {})
        self.installed = tmp / "installed"
        self.installer = tmp / "fake-install"
        self.installer.write_text(
            f'#!/bin/sh\ncp "$1" {self.installed}\necho "$2" >{self.installed}.version\n'
            'exit "${FAKE_STATUS:-0}"\n')
        self.installer.chmod(0o755)
        self.env = dict(os.environ, DSM_APPLY_SPOOL=str(self.spool), DSM_APPLY_POLL="1",
                        DSM_APPLY_ALLOWED_DIR=str(self.base), DSM_APPLY_INSTALL=str(self.installer),
                        DSM_APPLY_USER="nobody" if os.geteuid() == 0 else str(os.getuid()),
                        DSM_APPLY_PACKAGE=AGENT, DSM_APPLY_KEYRING="",
                        DSM_APPLY_DPKG_ADMINDIR=str(self.admindir))

    def client(self, *args, timeout="20", sha256=None):
        """apply-update as the daemon runs it: DSM_UPDATE_SHA256 is the
        offer's sha256 (default: the package's own, an honest offer)."""
        if sha256 is None:
            sha256 = hashlib.sha256(self.pkg.read_bytes()).hexdigest()
        env = dict(self.env, DSM_APPLY_TIMEOUT=timeout, DSM_UPDATE_SHA256=sha256)
        return subprocess.Popen([str(PKG / "apply-update"), *args], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def wait_request(self):
        deadline = time.monotonic() + 10
        while not (self.spool / "request").exists():
            assert time.monotonic() < deadline, "no request written"
            time.sleep(0.05)
        return (self.spool / "request").read_text()

    def helper(self, **env):
        return run([str(PKG / "apply-update-helper")], env=dict(self.env, **env), timeout=60)

    def handover(self, version="9.0.1", **env):
        """Both sides, one request: (exit status of apply-update, its stderr,
        which carries the helper's message)."""
        p = self.client(str(self.pkg), version)
        self.wait_request()
        r = self.helper(**env)
        assert r.returncode == 0, r.stdout + r.stderr
        return _finish(p)


@pytest.fixture
def shared_tmp():
    """A temporary directory that the helper's setpriv'd reader (nobody) can
    traverse; pytest's tmp_path lives below a 0700 directory."""
    d = Path(tempfile.mkdtemp(prefix="dsm-handover."))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _finish(p):
    try:
        out, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    return p.returncode, err


def test_handover_installs_verified_package(shared_tmp):
    tmp_path = shared_tmp
    h = Handover(tmp_path)
    p = h.client(str(h.pkg), "9.0.1")
    req = h.wait_request()
    assert re.search(r"^sha256=[0-9a-f]{64}$", req, re.M)
    assert f"file={h.pkg}\n" in req and "version=9.0.1\n" in req
    r = h.helper()
    assert r.returncode == 0, r.stdout + r.stderr
    rc, err = _finish(p)
    assert rc == 0, err
    assert h.installed.read_bytes() == h.pkg.read_bytes()
    assert not (h.spool / "request").exists()


def test_handover_passes_the_installers_exit_status(shared_tmp):
    tmp_path = shared_tmp
    h = Handover(tmp_path)
    p = h.client(str(h.pkg), "9.0.1")
    h.wait_request()
    h.helper(FAKE_STATUS="3")
    rc, _ = _finish(p)
    assert rc == 3


def test_handover_compares_with_the_offer_not_the_file(shared_tmp):
    """A file that differs from the offer before the hand-off (a daemon
    taken over, or a swapped download) is refused by the privileged side:
    apply-update hands on the offer's sha256, never the file's own."""
    h = Handover(shared_tmp)
    offered = hashlib.sha256(b"the package the Provider offered").hexdigest()
    p = h.client(str(h.pkg), "9.0.1", sha256=offered)
    req = h.wait_request()
    assert "sha256=%s\n" % offered in req
    h.helper()
    rc, _ = _finish(p)
    assert rc == 65
    assert not h.installed.exists()


def test_handover_needs_the_offers_sha256(shared_tmp):
    h = Handover(shared_tmp)
    for bad in ("", "xyz", "A" * 64, "0" * 63):
        p = h.client(str(h.pkg), "9.0.1", sha256=bad)
        rc, err = _finish(p)
        assert rc == 64 and "DSM_UPDATE_SHA256" in err, (bad, rc, err)
    assert not (h.spool / "request").exists()


def test_handover_rechecks_sha256(shared_tmp):
    tmp_path = shared_tmp
    h = Handover(tmp_path)
    p = h.client(str(h.pkg), "9.0.1")
    h.wait_request()
    h.pkg.write_bytes(b"!<arch>\nswapped after verification\n")  # changed behind the daemon's back
    h.helper()
    rc, _ = _finish(p)
    assert rc == 65
    assert not h.installed.exists()


def test_handover_refuses_files_outside_the_state_dir(shared_tmp):
    tmp_path = shared_tmp
    h = Handover(tmp_path)
    other = tmp_path / "elsewhere.deb"
    other.write_bytes(b"x")
    other.chmod(0o644)
    p = h.client(str(other), "9.0.1")
    h.wait_request()
    h.helper()
    rc, _ = _finish(p)
    assert rc == 64
    assert not h.installed.exists()


def test_handover_times_out_without_helper(shared_tmp):
    tmp_path = shared_tmp
    h = Handover(tmp_path)
    p = h.client(str(h.pkg), "9.0.1", timeout="2")
    rc, err = _finish(p)
    assert rc == 75, err


def test_handover_rejects_bad_arguments(shared_tmp):
    tmp_path = shared_tmp
    h = Handover(tmp_path)
    for args, status in (([], 64), ([str(h.pkg), "bad version"], 64), ([str(tmp_path / "missing"), "1"], 66)):
        rc, _ = _finish(h.client(*args))
        assert rc == status, args


def test_helper_ignores_symlinked_request(shared_tmp):
    tmp_path = shared_tmp
    h = Handover(tmp_path)
    secret = tmp_path / "secret"
    secret.write_text("id=0123\nfile=/etc/shadow\n")
    (h.spool / "request").symlink_to(secret)
    r = h.helper()
    assert r.returncode == 0
    assert not (h.spool / "request").exists() and not (h.spool / "result").exists()


# The privileged side trusts only what it checks itself: a daemon taken over
# writes the request, the package and the offer's sha256 (all consistent), so
# each refusal below is tested with an honest sha256.


def test_helper_refuses_a_wrong_package_name(shared_tmp):
    h = Handover(shared_tmp)
    make_deb(h.pkg, name="openssh-server")
    rc, err = h.handover()
    assert rc == 80, err
    assert "package 'openssh-server', not dsm-agent" in err
    assert not h.installed.exists()
    # The name is configurable (the unit's DSM_APPLY_PACKAGE).
    rc, err = h.handover(DSM_APPLY_PACKAGE="openssh-server", DSM_APPLY_DPKG_ADMINDIR=str(shared_tmp / "dpkg2"))
    assert rc == 83, err  # right name now; not installed in that database
    dpkg_status(shared_tmp / "dpkg2", {"openssh-server": "1:9.2p1-2"})
    rc, err = h.handover(DSM_APPLY_PACKAGE="openssh-server", DSM_APPLY_DPKG_ADMINDIR=str(shared_tmp / "dpkg2"))
    assert rc == 82, err  # 9.0.1 < 1:9.2p1-2 (the epoch counts)
    assert not h.installed.exists()


def test_helper_refuses_a_downgrade(shared_tmp):
    h = Handover(shared_tmp, installed="9.0.1~rc1")
    make_deb(h.pkg, version="8.9.9")
    rc, err = h.handover("8.9.9")
    assert rc == 82, err
    assert "not newer than the installed 9.0.1~rc1" in err
    assert not h.installed.exists()
    # 9.0.1~rc1 < 9.0.1 in dpkg's ordering: the release is installed.
    make_deb(h.pkg, version="9.0.1")
    rc, err = h.handover("9.0.1")
    assert rc == 0, err
    assert h.installed.read_bytes() == h.pkg.read_bytes()


def test_helper_refuses_a_version_other_than_the_request(shared_tmp):
    h = Handover(shared_tmp)
    rc, err = h.handover("9.0.2")  # the .deb says 9.0.1
    assert rc == 81, err
    assert "version '9.0.1', not the requested 9.0.2" in err
    make_deb(h.pkg, version="9.0.1-1")  # a Debian revision is a different version
    rc, err = h.handover("9.0.1")
    assert rc == 81, err
    assert not h.installed.exists()


def test_helper_needs_the_agent_installed(shared_tmp):
    h = Handover(shared_tmp, installed=None)
    rc, err = h.handover()
    assert rc == 83, err
    assert "dsm-agent is not installed" in err
    assert not h.installed.exists()


def test_helper_same_version_is_done_without_installing(shared_tmp):
    """Idempotent, as the update command must be: a repeated request for the
    installed version succeeds, and nothing is installed as root."""
    h = Handover(shared_tmp, installed="9.0.1")
    rc, err = h.handover()
    assert rc == 0, err
    assert "installed already" in err
    assert not h.installed.exists()


def test_helper_refuses_what_is_not_a_package(shared_tmp):
    h = Handover(shared_tmp)
    h.pkg.write_bytes(b"!<arch>\nnot really a deb\n")
    rc, err = h.handover()
    assert rc == 65, err
    assert not h.installed.exists()


def test_apply_unit_configures_the_trust_checks():
    env = _service("dsm-agent-sync-apply-update.service")[("[Service]", "Environment")]
    assert f"DSM_APPLY_PACKAGE={AGENT}" in env
    assert "DSM_APPLY_KEYRING=/etc/dsm-agent-sync/trusted.gpg" in env
    assert "DSM_APPLY_REQUIRE_SIGNATURE=0" in env
    assert not [e for e in env if e.startswith(("DSM_APPLY_INSTALL=", "DSM_APPLY_DPKG_ADMINDIR="))]


def test_update_trust_doc_lists_every_refusal():
    helper = (PKG / "apply-update-helper").read_text()
    statuses = set(re.findall(r"\bresult (\d+) ", helper)) - {"0"}
    assert {"64", "65", "66", "80", "81", "82", "83", "84", "85", "86"} <= statuses
    doc = (TOP / "docs/update-trust.md").read_text()
    for st in statuses:
        assert f"| {st} |" in doc, f"status {st} is not in docs/update-trust.md"


def make_rpm(out, name=AGENT, version="9.0.1"):
    need("rpmbuild")
    top = Path(tempfile.mkdtemp(prefix="dsm-rpmtop."))
    try:
        (top / "t.spec").write_text(
            f"Name: {name}\nVersion: {version}\nRelease: 1\nSummary: test\nLicense: MIT\n"
            "BuildArch: noarch\n%description\nhand-over test package\n%files\n")
        r = run(["rpmbuild", "--define", f"_topdir {top}", "--nodeps", "-bb", str(top / "t.spec")])
        assert r.returncode == 0, r.stderr
        shutil.copy(next((top / "RPMS").rglob("*.rpm")), out)
    finally:
        shutil.rmtree(top, ignore_errors=True)
    out.chmod(0o644)
    return out


def test_helper_checks_an_rpm_too(shared_tmp):
    need("rpm")
    if run(["rpm", "-q", AGENT]).returncode == 0:
        pytest.skip(f"{AGENT} is in this machine's rpm database")
    h = Handover(shared_tmp)
    make_rpm(h.pkg, name="openssh-server")
    rc, err = h.handover()
    assert rc == 80, err
    make_rpm(h.pkg)
    rc, err = h.handover("9.0.2")
    assert rc == 81, err
    for version in ("9.0.1", "9.0.1-1"):  # with or without the release
        rc, err = h.handover(version)
        assert rc == 83 and "dsm-agent is not installed" in err, err  # name and version pass
    assert not h.installed.exists()


@pytest.fixture(scope="module")
def signing():
    """A real OpenPGP setup: a trusted key exported as a binary keyring (what
    gpgv reads), and a stranger's key that is not in it."""
    need("gpg")
    need("gpgv")
    home = Path(tempfile.mkdtemp(prefix="dsm-gnupg."))
    home.chmod(0o700)
    env = dict(os.environ, GNUPGHOME=str(home))
    try:
        for uid in ("DSM Release <release@example.com>", "Stranger <stranger@example.com>"):
            r = run(["gpg", "--batch", "--passphrase", "", "--quick-gen-key", uid, "ed25519", "sign", "never"],
                    env=env)
            assert r.returncode == 0, r.stderr
        keydir = home / "keyring"
        keydir.mkdir(mode=0o755)
        keyring = keydir / "trusted.gpg"
        r = subprocess.run(["gpg", "--batch", "--export", "release@example.com"], env=env,
                           capture_output=True, timeout=60)
        assert r.returncode == 0 and r.stdout, r.stderr
        keyring.write_bytes(r.stdout)
        keyring.chmod(0o644)

        def sign(path, signer="release@example.com", out=None):
            out = out or Path(str(path) + ".sig")
            out.unlink(missing_ok=True)
            r = run(["gpg", "--batch", "--local-user", signer, "--detach-sign", "-o", str(out), str(path)],
                    env=env)
            assert r.returncode == 0, r.stderr
            out.chmod(0o644)
            return out

        yield keyring, sign
    finally:
        run(["gpgconf", "--kill", "gpg-agent"], env=env)
        shutil.rmtree(home, ignore_errors=True)


def test_helper_installs_a_signed_package(shared_tmp, signing):
    keyring, sign = signing
    h = Handover(shared_tmp)
    sign(h.pkg)
    rc, err = h.handover(DSM_APPLY_KEYRING=str(keyring))
    assert rc == 0, err
    assert h.installed.read_bytes() == h.pkg.read_bytes()


def test_helper_refuses_a_missing_signature(shared_tmp, signing):
    keyring, _ = signing
    h = Handover(shared_tmp)
    rc, err = h.handover(DSM_APPLY_KEYRING=str(keyring))
    assert rc == 84, err
    assert f"no signature {h.pkg}.sig" in err
    assert not h.installed.exists()
    # Without a keyring, signatures are not required (the sha256 is the anchor).
    rc, err = h.handover(DSM_APPLY_KEYRING=str(shared_tmp / "no-such-keyring.gpg"))
    assert rc == 0, err
    # ... unless the unit says a signature is required: then a missing
    # keyring refuses every package.
    h.installed.unlink()
    rc, err = h.handover(DSM_APPLY_KEYRING=str(shared_tmp / "no-such-keyring.gpg"),
                         DSM_APPLY_REQUIRE_SIGNATURE="1")
    assert rc == 86, err
    rc, err = h.handover(DSM_APPLY_KEYRING="", DSM_APPLY_REQUIRE_SIGNATURE="1")
    assert rc == 86, err
    assert not h.installed.exists()


def test_helper_refuses_a_bad_signature(shared_tmp, signing):
    keyring, sign = signing
    h = Handover(shared_tmp)
    # A signature of other bytes: the daemon's own package with the
    # signature of a genuine one.
    genuine = shared_tmp / "genuine.deb"
    genuine.write_bytes(h.pkg.read_bytes() + b"\n")
    sign(genuine, out=Path(str(h.pkg) + ".sig"))
    rc, err = h.handover(DSM_APPLY_KEYRING=str(keyring))
    assert rc == 85, err
    assert "bad signature" in err and "BAD signature" in err
    # A valid signature by a key that is not in the keyring.
    sign(h.pkg, signer="stranger@example.com")
    rc, err = h.handover(DSM_APPLY_KEYRING=str(keyring))
    assert rc == 85, err
    # Garbage where the signature should be.
    Path(str(h.pkg) + ".sig").write_bytes(b"-----BEGIN PGP SIGNATURE-----\nnope\n")
    rc, err = h.handover(DSM_APPLY_KEYRING=str(keyring))
    assert rc == 85, err
    assert not h.installed.exists()


def test_helper_signature_does_not_excuse_name_or_version(shared_tmp, signing):
    """A genuinely signed package is still refused when it is another
    package or older than the installed one (a replayed old release)."""
    keyring, sign = signing
    h = Handover(shared_tmp, installed="9.1.0")
    sign(h.pkg)
    rc, err = h.handover(DSM_APPLY_KEYRING=str(keyring))
    assert rc == 82, err
    make_deb(h.pkg, name="dsm-agent-tools")
    sign(h.pkg)
    rc, err = h.handover(DSM_APPLY_KEYRING=str(keyring))
    assert rc == 80, err
    assert not h.installed.exists()


def test_helper_refuses_a_keyring_others_can_write(shared_tmp, signing):
    keyring, sign = signing
    h = Handover(shared_tmp)
    sign(h.pkg)
    loose = shared_tmp / "keys"
    loose.mkdir(mode=0o755)
    shutil.copy(keyring, loose / "trusted.gpg")
    (loose / "trusted.gpg").chmod(0o666)
    rc, err = h.handover(DSM_APPLY_KEYRING=str(loose / "trusted.gpg"))
    assert rc == 86, err
    assert "writable by group or others" in err
    (loose / "trusted.gpg").chmod(0o644)
    loose.chmod(0o777)
    rc, err = h.handover(DSM_APPLY_KEYRING=str(loose / "trusted.gpg"))
    assert rc == 86, err
    loose.chmod(0o755)
    rc, err = h.handover(DSM_APPLY_KEYRING=str(loose / "trusted.gpg"))
    assert rc == 0, err


# --------------------------------------------------------------------------
# the .deb


EXPECTED_DEB_FILES = [
    "./etc/dsm-agent-sync/agent-sync.ini",
    "./usr/sbin/dsm-agent-syncd",
    "./usr/bin/dsm-agent-syncctl",
    "./usr/lib/dsm-agent-sync/apply-update",
    "./usr/lib/dsm-agent-sync/apply-update-helper",
    "./usr/lib/sysusers.d/dsm-agent-sync.conf",
    "./usr/lib/tmpfiles.d/dsm-agent-sync.conf",
    "./usr/lib/systemd/catalog/dsm-agent-sync.catalog",
    "./usr/share/doc/dsm-agent-sync/examples/agent-sync.ini",
    "./usr/share/doc/dsm-agent-sync/operations.md",
    "./usr/share/doc/dsm-agent-sync/update-trust.md",
    "./usr/share/man/man8/dsm-agent-syncd.8.gz",
    "./usr/share/man/man8/dsm-agent-syncctl.8.gz",
    "./usr/share/man/man5/dsm-agent-sync.ini.5.gz",
] + [f"./lib/systemd/system/{u}" for u in UNITS]


@pytest.fixture(scope="module")
def deb():
    need("dpkg-buildpackage")
    need("dh")
    out = Path(tempfile.mkdtemp(prefix="dsm-deb-test."))
    try:
        r = run([str(PKG / "build-deb.sh")], timeout=600, env=dict(os.environ, DSM_DEB_OUTDIR=str(out)))
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
        path = Path(r.stdout.strip().splitlines()[-1])
        assert path.is_file()
        yield path
    finally:
        shutil.rmtree(out, ignore_errors=True)


@pytest.fixture(scope="module")
def deb_root(deb):
    root = Path(tempfile.mkdtemp(prefix="dsm-deb-root."))
    try:
        r = run(["dpkg-deb", "-x", str(deb), str(root)])
        assert r.returncode == 0, r.stderr
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_deb_contents(deb):
    r = run(["dpkg-deb", "-c", str(deb)])
    assert r.returncode == 0, r.stderr
    listed = {line.split()[-1] for line in r.stdout.splitlines()}
    missing = [f for f in EXPECTED_DEB_FILES if f not in listed]
    assert not missing, missing
    conffiles = run(["dpkg-deb", "-I", str(deb), "conffiles"]).stdout.split()
    assert conffiles == ["/etc/dsm-agent-sync/agent-sync.ini"]
    size = run(["dpkg-deb", "-f", str(deb), "Installed-Size"]).stdout.strip()
    print(f"Installed-Size: {size} KiB, .deb {deb.stat().st_size} bytes")
    scripts = Path(tempfile.mkdtemp())
    try:
        run(["dpkg-deb", "-e", str(deb), str(scripts)])
        postinst = (scripts / "postinst").read_text()
        # The user must exist before tmpfiles.d chowns /etc/dsm-agent to it.
        assert postinst.index("systemd-sysusers") < postinst.index("systemd-tmpfiles")
        assert "enable 'dsm-agent-syncd.service'" in postinst
        assert "enable 'dsm-agent-sync-apply-update.path'" in postinst
        assert "deb-systemd-helper enable 'dsm-agent-syncd.socket'" in postinst  # only if it was enabled
    finally:
        shutil.rmtree(scripts, ignore_errors=True)


def test_deb_lintian_no_errors(deb):
    need("lintian")
    r = run(["lintian", "--fail-on", "error", "--no-tag-display-limit", str(deb)], timeout=300)
    tags = [line for line in r.stdout.splitlines() if re.match(r"^[EWIPX]: ", line)]
    print("\n".join(tags))
    assert r.returncode == 0, r.stdout + r.stderr
    assert not [t for t in tags if t.startswith("E: ")]


def test_deb_conffile_is_safe(deb_root):
    conf = (deb_root / "etc/dsm-agent-sync/agent-sync.ini").read_text()
    # Inside the sandbox systemctl cannot work: the path unit restarts the agent.
    assert re.search(r"^on_change\s*=\s*$", conf, re.M), "packaged on_change must be empty"
    assert re.search(r"^command\s*=\s*/usr/lib/dsm-agent-sync/apply-update\s*$", conf, re.M)
    assert not re.search(r"^(token|password)\s*=", conf, re.M)
    # dsm-agent-syncctl works out of the box, with no token: the control socket.
    assert re.search(r"^control_socket\s*=\s*/run/dsm-agent-sync/control.sock\s*$", conf, re.M)


def test_deb_binaries_check_the_example_config(deb_root):
    daemon = deb_root / "usr/sbin/dsm-agent-syncd"
    conf = deb_root / "etc/dsm-agent-sync/agent-sync.ini"
    r = run([str(daemon), "--check-config", "-c", str(conf)], timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr
    r = run([str(daemon), "--check-config", "-c", str(deb_root / "usr/share/doc/dsm-agent-sync/examples/agent-sync.ini")],
            timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr
    r = run([str(deb_root / "usr/bin/dsm-agent-syncctl"), "--help"], timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr


def test_deb_units_verify_against_installed_binaries(deb_root, tmp_path):
    need("systemd-analyze")
    units = tmp_path / "units"
    units.mkdir()
    text_map = {
        "/usr/sbin/dsm-agent-syncd": deb_root / "usr/sbin/dsm-agent-syncd",
        "/usr/lib/dsm-agent-sync/": str(deb_root / "usr/lib/dsm-agent-sync") + "/",
    }
    for u in UNITS:
        text = (deb_root / "lib/systemd/system" / u).read_text()
        for a, b in text_map.items():
            text = text.replace(a, str(b))
        (units / u).write_text(text)
    r = run(["systemd-analyze", "verify", "--man=no"] + [str(units / u) for u in UNITS])
    assert r.returncode == 0 and r.stderr.strip() == "", r.stderr


# --------------------------------------------------------------------------
# the RPM spec


def test_rpm_spec_builds(tmp_path):
    need("rpmbuild")
    version = re.search(r"^Version:\s*(\S+)", (PKG / "rpm/dsm-agent-sync.spec").read_text(), re.M).group(1)
    top = tmp_path / "rpm"
    (top / "SOURCES").mkdir(parents=True)
    tarball = top / "SOURCES" / f"dsm-agent-sync-{version}.tar.gz"
    r = run(["tar", "-C", str(TOP), "--exclude=./.git", "--exclude=./build", "--exclude=./build-*",
             "--exclude=./dist", "--exclude=__pycache__", "--exclude=.pytest_cache",
             f"--transform=s|^\\.|dsm-agent-sync-{version}|", "-czf", str(tarball), "."])
    assert r.returncode == 0, r.stderr
    # --nodeps: the BuildRequires name RPM packages (pkgconfig(...)) that a
    # Debian rpm database does not know; the -dev packages are installed.
    r = run(["rpmbuild", "--define", f"_topdir {top}", "--nodeps", "-bb",
             str(PKG / "rpm/dsm-agent-sync.spec")], timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rpms = list((top / "RPMS").rglob(f"dsm-agent-sync-{version}-*.rpm"))
    assert rpms
    listing = run(["rpm", "-qlp", str(rpms[0])]).stdout.split()
    for f in ("/usr/sbin/dsm-agent-syncd", "/usr/lib/systemd/system/dsm-agent-syncd.service",
              "/usr/lib/sysusers.d/dsm-agent-sync.conf", "/etc/dsm-agent-sync/agent-sync.ini"):
        assert f in listing, f
