"""A stand-in for systemd's notify socket (sd_notify protocol).

    ns = NotifySocket()                     # AF_UNIX SOCK_DGRAM in a short temp dir
    env = ns.env(watchdog_usec=2_000_000)   # NOTIFY_SOCKET, WATCHDOG_USEC
    ... start the daemon with env (Daemon does this) ...
    ns.wait_ready(10)
    ns.latest_status()                      # text of the last STATUS=
    ns.watchdog_intervals()                 # seconds between WATCHDOG=1 pings
    ns.close()

WATCHDOG_PID must be the daemon's pid; harness.daemon sets it through
`/bin/sh -c 'WATCHDOG_PID=$$ exec ...'` when asked (watchdog_pid=True).
"""

import os
import select
import shutil
import socket
import tempfile
import threading
import time


class Message:
    __slots__ = ("t", "raw", "fields", "fds")

    def __init__(self, t, raw, fds):
        self.t = t  # time.monotonic()
        self.raw = raw
        self.fds = fds
        self.fields = {}
        for line in raw.decode(errors="replace").split("\n"):
            if "=" in line:
                k, v = line.split("=", 1)
                self.fields[k] = v

    def __repr__(self):
        return "Message(%.3f, %r)" % (self.t, self.raw)


class NotifySocket:
    def __init__(self, directory=None):
        self._own_dir = directory is None
        # sun_path is at most 107 bytes: keep the path short.
        self.dir = directory or tempfile.mkdtemp(prefix="dsmn-", dir="/tmp")
        self.path = os.path.join(self.dir, "notify.sock")
        if len(self.path.encode()) > 107:
            raise ValueError("notify socket path too long: %s" % self.path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.bind(self.path)
        os.chmod(self.path, 0o777)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.messages = []
        self.cond = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="notify-socket", daemon=True)
        self._thread.start()

    def env(self, watchdog_usec=None):
        e = {"NOTIFY_SOCKET": self.path}
        if watchdog_usec is not None:
            e["WATCHDOG_USEC"] = str(int(watchdog_usec))
        return e

    def _run(self):
        fd_size = socket.CMSG_SPACE(64 * 4)
        cred_size = socket.CMSG_SPACE(12)
        while not self._stop.is_set():
            try:
                r, _, _ = select.select([self.sock], [], [], 0.1)
            except (OSError, ValueError):
                return
            if not r:
                continue
            try:
                data, anc, _, _ = self.sock.recvmsg(65536, fd_size + cred_size)
            except OSError:
                continue
            t = time.monotonic()
            fds = []
            for level, typ, cdata in anc:
                if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
                    n = len(cdata) // 4
                    for i in range(n):
                        fd = int.from_bytes(cdata[4 * i:4 * i + 4], "little", signed=True)
                        fds.append(fd)
                        try:
                            os.close(fd)  # never keep the daemon's fds
                        except OSError:
                            pass
            with self.cond:
                self.messages.append(Message(t, data, fds))
                self.cond.notify_all()

    # ----- queries -----------------------------------------------------------

    def snapshot(self):
        with self.cond:
            return list(self.messages)

    def wait_for(self, pred, timeout, start=0):
        """Waits for a message (index >= start) for which pred(msg) is true;
        returns it or raises TimeoutError."""
        deadline = time.monotonic() + timeout
        with self.cond:
            i = start
            while True:
                while i < len(self.messages):
                    m = self.messages[i]
                    i += 1
                    if pred(m):
                        return m
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("no matching notify message within %.1fs; got %r"
                                       % (timeout, self.messages[-10:]))
                self.cond.wait(left)

    def wait_ready(self, timeout=10):
        return self.wait_for(lambda m: m.fields.get("READY") == "1", timeout)

    def ready(self):
        return any(m.fields.get("READY") == "1" for m in self.snapshot())

    def wait_field(self, key, value=None, timeout=10, start=0):
        return self.wait_for(lambda m: key in m.fields and (value is None or m.fields[key] == value),
                             timeout, start)

    def statuses(self):
        return [m.fields["STATUS"] for m in self.snapshot() if "STATUS" in m.fields]

    def latest_status(self):
        s = self.statuses()
        return s[-1] if s else None

    def wait_status(self, regex, timeout=10):
        import re
        rx = re.compile(regex)
        return self.wait_for(lambda m: "STATUS" in m.fields and rx.search(m.fields["STATUS"]), timeout)

    def watchdog_times(self):
        return [m.t for m in self.snapshot() if m.fields.get("WATCHDOG") == "1"]

    def watchdog_intervals(self):
        t = self.watchdog_times()
        return [b - a for a, b in zip(t, t[1:])]

    def count(self):
        with self.cond:
            return len(self.messages)

    def close(self):
        self._stop.set()
        self._thread.join(2)
        try:
            self.sock.close()
        except OSError:
            pass
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)
        else:
            try:
                os.unlink(self.path)
            except OSError:
                pass
