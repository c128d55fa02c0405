"""Small shared helpers: free ports, process cleanup, bounded waits."""

import atexit
import ctypes
import os
import signal
import random
import socket
import threading
import time

_libc = ctypes.CDLL(None, use_errno=True)
PR_SET_PDEATHSIG = 1

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TESTS_DIR = os.path.join(REPO_ROOT, "tests")
PYTHON = "/usr/bin/python3"


def pdeathsig_term():
    """preexec_fn: the child gets SIGTERM when the thread that forked it dies
    (a last resort if the test runner itself is killed)."""
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


# Ports handed out for servers that bind later (RabbitMQ, a daemon's
# listener) come from below the kernel's ephemeral range (32768-60999 by
# default), so no outgoing connection can take one in the meantime.
_PORT_LOW, _PORT_HIGH = 20000, 32000


def free_port(host="127.0.0.1"):
    """A port outside the ephemeral range that was free a moment ago."""
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(200):
        port = random.randint(_PORT_LOW, _PORT_HIGH)
        with socket.socket(fam, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket(fam, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def closed_port(host="127.0.0.1"):
    """A loopback port where nothing listens (connection refused)."""
    return free_port(host)


def port_open(host, port, timeout=0.5):
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_until(pred, timeout, interval=0.02, what="condition"):
    """Polls pred() until truthy (returns its value) or raises TimeoutError."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() >= deadline:
            raise TimeoutError("timed out after %.1fs waiting for %s" % (timeout, what))
        time.sleep(interval)


def proc_stat(pid):
    """(comm, state, ppid, pgrp, session) of pid from /proc, or None."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            data = f.read().decode(errors="replace")
    except OSError:
        return None
    lp, rp = data.index("("), data.rindex(")")
    comm = data[lp + 1:rp]
    rest = data[rp + 2:].split()
    return comm, rest[0], int(rest[1]), int(rest[2]), int(rest[3])


def pids_in_session(sid):
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        st = proc_stat(int(d))
        if st and st[4] == sid:
            out.append((int(d), st[0], st[1]))
    return out


def pid_alive(pid):
    st = proc_stat(pid)
    return st is not None and st[1] != "Z"


def kill_group(pgid, sig):
    try:
        os.killpg(pgid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


# ----- a registry of everything the harness started --------------------------

_registry_lock = threading.Lock()
_registry = {}  # key -> cleanup callable


def register_cleanup(key, fn):
    with _registry_lock:
        _registry[key] = fn


def unregister_cleanup(key):
    with _registry_lock:
        _registry.pop(key, None)


def cleanup_all():
    with _registry_lock:
        items = list(_registry.items())
        _registry.clear()
    for _, fn in reversed(items):
        try:
            fn()
        except Exception:
            pass


atexit.register(cleanup_all)


def stop_popen(p, sig=signal.SIGTERM, timeout=10.0, group=True, signal_group=False):
    """Stops Popen p (a session/group leader): sig to p (to its group when
    signal_group), bounded wait, then SIGKILL to its process group (to p
    alone when not group). Returns the exit code."""
    if p.poll() is None:
        try:
            if signal_group:
                os.killpg(p.pid, sig)
            else:
                p.send_signal(sig)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            p.wait(timeout)
        except Exception:
            pass
    if p.poll() is None:
        try:
            if group:
                os.killpg(p.pid, signal.SIGKILL)
            else:
                p.kill()
        except (ProcessLookupError, PermissionError):
            pass
        try:
            p.wait(5)
        except Exception:
            pass
    if group and any(proc_stat(pid) and proc_stat(pid)[3] == p.pid
                     for pid, _, _ in pids_in_session(p.pid)):
        kill_group(p.pid, signal.SIGKILL)  # leftovers in its group, if any
        # Like systemd with a cgroup: the stop is over when the group is
        # gone, so a restart never meets a socket a leftover still holds.
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and any(
                proc_stat(pid) and proc_stat(pid)[3] == p.pid and proc_stat(pid)[1] != "Z"
                for pid, _, _ in pids_in_session(p.pid)):
            time.sleep(0.02)
    return p.returncode
