#!/usr/bin/python3
"""Load check of the Provider simulator (tests/provider_sim.py) alone.

Starts the simulator, opens CONNS keep-alive connections spread over its
nodes and load balancer (as a fleet of daemons would), and drives them from
one selectors loop with conditional GETs of the state document
(If-None-Match with the last ETag, so most answers are 304, like a fleet in
steady state). Two phases of DURATION seconds each:

  steady  RATE requests a second in total, each connection at its own random
          moment of the period (a fleet polling every poll_interval)
  burst   every BURST_EVERY seconds all CONNS connections send at once (a
          fleet fast-polling right after a failover)

For each phase it prints the client-side latency (request written ->
whole answer read) p50/p90/p99/max, the answers per second, the timeouts
(no answer within 5 s, the daemon's request_timeout; the connection is
then reopened), and for the burst how long the slowest of each wave took.
Then it prints the simulator's own GET /stats (absent from older
simulators: "n/a").

    /usr/bin/python3 tests/bench/sim_load.py [--conns 1000] [--duration 20]
        [--rate 150] [--burst-every 2] [--sim PATH]

--sim runs another copy of the simulator (e.g. an older one from git) with
the same load, for a before/after comparison. Not part of make check.
"""

import argparse
import json
import os
import random
import resource
import selectors
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
SIM = os.path.join(os.path.dirname(HERE), "provider_sim.py")
TOKEN = "sim-load-token"
TIMEOUT = 5.0


def pct(values, p):
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, max(0, int(round(p / 100.0 * len(v) + 0.5)) - 1))]


def ms(x):
    return "-" if x is None else "%.2f" % (x * 1000.0)


class Conn:
    """One keep-alive connection: at most one request in flight."""

    def __init__(self, addr, path_head):
        self.addr = addr
        self.head = path_head
        self.etag = None
        self.sock = None
        self.sent_at = None
        self.buf = b""

    def open(self, sel):
        s = socket.create_connection(self.addr, timeout=10)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.setblocking(False)
        self.sock = s
        self.buf = b""
        self.sent_at = None
        sel.register(s, selectors.EVENT_READ, self)

    def close(self, sel):
        if self.sock is not None:
            sel.unregister(self.sock)
            self.sock.close()
            self.sock = None

    def send(self, now):
        req = self.head
        if self.etag:
            req += b"If-None-Match: " + self.etag + b"\r\n"
        self.sock.send(req + b"\r\n")  # small: fits the socket buffer
        self.sent_at = now

    def on_readable(self):
        """Returns True when a whole answer has arrived."""
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("closed by the simulator")
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return False
        head = self.buf[:end].decode("latin-1").split("\r\n")
        length = 0
        etag = None
        for line in head[1:]:
            k, _, v = line.partition(":")
            k = k.strip().lower()
            if k == "content-length":
                length = int(v)
            elif k == "etag":
                etag = v.strip().encode()
        if len(self.buf) < end + 4 + length:
            return False
        if head[0].split()[1] == "200" and etag:
            self.etag = etag
        self.buf = self.buf[end + 4 + length:]
        return True


class Load:
    def __init__(self, conns):
        self.conns = conns
        self.sel = selectors.DefaultSelector()
        for c in conns:
            c.open(self.sel)
        self.reset()

    def reset(self):
        self.lat = []
        self.timeouts = 0
        self.errors = 0

    def _answer(self, c, now):
        try:
            done = c.on_readable()
        except (OSError, ValueError, IndexError):
            self.errors += 1
            self._reopen(c)
            return False
        if done:
            self.lat.append(now - c.sent_at)
            c.sent_at = None
        return done

    def _reopen(self, c):
        c.close(self.sel)
        try:
            c.open(self.sel)
        except OSError:
            self.errors += 1

    def _send(self, c, now):
        if c.sock is None:
            self._reopen(c)
        if c.sock is None or c.sent_at is not None:
            return False  # still waiting for the previous answer
        try:
            c.send(now)
            return True
        except OSError:
            self.errors += 1
            self._reopen(c)
            return False

    def pump(self, until):
        """Reads answers until the monotonic time until; returns the last
        answer's time."""
        last = None
        while True:
            now = time.monotonic()
            if now >= until:
                return last
            for key, _ in self.sel.select(min(0.05, until - now)):
                t = time.monotonic()
                if self._answer(key.data, t):
                    last = t
            self._expire(time.monotonic())

    def _expire(self, now):
        for c in self.conns:
            if c.sent_at is not None and now - c.sent_at > TIMEOUT:
                self.timeouts += 1
                self._reopen(c)

    def steady(self, duration, rate):
        period = len(self.conns) / float(rate)
        start = time.monotonic()
        due = sorted((start + random.uniform(0, period), i) for i in range(len(self.conns)))
        sent = 0
        while due and due[0][0] < start + duration:
            t, i = due.pop(0)
            self.pump(t)
            sent += self._send(self.conns[i], time.monotonic())
            due.append((t + period, i))
            due.sort()
        self.pump(time.monotonic() + TIMEOUT / 2)
        return sent, time.monotonic() - start

    def burst(self, duration, every):
        start = time.monotonic()
        waves = []
        sent = 0
        while time.monotonic() < start + duration:
            t0 = time.monotonic()
            n = sum(self._send(c, t0) for c in self.conns)
            sent += n
            last = self.pump(t0 + every)
            waves.append((last - t0) if last else None)
        self.pump(time.monotonic() + TIMEOUT / 2)
        return sent, time.monotonic() - start, waves


def start_sim(path):
    proc = subprocess.Popen([sys.executable, path, "--token", TOKEN, "--broker",
                             "p1=127.0.0.1:1", "--broker", "p2=127.0.0.1:1", "--broker",
                             "p3=127.0.0.1:1"], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    return proc, json.loads(proc.stdout.readline())


def stats(control):
    try:
        with urllib.request.urlopen(control + "/stats", timeout=10) as r:
            return json.loads(r.read())["result"]
    except Exception:
        return None


def report(name, load, sent, elapsed, extra=""):
    lat = load.lat
    print("%-7s sent %d, answered %d in %.1f s (%.0f/s), timeouts %d, errors %d"
          % (name, sent, len(lat), elapsed, len(lat) / elapsed, load.timeouts, load.errors))
    print("        client latency ms: p50 %s  p90 %s  p99 %s  max %s%s"
          % (ms(pct(lat, 50)), ms(pct(lat, 90)), ms(pct(lat, 99)), ms(max(lat) if lat else None),
             extra))


def show_stats(st):
    if st is None:
        print("        sim /stats: n/a")
        return
    lat = st["latency_ms"]
    ps = [c for _, c in st["per_second"]]
    print("        sim /stats: %d requests %s; service ms p50 %s p90 %s p99 %s max %s; "
          "peak %d/s" % (st["requests"]["total"], json.dumps(st["requests"]["by_node"]),
                         lat["p50"], lat["p90"], lat["p99"], lat["max"], max(ps) if ps else 0))


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--conns", type=int, default=1000)
    ap.add_argument("--duration", type=float, default=20.0, help="seconds per phase")
    ap.add_argument("--rate", type=float, default=150.0,
                    help="steady requests/s in total (1000 Agents x 4 per 30 s = 133)")
    ap.add_argument("--burst-every", type=float, default=2.0)
    ap.add_argument("--sim", default=SIM, help="the simulator to run")
    args = ap.parse_args()

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the sim inherits it
    proc, eps = start_sim(args.sim)
    try:
        targets = sorted(eps["nodes"].values()) + [eps["load_balancer"]]
        conns = []
        for i in range(args.conns):
            u = urllib.parse.urlsplit(targets[i % len(targets)])
            head = ("GET /api/v1/ha/state HTTP/1.1\r\nHost: %s\r\nAuthorization: Bearer %s\r\n"
                    "User-Agent: sim_load\r\nAccept: application/json\r\n"
                    % (u.netloc, TOKEN)).encode()
            conns.append(Conn((u.hostname, u.port), head))
        t0 = time.monotonic()
        load = Load(conns)
        print("simulator %s: %d connections opened in %.2f s" % (args.sim, args.conns,
                                                                  time.monotonic() - t0))
        # prime the ETags, then measure
        load.burst(0.1, 3.0)
        urllib.request.urlopen(urllib.request.Request(eps["control"] + "/reset_counters",
                                                      data=b"{}", method="POST"), timeout=10)
        load.reset()
        sent, elapsed = load.steady(args.duration, args.rate)
        report("steady", load, sent, elapsed)
        show_stats(stats(eps["control"]))
        urllib.request.urlopen(urllib.request.Request(eps["control"] + "/reset_counters",
                                                      data=b"{}", method="POST"), timeout=10)
        load.reset()
        sent, elapsed, waves = load.burst(args.duration, args.burst_every)
        done = [w for w in waves if w is not None]
        report("burst", load, sent, elapsed,
               "\n        wave of %d: last answer after ms p50 %s max %s (%d waves)"
               % (args.conns, ms(pct(done, 50)), ms(max(done) if done else None), len(waves)))
        show_stats(stats(eps["control"]))
    finally:
        proc.terminate()
        proc.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
