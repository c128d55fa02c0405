"""A throw-away container with systemd as PID 1, booted from an overlay of
this machine's root (so it has every package installed here).

    box = Container(name="dsmtest", log_dir=d)
    why = box.unavailable()     # None, or why it cannot run here (skip)
    box.prepare()               # tmpfs + overlayfs; write files before boot
    box.write("/etc/x", "text") # into the overlay (the upper layer)
    box.mask("postgresql.service")
    box.boot()                  # systemd-nspawn --boot; waits for the boot
    box.sh("systemctl is-active x")   # CompletedProcess (nsenter into it)
    box.stop()                  # poweroff, bounded; then SIGKILL; unmount;
                                # returns what is still mounted (must be [])

No host systemd is needed (and none runs here): nspawn is started with
--register=no --keep-unit inside a cgroup of its own, made for it under the
name=systemd and unified hierarchies and removed at the end. The network is
the host's (no --private-network), so the host's loopback reaches services
in the container and the reverse. The upper layer is a tmpfs: everything
the container writes is gone at stop().
"""

import os
import shutil
import signal
import subprocess
import tempfile
import time

from . import util

NSPAWN = "/usr/bin/systemd-nspawn"
NSENTER = "/usr/bin/nsenter"
CGROUP_ROOTS = ("/sys/fs/cgroup/systemd", "/sys/fs/cgroup/unified")
ENV = ["env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8", "TERM=dumb",
       "SYSTEMD_PAGER=", "SYSTEMD_COLORS=0", "SYSTEMD_LESS="]


class ContainerError(RuntimeError):
    pass


def _filesystems():
    try:
        with open("/proc/filesystems") as f:
            return {line.split()[-1] for line in f if line.strip()}
    except OSError:
        return set()


def mounts_below(path):
    """Mount points at or below path in this mount namespace."""
    path = os.path.realpath(path)
    out = []
    with open("/proc/mounts") as f:
        for line in f:
            mp = line.split()[1].replace("\\040", " ")
            if mp == path or mp.startswith(path + "/"):
                out.append(mp)
    return out


def _rmdir_tree(path):
    """Removes an empty cgroup directory tree, deepest first."""
    if not os.path.isdir(path):
        return
    for dirpath, dirnames, _ in sorted(os.walk(path), key=lambda t: -t[0].count("/")):
        try:
            os.rmdir(dirpath)
        except OSError:
            pass


class Container:
    def __init__(self, name="dsmtest", log_dir=None, tmpfs_size="2G"):
        self.name = "%s-%d" % (name, os.getpid())
        self.log_dir = log_dir
        self.tmpfs_size = tmpfs_size
        self.dir = None
        self.root = None
        self.proc = None
        self.leader = None
        self.log_path = None
        self.boot_seconds = None
        self._mounted = []
        self._cgroups = []

    # ----- can it run here ---------------------------------------------------

    @staticmethod
    def unavailable():
        if os.geteuid() != 0:
            return "needs root (systemd-nspawn, mount)"
        for tool in (NSPAWN, NSENTER):
            if not os.access(tool, os.X_OK):
                return "%s missing (apt-get install systemd-container; tests/install-deps.sh)" % tool
        fs = _filesystems()
        for need in ("overlay", "tmpfs"):
            if need not in fs:
                return "the kernel has no %s file system" % need
        if not os.path.isdir("/sys/fs/cgroup/unified") and not os.path.exists("/sys/fs/cgroup/cgroup.procs"):
            return "no cgroup v2 hierarchy mounted"
        if not os.path.exists("/lib/systemd/systemd"):
            return "systemd is not installed on this machine (the container's root is its overlay)"
        return None

    # ----- the root file system ----------------------------------------------

    def _mount(self, *args):
        r = subprocess.run(["mount"] + list(args), capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            raise ContainerError("mount %s: %s" % (" ".join(args), r.stderr.strip()))
        self._mounted.append(args[-1])

    def prepare(self):
        """A tmpfs for the upper layer (overlayfs refuses an upper dir inside
        its lower one) and the overlay of / on top of it."""
        self.dir = tempfile.mkdtemp(prefix="dsm-nspawn-")
        util.register_cleanup(("nspawn", self.name), self.stop)
        rw, self.root = os.path.join(self.dir, "rw"), os.path.join(self.dir, "root")
        os.mkdir(rw)
        os.mkdir(self.root)
        self._mount("-t", "tmpfs", "-o", "size=%s,mode=0755" % self.tmpfs_size, "dsm-nspawn", rw)
        os.mkdir(os.path.join(rw, "upper"))
        os.mkdir(os.path.join(rw, "work"))
        self._mount("-t", "overlay", "-o", "lowerdir=/,upperdir=%s/upper,workdir=%s/work" % (rw, rw),
                    "dsm-nspawn", self.root)
        self.log_path = os.path.join(self.log_dir or self.dir, "container.log")

    def path(self, p):
        return os.path.join(self.root, p.lstrip("/"))

    def write(self, p, text, mode=0o644):
        full = self.path(p)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        with open(full, "w") as f:
            f.write(text)
        os.chmod(full, mode)

    def copy_in(self, host_path, p, mode=0o644):
        full = self.path(p)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        shutil.copyfile(host_path, full)
        os.chmod(full, mode)

    def read(self, p):
        with open(self.path(p)) as f:
            return f.read()

    def remove(self, p):
        """Hides p in the container (a whiteout in the upper layer)."""
        try:
            os.unlink(self.path(p))
        except FileNotFoundError:
            pass

    def mask(self, *units):
        for u in units:
            link = self.path("/etc/systemd/system/" + u)
            if os.path.lexists(link):
                os.unlink(link)
            os.symlink("/dev/null", link)

    # ----- boot and stop -----------------------------------------------------

    def _enter_cgroup(self):
        # preexec_fn: nspawn --keep-unit makes its payload/ and supervisor/
        # cgroups below the cgroup it runs in; give it one of its own.
        for base in self._cgroups:
            with open(os.path.join(base, "cgroup.procs"), "w") as f:
                f.write("0")
        util.pdeathsig_term()

    def boot(self, timeout=120.0):
        for root in CGROUP_ROOTS:
            if os.path.isdir(root):
                d = os.path.join(root, self.name)
                os.makedirs(d, exist_ok=True)
                self._cgroups.append(d)
        cmd = [NSPAWN, "--quiet", "--boot", "--register=no", "--keep-unit",
               "--machine=" + self.name, "--directory=" + self.root,
               "--console=passive", "--link-journal=no", "--resolv-conf=off", "--timezone=off"]
        t0 = time.monotonic()
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True, preexec_fn=self._enter_cgroup)
        log.close()
        self.leader = util.wait_until(self._find_leader, 30, 0.05, "the container's init")
        deadline = t0 + timeout
        state = ""
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ContainerError("systemd-nspawn exited with %s:\n%s" % (self.proc.returncode, self.log_tail()))
            r = self.sh("systemctl is-system-running", timeout=10, check=False)
            state = r.stdout.strip()
            if state in ("running", "degraded"):
                self.boot_seconds = time.monotonic() - t0
                return state
            time.sleep(0.3)
        raise ContainerError("boot did not finish in %.0fs (state %r)" % (timeout, state))

    def _find_leader(self):
        if self.proc.poll() is not None:
            raise ContainerError("systemd-nspawn exited with %s:\n%s" % (self.proc.returncode, self.log_tail()))
        try:
            with open("/proc/%d/task/%d/children" % (self.proc.pid, self.proc.pid)) as f:
                kids = [int(p) for p in f.read().split()]
        except OSError:
            return None
        for pid in kids:
            try:
                with open("/proc/%d/cmdline" % pid, "rb") as f:
                    argv0 = f.read().split(b"\0")[0]
            except OSError:
                continue
            if argv0.endswith(b"/systemd"):
                return pid
        return None

    def log_tail(self, n=40):
        try:
            with open(self.log_path, "rb") as f:
                return "\n".join(f.read().decode(errors="replace").splitlines()[-n:])
        except (OSError, TypeError):
            return ""

    def stop(self, timeout=30.0):
        """Powers the container off (SIGRTMIN+4 to its init), SIGKILLs its
        init if that takes longer than timeout, unmounts, removes the
        cgroups and the temp dir. Returns the mount points left (none)."""
        util.unregister_cleanup(("nspawn", self.name))
        if self.proc is not None and self.proc.poll() is None:
            if self.leader and util.pid_alive(self.leader):
                try:
                    os.kill(self.leader, signal.SIGRTMIN + 4)
                except ProcessLookupError:
                    pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                if self.leader and util.pid_alive(self.leader):
                    os.kill(self.leader, signal.SIGKILL)
                util.stop_popen(self.proc, timeout=10)
        for mp in reversed(self._mounted):
            if subprocess.run(["umount", mp], capture_output=True, timeout=30).returncode != 0:
                time.sleep(0.5)
                subprocess.run(["umount", mp], capture_output=True, timeout=30)
        self._mounted = []
        for d in self._cgroups:
            _rmdir_tree(d)
        self._cgroups = []
        # nspawn cannot remove its propagation directory from a /run that is
        # not a tmpfs (it refuses to rm -rf a disk file system).
        shutil.rmtree("/run/systemd/nspawn/propagate/" + self.name, ignore_errors=True)
        left = mounts_below(self.dir) if self.dir else []
        if self.dir and not left:
            shutil.rmtree(self.dir, ignore_errors=True)
        return left

    # ----- inside ------------------------------------------------------------

    def sh(self, script, timeout=60.0, check=True, input=None):
        """Runs a shell script inside the container (all its namespaces) as
        root; returns the CompletedProcess (text)."""
        cmd = [NSENTER, "-t", str(self.leader), "-a", "--"] + ENV + ["/bin/sh", "-c", script]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, input=input)
        if check and r.returncode != 0:
            raise ContainerError("in the container: %s\n-> exit %d\n%s%s" % (script, r.returncode, r.stdout, r.stderr))
        return r

    def show(self, unit, *props):
        """systemctl show: {property: value}."""
        r = self.sh("systemctl show %s -p %s" % (unit, ",".join(props)))
        out = {}
        for line in r.stdout.splitlines():
            k, _, v = line.partition("=")
            out[k] = v
        return out

    def wait(self, pred, timeout, what, interval=0.2):
        return util.wait_until(pred, timeout, interval, what)
