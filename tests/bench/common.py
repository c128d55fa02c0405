"""Shared pieces of the benchmarks: statistics, log-line timestamps, /proc
readings, the floor probes, and an environment (real RabbitMQ nodes, the
Provider simulator, daemons) built on tests/harness.

Clocks: the daemon stamps its stderr log lines with CLOCK_REALTIME at
millisecond resolution (truncated); the benchmark takes its own stamps with
time.time() (the same clock), and the simulator records request times with
time.time() too. All three are therefore directly comparable.
"""

import datetime
import http.client
import json
import os
import re
import queue
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(HERE)
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)

from harness import daemon as hdaemon  # noqa: E402
from harness import rabbit as hrabbit  # noqa: E402
from harness import sim as hsim  # noqa: E402
from harness import util as hutil  # noqa: E402

BUILD_DIR = os.environ.get("DSM_BUILD_DIR") or os.path.join(hutil.REPO_ROOT, "build")
TOOLS_DIR = os.path.join(BUILD_DIR, "tests")

MID_PRIMARY_COMMITTED = "ded36cf01a5547829b18395ff8df2196"
MID_BROKER_CONNECTED = "cc4e3ac90cd94de2a4b78de1b4f03840"
MID_BROKER_LOST = "680e787066fe4ef696372bf6d086b2bf"

# Production defaults of contract section 2.
PROD = {"poll_interval": "30s", "poll_jitter": "0.2", "fast_poll_interval": "500ms",
        "heartbeat": "10s"}


def log(msg):
    sys.stderr.write("[bench %s] %s\n" % (time.strftime("%H:%M:%S"), msg))
    sys.stderr.flush()


# ----- statistics -------------------------------------------------------------

def pct(values, p):
    """Nearest-rank percentile (p in 0..100) of values; None when empty."""
    if not values:
        return None
    v = sorted(values)
    k = max(0, min(len(v) - 1, int(-(-p * len(v) // 100)) - 1))
    return v[k]


def summary(values, scale=1.0):
    """{n, p50, p99, max, mean} of values multiplied by scale (ms: 1000)."""
    vals = [x * scale for x in values if x is not None]
    if not vals:
        return {"n": 0, "p50": None, "p99": None, "max": None, "mean": None}
    return {"n": len(vals), "p50": round(pct(vals, 50), 3), "p99": round(pct(vals, 99), 3),
            "max": round(max(vals), 3), "min": round(min(vals), 3),
            "mean": round(statistics.fmean(vals), 3)}


def fmt_ms(s):
    if not s or s.get("p50") is None:
        return "n/a"
    return "p50 %.1f ms, p99 %.1f ms, max %.1f ms (n=%d)" % (s["p50"], s["p99"], s["max"], s["n"])


# ----- log lines --------------------------------------------------------------

_LINE = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3})Z (.*)$")
_FIELD = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)')


def parse_line(line):
    """(unix time, {field: value}) of one daemon stderr log line, or None."""
    m = _LINE.match(line)
    if not m:
        return None
    dt = datetime.datetime.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S.%f")
    t = dt.replace(tzinfo=datetime.timezone.utc).timestamp()
    fields = {}
    for k, v in _FIELD.findall(m.group(2)):
        if v.startswith('"'):
            v = re.sub(r"\\(.)", r"\1", v[1:-1])
        fields[k] = v
    return t, fields


class LogTail:
    """Incremental reader of one daemon's log file."""

    def __init__(self, path):
        self.path = path
        self.offset = 0
        self.buf = b""

    def skip_to_end(self):
        try:
            self.offset = os.path.getsize(self.path)
        except OSError:
            self.offset = 0
        self.buf = b""

    def read(self):
        """New complete lines, parsed: [(t, fields)]."""
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except OSError:
            return []
        self.offset += len(data)
        data = self.buf + data
        lines = data.split(b"\n")
        self.buf = lines.pop()
        out = []
        for raw in lines:
            p = parse_line(raw.decode(errors="replace"))
            if p:
                out.append(p)
        return out


def wait_log(tail, pred, timeout, interval=0.005):
    """Reads tail until a parsed line satisfies pred; returns (t, fields) or None."""
    deadline = time.monotonic() + timeout
    while True:
        for t, f in tail.read():
            if pred(f):
                return t, f
        if time.monotonic() >= deadline:
            return None
        time.sleep(interval)


def is_connected(peer):
    return lambda f: f.get("MESSAGE_ID") == MID_BROKER_CONNECTED and (
        peer is None or f.get("DSM_PEER") == peer)


def is_settings(epoch):
    return lambda f: (f.get("DSM_EPOCH") == str(epoch)
                      and "now points to" in f.get("MESSAGE", ""))


# ----- /proc ------------------------------------------------------------------

CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_cpu_seconds(pid):
    with open("/proc/%d/stat" % pid) as f:
        rest = f.read().rsplit(")", 1)[1].split()
    return (int(rest[11]) + int(rest[12])) / CLK_TCK  # utime, stime


def proc_ctxsw(pid):
    """Voluntary + nonvoluntary context switches summed over all threads."""
    total = 0
    for tid in os.listdir("/proc/%d/task" % pid):
        try:
            with open("/proc/%d/task/%s/status" % (pid, tid)) as f:
                for line in f:
                    if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


def proc_threads(pid):
    return len(os.listdir("/proc/%d/task" % pid))


def proc_mem(pid):
    """{rss_kib, pss_kib, private_kib} from status and smaps_rollup."""
    out = {}
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                out["rss_kib"] = int(line.split()[1])
    priv = dirty = 0
    with open("/proc/%d/smaps_rollup" % pid) as f:
        for line in f:
            k = line.split(":")[0]
            if k == "Pss":
                out["pss_kib"] = int(line.split()[1])
            elif k in ("Private_Clean", "Private_Dirty"):
                priv += int(line.split()[1])
                if k == "Private_Dirty":
                    dirty += int(line.split()[1])
    out["private_kib"] = priv
    # Private_Clean is mostly library text no other process happens to map
    # right now: page cache, dropped under pressure and shared as soon as
    # another process uses the library. Private_Dirty is what this daemon
    # alone costs.
    out["private_dirty_kib"] = dirty
    return out


def proc_private_by_mapping(pid, top=8):
    """[(KiB, mapping)] of the largest private (clean+dirty) mappings,
    grouped by backing file or [heap]/[stack]/anonymous."""
    by = {}
    cur = None
    with open("/proc/%d/smaps" % pid) as f:
        for line in f:
            parts = line.split()
            if not parts:
                continue
            if not parts[0].endswith(":") or "-" in parts[0]:
                cur = parts[5] if len(parts) > 5 else "[anon]"
                cur = os.path.basename(cur) if cur.startswith("/") else cur
            elif parts[0] in ("Private_Clean:", "Private_Dirty:"):
                by[cur] = by.get(cur, 0) + int(parts[1])
    return sorted(((v, k) for k, v in by.items() if v), reverse=True)[:top]


def raise_nofile(want=65536):
    """Soft RLIMIT_NOFILE up to the hard one (raising the hard one too where
    allowed, as root): a fleet keeps two log files open per daemon here, and
    the RabbitMQ nodes started from this process inherit the limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
        except (ValueError, OSError):
            pass
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def proc_cpu_split(pid):
    """(own, reaped children's) CPU seconds of pid: utime+stime, cutime+cstime."""
    with open("/proc/%d/stat" % pid) as f:
        rest = f.read().rsplit(")", 1)[1].split()
    return (int(rest[11]) + int(rest[12])) / CLK_TCK, (int(rest[13]) + int(rest[14])) / CLK_TCK


def machine_busy_seconds():
    """(busy, iowait) CPU seconds of the whole machine (all CPUs, /proc/stat).
    iowait is idle time with a task waiting for the disk (fsync)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    iowait = v[4] if len(v) > 4 else 0
    return (sum(v[:8]) - v[3] - iowait) / CLK_TCK, iowait / CLK_TCK


class CpuMeter:
    """CPU seconds of groups of processes ({name: [pid]}), of this benchmark
    process and of the whole machine, read together in one snapshot. A
    process that is gone keeps the last value read (a killed broker)."""

    def __init__(self, groups, children_of=()):
        self.groups = {k: list(v) for k, v in groups.items()}
        self.children_of = set(children_of)  # groups whose reaped children count apart
        self.last = {}

    def snapshot(self):
        out = {"t": time.time()}
        for name, pids in self.groups.items():
            own = kids = 0.0
            for pid in pids:
                try:
                    v = proc_cpu_split(pid)
                    self.last[pid] = v
                except (OSError, ValueError, IndexError):
                    v = self.last.get(pid, (0.0, 0.0))
                own += v[0]
                kids += v[1]
            out[name] = own
            if name in self.children_of:
                out[name + "_children"] = kids
        ru = resource.getrusage(resource.RUSAGE_SELF)
        out["bench"] = ru.ru_utime + ru.ru_stime
        out["machine"], out["iowait"] = machine_busy_seconds()
        return out

    @staticmethod
    def at(samples, t):
        """The snapshot linearly interpolated at time t from [snapshot]."""
        if t <= samples[0]["t"]:
            return samples[0]
        for a, b in zip(samples, samples[1:]):
            if a["t"] <= t <= b["t"]:
                w = 0.0 if b["t"] == a["t"] else (t - a["t"]) / (b["t"] - a["t"])
                return {k: a[k] + (b[k] - a[k]) * w for k in a}
        return samples[-1]

    @staticmethod
    def split(a, b, cpus=None):
        """{group: {"s": seconds, "pct": % of all CPUs}} between snapshots a
        and b, plus "other" (machine busy minus the groups and the bench)."""
        cpus = cpus or os.cpu_count() or 1
        el = max(1e-9, b["t"] - a["t"])
        out = {"seconds": round(el, 2), "cpus": cpus}
        known = 0.0
        for k in a:
            if k in ("t", "machine", "iowait"):
                continue
            d = b[k] - a[k]
            known += d
            out[k] = {"s": round(d, 2), "pct": round(100 * d / (el * cpus), 1)}
        busy = b["machine"] - a["machine"]
        out["machine"] = {"s": round(busy, 2), "pct": round(100 * busy / (el * cpus), 1)}
        io = b["iowait"] - a["iowait"]
        out["iowait"] = {"s": round(io, 2), "pct": round(100 * io / (el * cpus), 1)}
        other = max(0.0, busy - known)
        out["other"] = {"s": round(other, 2), "pct": round(100 * other / (el * cpus), 1)}
        return out


def sim_stats(sim, timeout=10.0):
    """The event-driven simulator's GET /stats ({"since", "requests",
    "latency_ms", "per_second"} since the last reset_counters), or None
    when the simulator has no such route (the threaded one answers 404)."""
    try:
        with urllib.request.urlopen(sim.control_url + "/stats", timeout=timeout) as r:
            doc = json.loads(r.read())
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return None
        raise
    if isinstance(doc, dict) and "result" in doc and "latency_ms" not in doc:
        doc = doc["result"]
    return doc


# ----- floor probes -----------------------------------------------------------

def probe_amqp(host, port, n):
    """amqp_probe: bare rabbit-c setup and publish-to-consume, in ms."""
    exe = os.path.join(TOOLS_DIR, "amqp_probe")
    r = subprocess.run([exe, host, str(port), str(n)], capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        raise RuntimeError("amqp_probe failed: %s" % r.stderr.strip())
    return json.loads(r.stdout)


def probe_http_get(url, token, n):
    """One keep-alive http.client GET of a node's state, n times: seconds each."""
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=5)
    hdr = {"Authorization": "Bearer " + token}
    out = []
    try:
        for _ in range(n):
            t0 = time.perf_counter()
            conn.request("GET", "/api/v1/ha/state", headers=hdr)
            r = conn.getresponse()
            r.read()
            out.append(time.perf_counter() - t0)
            if r.status != 200:
                raise RuntimeError("GET state: HTTP %d" % r.status)
    finally:
        conn.close()
    return out


def probe_atomic_replace(directory, n, size=220):
    """tmp + write + fsync + rename + fsync(dir), n times: seconds each."""
    path = os.path.join(directory, "bench-replace.ini")
    tmp = path + ".tmp"
    body = (b"x" * (size - 1)) + b"\n"
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    out = []
    try:
        for _ in range(n):
            t0 = time.perf_counter()
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
            os.write(fd, body)
            os.fsync(fd)
            os.close(fd)
            os.rename(tmp, path)
            os.fsync(dfd)
            out.append(time.perf_counter() - t0)
    finally:
        os.close(dfd)
        for p in (path, tmp):
            try:
                os.unlink(p)
            except OSError:
                pass
    return out


# ----- the environment --------------------------------------------------------

class Env:
    """Real RabbitMQ nodes (started once, shared by the sections), a
    simulator per section, daemons; everything stopped by PID in close()."""

    def __init__(self, n_brokers=3, workdir=None):
        self.workdir = workdir or tempfile.mkdtemp(prefix="dsm-bench-")
        os.chmod(self.workdir, 0o755)
        self.n_brokers = n_brokers
        self.group = None
        self.brokers = []
        self.sims = []
        self.daemons = []
        self.rabbit_start_s = None
        # Brokers are started from one long-lived thread: the harness sets
        # PR_SET_PDEATHSIG, so a child dies with the *thread* that forked it.
        self._jobs = queue.Queue()
        self._worker = threading.Thread(target=self._work, name="broker-restarts", daemon=True)
        self._worker.start()

    def _work(self):
        while True:
            job = self._jobs.get()
            if job is None:
                return
            fn, done, box = job
            try:
                box["result"] = fn()
            except BaseException as e:
                box["error"] = e
            done.set()

    def in_worker(self, fn):
        """Runs fn in the long-lived worker; returns (done Event, result box)."""
        done, box = threading.Event(), {}
        self._jobs.put((fn, done, box))
        return done, box

    def call_in_worker(self, fn, timeout=300):
        done, box = self.in_worker(fn)
        if not done.wait(timeout):
            raise TimeoutError("worker job timed out")
        if "error" in box:
            raise box["error"]
        return box.get("result")

    def start_brokers(self):
        return self.call_in_worker(self._start_brokers)

    def _start_brokers(self):
        if self.group is None:
            for attempt in (1, 2, 3):
                log("starting %d RabbitMQ nodes" % self.n_brokers)
                rdir = os.path.join(self.workdir, "rabbit%d" % attempt)
                os.makedirs(rdir, exist_ok=True)
                group = hrabbit.RabbitGroup(rdir)
                try:
                    self.brokers = group.start(self.n_brokers)
                except Exception as e:  # e.g. a port taken by a parallel test meanwhile
                    log("RabbitMQ start failed (attempt %d): %s" % (attempt, str(e).splitlines()[0]))
                    group.stop()
                    if attempt == 3:
                        raise
                    continue
                self.group = group
                break
            self.rabbit_start_s = self.group.start_seconds
            log("RabbitMQ up in %.1fs: %s" % (self.rabbit_start_s,
                                             ", ".join("%s:%d" % (b.host, b.port) for b in self.brokers)))
        for b in self.brokers:
            if not b.alive():
                self.restart_broker(b)
        return self.brokers

    def restart_broker(self, b, attempts=3):
        """Starts a killed broker again on its ports; returns seconds taken."""
        t0 = time.monotonic()
        for attempt in range(1, attempts + 1):
            # A fresh Erlang distribution port each time: the killed beam's
            # one can stay unbindable for a while (dist_port_already_used).
            # The AMQP port, which the simulator advertises, stays.
            b.dist_port = hutil.free_port()
            try:
                b.start()
                return time.monotonic() - t0
            except Exception as e:
                log("restart of %r failed (attempt %d): %s" % (b, attempt, str(e).splitlines()[0]))
                try:
                    b.stop(timeout=5)
                except Exception:
                    pass
                if attempt == attempts:
                    raise
                time.sleep(1.0)

    def broker_map(self):
        """{"p1": (host, port), ...}: node pI uses broker I (mod count)."""
        return {"p%d" % (i + 1): (self.brokers[i % len(self.brokers)].host,
                                  self.brokers[i % len(self.brokers)].port)
                for i in range(3)}

    def start_sim(self, name):
        d = os.path.join(self.workdir, "sim-" + name)
        s = hsim.Sim.start(brokers=self.broker_map(), nodes=3, workdir=d)
        self.sims.append(s)
        return s

    def new_daemon(self, name, sim, overrides=None):
        cfg = {
            "provider": {"poll_interval": PROD["poll_interval"], "poll_jitter": PROD["poll_jitter"],
                         "fast_poll_interval": PROD["fast_poll_interval"], "request_timeout": "5s"},
            "broker": {"heartbeat": PROD["heartbeat"], "on_change": "/bin/true"},
            "update": {"enabled": "false"},
            "daemon": {"log_level": "info", "log_target": "stderr"},
        }
        for sec, kv in (overrides or {}).items():
            cfg.setdefault(sec, {}).update(kv)
        d = hdaemon.Daemon(os.path.join(self.workdir, name), sim=sim, overrides=cfg)
        self.daemons.append(d)
        return d

    def broker_of(self, sim_state, node_id):
        b = sim_state["nodes"][node_id]["broker"]
        return "%s:%d" % (b["host"], b["port"])

    def stop_daemons(self, daemons=None):
        ds = list(self.daemons if daemons is None else daemons)
        for d in ds:  # SIGTERM all first, then reap: quicker for a fleet
            try:
                if d.alive():
                    d.signal(15)
            except (OSError, AttributeError):
                pass
        for d in ds:
            try:
                d.stop(timeout=5)
            except Exception:
                pass
            if d in self.daemons:
                self.daemons.remove(d)

    def stop_sim(self, s):
        try:
            s.stop()
        finally:
            if s in self.sims:
                self.sims.remove(s)

    def close(self, keep=False):
        self.stop_daemons()
        for s in list(self.sims):
            self.stop_sim(s)
        if self.group is not None:
            self.group.stop()
            self.group = None
        self._jobs.put(None)
        if keep:
            log("kept the work directory %s" % self.workdir)
        else:
            shutil.rmtree(self.workdir, ignore_errors=True)


class CounterSampler(threading.Thread):
    """Samples the simulator's per-node counters (its control API's GET
    /state) every `period` seconds: [(t, {"requests": n, "status_200": n,
    "status_304": n, ...})] summed over nodes and made cumulative across
    reset_counters (a counter that went down restarted from zero). Works with
    any simulator; the fallback for per-second rates when it has no /stats."""

    def __init__(self, sim, period=0.25):
        super().__init__(daemon=True)
        self.sim = sim
        self.period = period
        self.samples = []
        self.stop_ev = threading.Event()
        self._raw = {}
        self._cum = {}

    def _add(self, t, raw, t_before=None, t_after=None):
        for k, v in raw.items():
            prev = self._raw.get(k, 0)
            self._cum[k] = self._cum.get(k, 0) + (v - prev if v >= prev else v)
        for k in self._raw:
            if k not in raw:  # cleared by a reset: restarts from zero
                self._raw[k] = 0
        self._raw.update(raw)
        self.samples.append((t, dict(self._cum), t if t_before is None else t_before,
                             t if t_after is None else t_after))

    def run(self):
        while not self.stop_ev.is_set():
            try:
                tb = time.time()
                st = self.sim.state()
                ta = time.time()
                tot = {}
                for n in st["nodes"].values():
                    for k, v in n["counters"].items():
                        tot[k] = tot.get(k, 0) + v
                self._add((tb + ta) / 2, tot, tb, ta)
            except Exception:
                pass
            self.stop_ev.wait(self.period)

    def stop(self):
        self.stop_ev.set()
        self.join(5)

    def at(self, t, key="requests"):
        """The cumulative count at time t, interpolated between samples."""
        s = self.samples
        if not s:
            return None
        if t <= s[0][0]:
            return s[0][1].get(key, 0)
        for (t1, c1, *_), (t2, c2, *_) in zip(s, s[1:]):
            if t1 <= t <= t2:
                v1, v2 = c1.get(key, 0), c2.get(key, 0)
                return v1 if t2 == t1 else v1 + (v2 - v1) * (t - t1) / (t2 - t1)
        return s[-1][1].get(key, 0)

    def outer(self, t_from, t_to, key="requests"):
        """The count between the last sample surely read before t_from and
        the first one surely read after t_to: all the requests in
        [t_from, t_to], plus at most two sampling periods of the rate
        around them. For a window that opens with a burst (an event),
        where interpolation would move part of the burst before t_from."""
        s = self.samples
        if not s:
            return None
        a = next((c for _, c, _, ta in reversed(s) if ta <= t_from), s[0][1])
        b = next((c for _, c, tb, _ in s if tb >= t_to), s[-1][1])
        return b.get(key, 0) - a.get(key, 0)

    def between(self, t_from, t_to, key="requests"):
        a, b = self.at(t_from, key), self.at(t_to, key)
        return None if a is None or b is None else b - a

    def buckets(self, t_from, t_to, key="requests", width=1.0, step=None):
        """Requests per second in `width`-second windows starting every
        `step` seconds (default: width, i.e. buckets) in [t_from, t_to],
        from interpolated counter samples. With step = the sampling period
        the max is the busiest `width` seconds whatever their alignment."""
        if len(self.samples) < 2:
            return []
        step = step or width
        out = []
        t = t_from
        while t + width <= t_to + 1e-9:
            out.append(self.between(t, t + width, key) / width)
            t += step
        return out
