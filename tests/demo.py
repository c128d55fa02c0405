#!/usr/bin/python3
"""make demo: the whole product, live, on loopback.

Starts real RabbitMQ nodes (one broker per Provider node, in parallel), the
Provider HA cluster simulator (Primary p1, Standbys p2 and p3, a load
balancer), and AGENTS real dsm-agent-syncd daemons, each with its own
generated config in one temporary directory. Then it walks through the
story and checks every step against the contract:

  1  initial sync
  2  planned promote of p2, with an event
  3  the Primary p2 dies (API and broker); p3 is promoted, the event is lost
  4  the old Primary p2 comes back stale and is ignored
  5  a few agents are stopped during a promote, started again, and the
     Provider API notifies exactly those that did not acknowledge
  6  a Provider software update node by node; the agent update is held until
     every node runs the new version, then applied exactly once

Exit status 0 when every step behaved as described, 1 with a clear message
otherwise, 130 on Ctrl-C. After each commit the Provider (the simulator's
ack ledger, tests/provider_acks.py) shows how many Agents acknowledged the
new epoch on the Primary's broker and when the last one did. Everything it starts is stopped by PID, also on
failure and on Ctrl-C; nothing is written outside its temporary directory
(removed at the end unless --keep or a failure).

    /usr/bin/python3 tests/demo.py [--agents N] [--brokers 2|3] [--keep]
"""

import argparse
import concurrent.futures
import configparser
import hashlib
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

sys.dont_write_bytecode = True  # nothing outside the temp dir, not even __pycache__
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, TESTS_DIR)

from harness import rabbit, util  # noqa: E402
from harness import daemon as daemon_mod  # noqa: E402
from harness.daemon import Daemon  # noqa: E402
from harness.sim import Sim  # noqa: E402

POLL_INTERVAL = 2.0          # seconds; [provider] poll_interval
OLD_VERSION = "9.0.1"
NEW_VERSION = "9.0.2"
PROVIDER_TOKEN = "demo-provider-token"
NOTIFY_TOKEN = "demo-notify-token"


class DemoFailure(Exception):
    pass


class Interrupted(BaseException):
    pass


def _on_term(signum, frame):
    raise Interrupted("signal %d" % signum)


def check(cond, msg):
    if not cond:
        raise DemoFailure(msg)


def pct(values, p):
    """Nearest-rank percentile of a non-empty list."""
    v = sorted(values)
    return v[max(0, min(len(v) - 1, int(math.ceil(p / 100.0 * len(v))) - 1))]


def ms(seconds):
    return int(round(seconds * 1000))


# ----- output ------------------------------------------------------------------

class Timeline:
    def __init__(self, t0):
        self.t0 = t0
        self.header_done = False

    def header(self):
        print("%8s  %-5s %-54s %-52s %9s" % ("time", "step", "event", "agents / outcome", "took"))
        print("%8s  %-5s %-54s %-52s %9s" % ("-" * 8, "-" * 5, "-" * 54, "-" * 52, "-" * 9))
        sys.stdout.flush()

    def line(self, step, event, outcome="", took=None):
        t = time.monotonic() - self.t0
        took_s = "" if took is None else "%6d ms" % ms(took)
        print("%7.2fs  %-5s %-54s %-52s %9s" % (t, step, event, outcome, took_s))
        sys.stdout.flush()

    def more(self, text):
        print("%8s  %-5s %s" % ("", "", text))
        sys.stdout.flush()


# ----- one agent -----------------------------------------------------------------

class Agent:
    """A dsm-agent-syncd with its own dir, config and recorder scripts."""

    def __init__(self, name, workdir, sim, brokers_user, jitter):
        self.name = name  # also its [daemon] agent_id
        overrides = {
            "provider": {
                "endpoints": ", ".join(sim.urls[k] for k in sorted(sim.urls)),
                "load_balancer": sim.lb_url,
                "poll_interval": "%gs" % POLL_INTERVAL,
                "poll_jitter": jitter,
                "fast_poll_interval": "200ms",
                "request_timeout": "1s",
            },
            "broker": {"username": brokers_user, "heartbeat": "2s", "on_change_timeout": "5s"},
            "update": {"command_timeout": "10s", "max_delay": "0s", "stable_rounds": "2"},
            "daemon": {"log_level": "info", "log_target": "stderr", "agent_id": name},
        }
        self.d = Daemon(workdir, sim=sim, overrides=overrides, notify_token=NOTIFY_TOKEN,
                        provider_token=PROVIDER_TOKEN, agent_version=OLD_VERSION)
        # Small /bin/sh recorders (builtins only: no PATH needed, cheap for a fleet).
        self.update_log = os.path.join(workdir, "update-runs.log")
        self.on_change_log = os.path.join(workdir, "on-change-runs.log")
        self._script(self.d.update_script,
                     "# apply-update FILE VERSION: records its args, 'installs' VERSION\n"
                     "printf '%%s %%s\\n' \"$1\" \"$2\" >> '%s'\n"
                     "printf '%%s\\n' \"$2\" > '%s'\n" % (self.update_log, self.d.agent_version_file))
        self._script(self.d.on_change_script,
                     "# on_change: records what the daemon told it\n"
                     "printf '%%s %%s %%s:%%s\\n' \"$DSM_PRIMARY_ID\" \"$DSM_EPOCH\" "
                     "\"$DSM_BROKER_HOST\" \"$DSM_BROKER_PORT\" >> '%s'\n" % self.on_change_log)

    @staticmethod
    def _script(path, body):
        with open(path, "w") as f:
            f.write("#!/bin/sh\n" + body)
        os.chmod(path, 0o755)

    @property
    def config(self):
        return self.d.config_path

    def settings(self):
        try:
            return self.d.read_settings()
        except (configparser.Error, OSError):
            return None

    def status(self, tries=5):
        """GET /v1/status (None when it fails). The listener allows 20
        requests/s per daemon: callers poll at 10/s; a 429 is retried."""
        for _ in range(tries):
            try:
                code, doc = self.d.status()
            except (OSError, ValueError):
                code, doc = None, None
            if code == 200 and isinstance(doc, dict):
                return doc
            time.sleep(0.2)
        return None

    def update_runs(self):
        try:
            with open(self.update_log) as f:
                return [ln.split() for ln in f if ln.strip()]
        except FileNotFoundError:
            return []

    def installed_version(self):
        try:
            with open(self.d.agent_version_file) as f:
                return f.readline().strip()
        except FileNotFoundError:
            return None

    def log_tail(self, n=25):
        return self.d.log_tail(n)


# ----- the demo ----------------------------------------------------------------------

class Demo:
    def __init__(self, args):
        self.args = args
        self.n = args.agents
        self.t0 = time.monotonic()
        self.tl = Timeline(self.t0)
        self.tmp = None
        self.group = None
        self.sim = None
        self.agents = []
        self.brokers = {}   # node id -> RabbitNode
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=16)

    # ----- helpers -----------------------------------------------------------

    def fleet_status(self, agents=None):
        agents = self.agents if agents is None else agents
        res = dict(zip(agents, self.pool.map(lambda a: a.status(), agents)))
        bad = [a.name for a, st in res.items() if st is None]
        check(not bad, "GET /v1/status failed on %s" % ", ".join(bad[:5]))
        return res

    def wait_all(self, agents, pred, timeout, what, start=None, interval=0.01):
        """Waits until pred(agent) is true for every agent; returns
        {agent: seconds since start}. Raises DemoFailure naming the laggards."""
        start = time.monotonic() if start is None else start
        done = {}
        deadline = start + timeout
        while True:
            now = time.monotonic()
            for a in agents:
                if a not in done:
                    try:
                        ok = pred(a)
                    except (KeyError, TypeError, ValueError):
                        ok = False
                    if ok:
                        done[a] = time.monotonic() - start
                    elif not a.d.alive():
                        raise DemoFailure("%s: daemon exited (%s) while waiting for %s\n%s"
                                          % (a.name, a.d.returncode, what, a.log_tail()))
            if len(done) == len(agents):
                return done
            if now >= deadline:
                late = [a for a in agents if a not in done]
                a = late[0]
                raise DemoFailure("%d/%d agents did not reach '%s' within %.1fs (first: %s)\n"
                                  "  its settings: %r\n  its status: %r\n%s"
                                  % (len(late), len(agents), what, timeout, a.name, a.settings(),
                                     a.status(), a.log_tail()))
            time.sleep(interval)

    def wait_status_all(self, agents, pred, timeout, what, start=None):
        """Like wait_all, with pred(status document), fetched in parallel."""
        start = time.monotonic() if start is None else start
        done = {}
        last = {}
        deadline = start + timeout
        while True:
            pending = [a for a in agents if a not in done]
            for a, st in zip(pending, self.pool.map(lambda x: x.status(), pending)):
                last[a] = st
                try:
                    ok = st is not None and pred(st)
                except (KeyError, TypeError, ValueError, AttributeError):
                    ok = False
                if ok:
                    done[a] = time.monotonic() - start
                elif not a.d.alive():
                    raise DemoFailure("%s: daemon exited (%s) while waiting for %s\n%s"
                                      % (a.name, a.d.returncode, what, a.log_tail()))
            if len(done) == len(agents):
                return done
            if time.monotonic() >= deadline:
                late = [a for a in agents if a not in done]
                a = late[0]
                raise DemoFailure("%d/%d agents did not reach '%s' within %.1fs (first: %s)\n"
                                  "  its status: %r\n%s"
                                  % (len(late), len(agents), what, timeout, a.name, last.get(a),
                                     a.log_tail()))
            time.sleep(0.1)

    def on_primary(self, node_id, epoch):
        port = self.brokers[node_id].port

        def pred(a):
            s = a.settings()
            return (s is not None and s["provider"]["primary_id"] == node_id
                    and int(s["provider"]["epoch"]) == epoch
                    and int(s["rabbitmq"]["port"]) == port)
        return pred

    def connected_to(self, node_id, epoch):
        port = self.brokers[node_id].port
        return lambda st: (st["broker_connection"] == "connected" and st["epoch"] == epoch
                           and st["primary"]["id"] == node_id
                           and st["primary"]["broker"]["port"] == port)

    def spread(self, times):
        """'p50 12 / p90 30 / max 41 ms' for a fleet, '' for one agent."""
        v = list(times.values())
        if len(v) < 2:
            return ""
        return "p50 %d / p90 %d / max %d ms" % (ms(pct(v, 50)), ms(pct(v, 90)), ms(max(v)))

    def wait_acks(self, epoch, agents, timeout):
        """Polls the Provider's ack ledger until each of agents acknowledged
        epoch, or timeout. Returns (ledger answer, names acknowledged)."""
        names = {a.name for a in agents}
        deadline = time.monotonic() + timeout
        while True:
            got = self.sim.acks(epoch)
            have = names & set(got["agents"])
            if have == names or time.monotonic() >= deadline:
                return got, have
            time.sleep(0.05)

    def report_acks(self, what, epoch, node_id, agents, since, timeout=10):
        """Prints 'what (epoch E): n/N Agents acknowledged, last after X ms'
        (X from since, wall clock) once agents all acknowledged; fails
        naming those that did not within timeout."""
        got, have = self.wait_acks(epoch, agents, timeout)
        recs = [got["agents"][n] for n in sorted(have)]
        last = ", last after %d ms" % ms(max(r["received_at"] for r in recs) - since) if recs else ""
        self.tl.more("%s (epoch %d): %d/%d Agents acknowledged%s"
                     % (what, epoch, len(got["agents"]), self.n, last))
        missing = sorted({a.name for a in agents} - have)
        check(not missing, "no ack of epoch %d within %ds from %s" % (epoch, timeout, ", ".join(missing[:10])))
        wrong = [n for n in have if got["agents"][n]["primary_id"] != node_id]
        check(not wrong, "acks of epoch %d name another Primary than %s: %s" % (epoch, node_id, wrong[:5]))
        return got

    def took(self, times):
        return max(times.values()) if times else None

    def bname(self, node_id):
        return "%s:%d" % (self.broker_label[node_id], self.brokers[node_id].port)

    # ----- setup ---------------------------------------------------------------

    def preflight(self):
        for b in (daemon_mod.DAEMON_BIN, daemon_mod.CTL_BIN):
            check(os.access(b, os.X_OK), "%s is not built (run make all)" % b)
        check(rabbit.available(), "rabbitmq-server is not installed (run tests/install-deps.sh)")
        check(os.geteuid() == 0, "the demo runs the RabbitMQ nodes as user rabbitmq: run it as root")

    def setup(self):
        self.preflight()
        self.tmp = tempfile.mkdtemp(prefix="dsm-demo-")
        os.chmod(self.tmp, 0o711)  # the RabbitMQ nodes run as user rabbitmq
        print("dsm-agent-sync demo: %d agent%s, Provider HA cluster p1 p2 p3 + load balancer, "
              "%d RabbitMQ nodes, all on loopback"
              % (self.n, "" if self.n == 1 else "s", self.args.brokers))
        print("temp dir %s (%s)" % (self.tmp, "kept" if self.args.keep
                                    else "removed at the end, kept on failure"))
        print("agents: poll_interval %gs, fast_poll_interval 200ms, heartbeat 2s, poll_jitter %s, "
              "stable_rounds 2, max_delay 0s" % (POLL_INTERVAL, self.jitter()))
        print()
        self.tl.header()

        # RabbitMQ nodes, in parallel. A node fails to start when another
        # process took one of its ports meanwhile (the ports are picked
        # free, then bound by the node): try again with fresh ports.
        t = time.monotonic()
        for attempt in (1, 2, 3):
            wd = os.path.join(self.tmp, "rabbitmq-%d" % attempt)
            os.makedirs(wd)
            self.group = rabbit.RabbitGroup(workdir=wd)
            try:
                nodes = self.group.start(self.args.brokers, timeout=60)
                break
            except (RuntimeError, TimeoutError) as e:
                self.group.stop()
                lines = str(e).splitlines()
                why = next((x for x in lines if x.startswith("ERROR:")), lines[0] if lines else "")
                if attempt == 3:
                    raise DemoFailure("RabbitMQ did not start (3 attempts): %s" % str(e)[:2000])
                self.tl.line("setup", "RabbitMQ start failed (attempt %d): retrying" % attempt,
                             why[:52], time.monotonic() - t)
        labels = "ABC"
        owners = {"p1": 0, "p2": 1, "p3": 2 if len(nodes) > 2 else 0}
        self.brokers = {nid: nodes[i] for nid, i in owners.items()}
        self.broker_label = {nid: "rmq-" + labels[i] for nid, i in owners.items()}
        self.tl.line("setup", "%d RabbitMQ nodes started in parallel" % len(nodes),
                     " ".join("%s :%d" % ("rmq-" + labels[i], n.port) for i, n in enumerate(nodes)),
                     time.monotonic() - t)

        # The Provider cluster.
        t = time.monotonic()
        self.sim = Sim.start(token=PROVIDER_TOKEN, workdir=os.path.join(self.tmp, "provider"),
                             brokers={nid: (b.host, b.port) for nid, b in self.brokers.items()},
                             extra_args=["--provider-version", OLD_VERSION, "--acks"])
        self.sim.wait_acks_bound(15)
        st = self.sim.state()
        check(st["primary_id"] == "p1" and st["epoch"] == 1, "simulator did not start with p1 at epoch 1")
        self.tl.line("setup", "Provider p1 (Primary) p2 p3 + load balancer",
                     "brokers " + " ".join("%s=%s" % (nid, self.broker_label[nid]) for nid in ("p1", "p2", "p3")),
                     time.monotonic() - t)

        # The agents.
        t = time.monotonic()
        for i in range(self.n):
            name = "agent-%03d" % (i + 1)
            wd = os.path.join(self.tmp, "agents", name) if self.n > 1 else os.path.join(self.tmp, "agent")
            self.agents.append(Agent(name, wd, self.sim, "guest", self.jitter()))
            self.sim.register_agent(name, self.agents[-1].d.base_url(), NOTIFY_TOKEN)
        self.t_agents = time.monotonic()
        self.t_agents_wall = time.time()
        for a in self.agents:
            a.spawned = time.time()
            a.d.start(wait=False)
        for a in self.agents:
            a.d.wait_ready(timeout=20)
        self.tl.line("setup", "%d dsm-agent-syncd started (config in temp dir)" % self.n,
                     "all answer GET /healthz", time.monotonic() - t)

    def jitter(self):
        return "0" if self.n == 1 else "0.1"

    # ----- the story --------------------------------------------------------------

    def step1_initial_sync(self):
        self.wait_all(self.agents, self.on_primary("p1", 1), 15, "settings on p1 epoch 1",
                      start=self.t_agents)
        # Each agent from its own exec to its settings file (the file's mtime).
        times = {a: max(0.0, os.stat(a.d.settings_file).st_mtime - a.spawned) for a in self.agents}
        self.tl.line("1", "initial sync: every agent polls p1 p2 p3 + LB",
                     "settings: p1 epoch 1, broker %s" % self.bname("p1"), self.took(times))
        if self.spread(times):
            self.tl.more("from exec to settings file written: " + self.spread(times))
        self.wait_status_all(self.agents, self.connected_to("p1", 1), 15, "broker connected to p1's broker")
        self.tl.line("1", "", "broker_connection connected to %s" % self.bname("p1"))
        self.report_acks("initial sync", 1, "p1", self.agents, self.t_agents_wall)
        for a in self.agents:
            s = a.settings()
            check(s["rabbitmq"]["host"] == "127.0.0.1" and s["rabbitmq"]["vhost"] == "/"
                  and s["rabbitmq"]["tls"] == "false" and s["provider"]["api_url"] == self.sim.urls["p1"],
                  "%s: unexpected settings file %r" % (a.name, s))

    def step2_planned_promote(self):
        before = {a: st["counters"]["events"] for a, st in self.fleet_status().items()}
        t, t_wall = time.monotonic(), time.time()
        res = self.sim.promote("p2", event=True)
        check(res["epoch"] == 2, "promote p2: %r" % res)
        check(res.get("published", {}).get("p1") == "ok",
              "promote p2: the event was not published on p1's broker: %r" % res)
        self.tl.line("2", "planned promote of p2 (event provider.primary.changed)",
                     "published on %s" % self.bname("p1"), time.monotonic() - t)
        times = self.wait_all(self.agents, self.on_primary("p2", 2), 10, "settings on p2 epoch 2", start=t)
        self.tl.line("2", "", "event -> round -> commit: settings p2 epoch 2", self.took(times))
        if self.spread(times):
            self.tl.more("convergence: " + self.spread(times))
        conn = self.wait_status_all(self.agents, self.connected_to("p2", 2), 10,
                                    "broker connected to p2's broker", start=t)
        self.tl.line("2", "", "broker moved to %s, connected" % self.bname("p2"), self.took(conn))
        self.report_acks("promote p2", 2, "p2", self.agents, t_wall)
        st = self.fleet_status()
        woke = sum(1 for a in self.agents if st[a]["counters"]["events"] > before[a])
        check(woke == self.n, "only %d/%d agents counted the event" % (woke, self.n))
        slow = [a.name for a, x in times.items() if x >= POLL_INTERVAL]
        check(not slow, "agents %s needed a whole poll interval: the event did not wake them" % slow)

    def step3_primary_dies(self):
        st0 = self.fleet_status()
        before = {a: st["counters"]["events"] for a, st in st0.items()}
        polls0 = {a: st["counters"]["polls"] for a, st in st0.items()}
        t = time.monotonic()
        self.sim.kill("p2")
        self.brokers["p2"].kill()
        self.tl.line("3", "Primary p2 dies: API closed, broker SIGKILLed",
                     "p2 refuses, %s gone" % self.bname("p2"), time.monotonic() - t)
        lost = self.wait_status_all(self.agents, lambda st: st["broker_connection"] != "connected", 10,
                                    "broker loss detected", start=t)
        self.tl.line("3", "", "broker loss detected -> fast poll (200ms, x2)", self.took(lost))
        t, t_wall = time.monotonic(), time.time()
        res = self.sim.promote("p3", event=True)
        pub = res.get("published", {})
        check(res["epoch"] == 3, "promote p3: %r" % res)
        check(pub.get("p2", "").startswith("error"),
              "promote p3: publishing on the dead broker should have failed: %r" % pub)
        self.tl.line("3", "operator promotes p3 (event lost: p2's broker dead)",
                     "p3 epoch 3; no agent listens on %s yet" % self.bname("p3"), time.monotonic() - t)
        times = self.wait_all(self.agents, self.on_primary("p3", 3), 2 * POLL_INTERVAL + 8,
                              "settings on p3 epoch 3", start=t)
        st = self.fleet_status()
        rounds = sorted(st[a]["counters"]["polls"] - polls0[a] for a in self.agents)[self.n // 2]
        self.tl.line("3", "", "%d rounds since the loss -> commit: settings p3 epoch 3" % rounds,
                     self.took(times))
        if self.spread(times):
            self.tl.more("convergence: " + self.spread(times))
        conn = self.wait_status_all(self.agents, self.connected_to("p3", 3), 10,
                                    "broker connected to p3's broker", start=t)
        self.tl.line("3", "", "broker moved to %s, connected" % self.bname("p3"), self.took(conn))
        self.report_acks("promote p3", 3, "p3", self.agents, t_wall)
        st = self.fleet_status()
        heard = [a.name for a in self.agents if st[a]["counters"]["events"] != before[a]]
        check(not heard, "agents %s counted an event, but the event was lost" % heard)

    def step4_stale_primary(self):
        t = time.monotonic()
        r = self.sim.revive_stale("p2")
        check(r["role"] == "primary" and r["epoch"] == 2, "revive_stale p2: %r" % r)
        self.tl.line("4", "old Primary p2 comes back, claims primary at epoch 2",
                     "(its broker stays down)", time.monotonic() - t)
        want = "stale primary p2 at epoch 2"
        seen = self.wait_status_all(self.agents, lambda st: want in st["warnings"], 3 * POLL_INTERVAL + 5,
                                    "status warning '%s'" % want, start=t)
        self.tl.line("4", "", "status warnings: \"%s\"" % want, self.took(seen))
        polls = {a: st["counters"]["polls"] for a, st in self.fleet_status().items()}
        t2 = time.monotonic()
        self.wait_all(self.agents, lambda a: a.status()["counters"]["polls"] >= polls[a] + 2,
                      3 * POLL_INTERVAL + 5, "two more poll rounds", interval=0.1)
        on_p3 = self.on_primary("p3", 3)
        moved = [a.name for a in self.agents if not on_p3(a)]
        check(not moved, "agents %s left p3 epoch 3 for the stale Primary" % moved)
        st = self.fleet_status()
        check(all(st[a]["broker_connection"] == "connected" and st[a]["primary"]["id"] == "p3"
                  for a in self.agents), "an agent lost p3 while p2 was stale")
        self.tl.line("4", "", "2 more rounds: still p3 epoch 3, stale p2 ignored", time.monotonic() - t2)
        t = time.monotonic()
        r = self.sim.sync("p2")
        check(r["role"] == "standby" and r["epoch"] == 3, "sync p2: %r" % r)
        gone = self.wait_status_all(self.agents,
                                    lambda st: not any("stale" in w for w in st["warnings"]),
                                    3 * POLL_INTERVAL + 5, "stale warning cleared", start=t)
        self.tl.line("4", "operator resyncs p2: Standby at epoch 3", "stale warning cleared",
                     self.took(gone))

    def stopped_few(self):
        """The agents step 5 stops: a few (1 to 5), spread over the fleet."""
        k = max(1, min(5, self.n // 10))
        return [self.agents[(2 * j + 1) * self.n // (2 * k)] for j in range(k)]

    def step5_agent_down_during_promote(self):
        down = self.stopped_few()
        a1 = down[0]
        others = [a for a in self.agents if a not in down]
        who = a1.name if len(down) == 1 else "%d agents" % len(down)
        t = time.monotonic()
        for a in down:
            rc = a.d.stop(timeout=10)
            check(rc == 0, "%s: SIGTERM gave exit status %r (want 0)" % (a.name, rc))
        self.tl.line("5", "%s stopped by PID (SIGTERM)" % who, "exit status 0", time.monotonic() - t)
        if len(down) > 1:
            self.tl.more("stopped: " + " ".join(a.name for a in down))
        t, t_wall = time.monotonic(), time.time()
        res = self.sim.promote("p1", event=True)
        check(res["epoch"] == 4 and res.get("published", {}).get("p3") == "ok",
              "promote p1: %r" % res)
        self.tl.line("5", "planned promote of p1 (event) while %s %s down"
                     % (who, "is" if len(down) == 1 else "are"),
                     "published on %s" % self.bname("p3"), time.monotonic() - t)
        if others:
            times = self.wait_all(others, self.on_primary("p1", 4), 10, "settings on p1 epoch 4", start=t)
            self.tl.line("5", "", "%d running agents: event -> p1 epoch 4" % len(others), self.took(times))
            if self.spread(times):
                self.tl.more("convergence: " + self.spread(times))
        got = self.report_acks("promote p1", 4, "p1", others, t_wall)
        names = {a.name for a in down}
        check(not names & set(got["agents"]), "a stopped agent acknowledged epoch 4: %r" % got["agents"])
        for a in down:
            check(self.on_primary("p3", 3)(a), "%s's settings changed while it was stopped" % a.name)
        time.sleep(0.3)
        t = time.monotonic()
        for a in down:
            a.d.start(wait=False)
        for a in down:
            a.d.wait_ready(10)
        self.notify_unacked(down, t)
        n0 = a1.status()["counters"]
        t = time.monotonic()
        r = subprocess.run([daemon_mod.CTL_BIN, "-c", a1.config, "notify"], stdin=subprocess.DEVNULL,
                           capture_output=True, text=True, timeout=15)
        check(r.returncode == 0, "dsm-agent-syncctl notify: exit %d: %s" % (r.returncode, r.stderr.strip()))
        done = self.wait_status_all([a1], lambda st: st["counters"]["notifies"] == n0["notifies"] + 1
                                    and st["counters"]["polls"] > n0["polls"], 5, "notify round", start=t)
        st = a1.status()
        check(st["epoch"] == 4 and st["counters"]["changes"] == n0["changes"],
              "%s: the notify changed something: %r" % (a1.name, st))
        self.tl.line("5", "dsm-agent-syncctl notify (as the Provider API)",
                     "202 -> round ran; already on p1, no change", self.took(done))
        self.wait_status_all(self.agents, self.connected_to("p1", 4), 10, "broker connected to p1's broker")
        self.tl.line("5", "", "all agents connected to %s" % self.bname("p1"))

    def notify_unacked(self, down, t_start):
        """The stopped agents were just started again: the Provider API
        notifies every registered Agent without an ack of epoch 4, which
        must be exactly those of down whose start-up round has not been
        acknowledged yet; then their acks arrive."""
        t, t_wall = time.monotonic(), time.time()
        res = self.sim.notify_unacked(4)
        took = time.monotonic() - t
        times = self.wait_all(down, self.on_primary("p1", 4), 10, "settings on p1 epoch 4", start=t_start)
        self.tl.line("5", "%s started again (missed the event)"
                     % (down[0].name if len(down) == 1 else "%d agents" % len(down)),
                     "start-up round -> settings p1 epoch 4", self.took(times))
        notified = res["notified"]
        names = {a.name for a in down}
        check(set(notified) <= names, "notify_unacked notified running agents: %r" % notified)
        early = self.sim.acks(4)["agents"]
        for n in names - set(notified):
            check(n in early and early[n]["received_at"] <= t_wall + took,
                  "%s was neither acknowledged nor notified: %r" % (n, res))
        bad = {n: c for n, c in res["results"].items() if c != 202}
        check(not bad, "notify answers: %r" % bad)
        self.tl.line("5", "Provider API notifies the Agents without an ack",
                     "%d/%d Agents notified (exactly the unacked): 202" % (len(notified), self.n), took)
        self.tl.more("notified: " + (" ".join(sorted(notified)) or "none"))
        healed = sorted(names - set(notified))
        if healed:
            self.tl.more("already acknowledged before the notify (start-up round): " + " ".join(healed))
        got, have = self.wait_acks(4, down, 10)
        after = [got["agents"][n]["received_at"] for n in notified if n in have]
        self.tl.more("%d/%d acknowledged after notify%s"
                     % (len(after), len(notified),
                        ", last after %d ms" % ms(max(after) - t_wall) if after else ""))
        check(have == names, "no ack of epoch 4 within 10s from %s" % ", ".join(sorted(names - have)))

    def step6_update(self):
        data = (b"dsm-agent %s package (demo)\n" % NEW_VERSION.encode()) * 64
        sha = hashlib.sha256(data).hexdigest()
        t = time.monotonic()
        self.sim.set_version("p1", NEW_VERSION)
        self.sim.offer_update(NEW_VERSION, data, event=False)
        self.tl.line("6", "Provider update starts: Primary p1 -> %s" % NEW_VERSION,
                     "agent %s offered, no event published" % NEW_VERSION,
                     time.monotonic() - t)
        # The Provider API wakes every agent: one through dsm-agent-syncctl,
        # the rest through POST /v1/notify.
        n0 = {a: st["counters"] for a, st in self.fleet_status().items()}
        t = time.monotonic()
        r = subprocess.run([daemon_mod.CTL_BIN, "-c", self.agents[0].config, "notify"],
                           stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=15)
        check(r.returncode == 0, "dsm-agent-syncctl notify: exit %d: %s" % (r.returncode, r.stderr.strip()))
        codes = list(self.pool.map(lambda a: a.d.notify({"reason": "agent update offered"})[0],
                                   self.agents[1:]))
        check(all(c == 202 for c in codes), "POST /v1/notify answers: %r" % sorted(set(codes)))
        skew1 = "version_skew: p2=%s, p3=%s" % (OLD_VERSION, OLD_VERSION)
        held = self.wait_status_all(self.agents, lambda st: st["update"]["state"] == "held"
                                    and st["update"]["reason"] == skew1, 3 * POLL_INTERVAL + 5,
                                    "update held (%s)" % skew1, start=t)
        st = self.fleet_status()
        woke = sum(1 for a in self.agents if st[a]["counters"]["notifies"] > n0[a]["notifies"])
        check(woke == self.n, "only %d/%d agents counted the notify" % (woke, self.n))
        self.tl.line("6", "Provider API notifies the agents (ctl / POST)",
                     "held: %s" % skew1, self.took(held))
        if self.spread(held):
            self.tl.more("convergence: " + self.spread(held))
        check(all(st[a]["update"]["target"] == NEW_VERSION and st[a]["update"]["installed"] == OLD_VERSION
                  for a in self.agents), "update target/installed wrong: %r" % st[self.agents[0]]["update"])

        t = time.monotonic()
        self.sim.set_version("p2", NEW_VERSION, event=True)
        skew2 = "version_skew: p3=%s" % OLD_VERSION
        held = self.wait_status_all(self.agents, lambda st: st["update"]["state"] == "held"
                                    and st["update"]["reason"] == skew2, 3 * POLL_INTERVAL + 5,
                                    "update held (%s)" % skew2, start=t)
        self.tl.line("6", "Standby p2 -> %s (event provider.version.changed)" % NEW_VERSION,
                     "held: %s" % skew2, self.took(held))
        ran = [a.name for a in self.agents if a.update_runs()]
        check(not ran, "the update command ran on %s during the version skew" % ran)

        t = time.monotonic()
        self.sim.set_version("p3", NEW_VERSION, event=True)
        seen_waiting = set()

        last_look = {}

        def applied(a):
            if a not in seen_waiting and time.monotonic() - last_look.get(a, 0) >= 0.1:
                last_look[a] = time.monotonic()
                st = a.status()
                if st and st["update"]["state"] == "waiting" and \
                        st["update"]["reason"].startswith("settling"):
                    seen_waiting.add(a)
            return len(a.update_runs()) >= 1 and a.installed_version() == NEW_VERSION
        times = self.wait_all(self.agents, applied, 4 * POLL_INTERVAL + 10, "update applied", start=t,
                              interval=0.02)
        self.tl.line("6", "last Standby p3 -> %s: every node agrees" % NEW_VERSION,
                     "settling 1/2 -> 2/2 -> download -> command", self.took(times))
        if self.spread(times):
            self.tl.more("applied: " + self.spread(times))
        if seen_waiting:
            self.tl.more("%d/%d agents seen in state waiting (settling: 1/2 rounds)"
                         % (len(seen_waiting), self.n))
        # Two more rounds: no second run.
        t = time.monotonic()
        polls = {a: st["counters"]["polls"] for a, st in self.fleet_status().items()}
        self.wait_all(self.agents, lambda a: a.status()["counters"]["polls"] >= polls[a] + 2,
                      3 * POLL_INTERVAL + 5, "two more poll rounds", interval=0.1)
        st = self.fleet_status()
        for a in self.agents:
            runs = a.update_runs()
            check(len(runs) == 1, "%s: the update command ran %d times (want exactly 1): %r"
                  % (a.name, len(runs), runs))
            f, v = runs[0]
            check(v == NEW_VERSION, "%s: command got version %r" % (a.name, v))
            check(os.path.dirname(os.path.abspath(f)) == os.path.abspath(a.d.download_dir),
                  "%s: command got %r, not a file in download_dir" % (a.name, f))
            with open(f, "rb") as fh:
                check(hashlib.sha256(fh.read()).hexdigest() == sha, "%s: %s: sha256 differs" % (a.name, f))
            u = st[a]["update"]
            check(u["state"] == "installed" and u["installed"] == NEW_VERSION,
                  "%s: update status %r (want installed %s)" % (a.name, u, NEW_VERSION))
        self.tl.line("6", "", "command ran exactly once per agent; installed %s" % NEW_VERSION,
                     time.monotonic() - t)

    def ledger_summary(self):
        led = self.sim.acks()
        self.tl.line("end", "Provider ack ledger: acks per epoch",
                     " ".join("%s:%d" % kv for kv in sorted(led["epochs"].items(), key=lambda kv: int(kv[0])))
                     + ", %d duplicates, %d malformed" % (led["duplicates"], led["malformed"]))
        check(led["malformed"] == 0, "the Provider saw %d malformed acks" % led["malformed"])

    def final_status(self):
        a1 = self.agents[0]
        r = subprocess.run([daemon_mod.CTL_BIN, "-c", a1.config, "status"], stdin=subprocess.DEVNULL,
                           capture_output=True, text=True, timeout=15)
        print()
        print("$ dsm-agent-syncctl -c %s status" % a1.config)
        print(r.stdout.rstrip())
        if r.stderr.strip():
            print(r.stderr.rstrip())
        check(r.returncode == 0, "dsm-agent-syncctl status: exit %d" % r.returncode)
        check("p1" in r.stdout, "dsm-agent-syncctl status does not name the Primary p1")

    def run(self):
        self.setup()
        self.step1_initial_sync()
        self.step2_planned_promote()
        self.step3_primary_dies()
        self.step4_stale_primary()
        self.step5_agent_down_during_promote()
        self.step6_update()
        self.ledger_summary()
        self.final_status()

    # ----- teardown ------------------------------------------------------------------

    def teardown(self, strict):
        """Stops everything this demo started, by PID. strict: a non-zero
        daemon exit status is a failure."""
        problems = []
        t = time.monotonic()
        for a in self.agents:
            if a.d.alive():
                try:
                    os.kill(a.d.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for a in self.agents:
            if a.d.proc is None:
                continue
            try:
                a.d.proc.wait(10)
            except subprocess.TimeoutExpired:
                problems.append("%s did not stop within 10s of SIGTERM (killed)" % a.name)
            rc = a.d.stop(timeout=2)
            if rc not in (0, None):
                problems.append("%s exited with %s on SIGTERM" % (a.name, rc))
        n_agents = sum(1 for a in self.agents if a.d.proc is not None)
        if self.sim is not None:
            self.sim.stop()
        if self.group is not None:
            for node in self.group.nodes:
                if node.alive():
                    node.kill()
            self.group.stop()
        util.cleanup_all()
        self.pool.shutdown(wait=True)
        if self.tl and n_agents:
            self.tl.line("end", "stopped %d agent%s, the simulator, %d RabbitMQ nodes"
                         % (n_agents, "" if n_agents == 1 else "s", len(self.group.nodes) if self.group else 0),
                         "by PID, daemons exit 0" if not problems else "; ".join(problems)[:52],
                         time.monotonic() - t)
        if strict and problems:
            raise DemoFailure("; ".join(problems))

    def remove_tmp(self):
        if self.tmp and os.path.isdir(self.tmp):
            shutil.rmtree(self.tmp, ignore_errors=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--agents", type=int, default=int(os.environ.get("AGENTS") or 1),
                    help="number of dsm-agent-syncd daemons (default 1, or $AGENTS)")
    ap.add_argument("--brokers", type=int, choices=(2, 3), default=3,
                    help="RabbitMQ nodes (3: one per Provider node; 2: p3 shares p1's)")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir")
    args = ap.parse_args(argv)
    if not 1 <= args.agents <= 200:
        ap.error("--agents must be 1..200")

    # Ctrl-C raises KeyboardInterrupt also when started with SIGINT ignored
    # (a background job); SIGTERM and SIGHUP unwind the same way.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _on_term)
    signal.signal(signal.SIGHUP, _on_term)
    demo = Demo(args)
    rc = 0
    try:
        demo.run()
    except DemoFailure as e:
        rc = 1
        print("\nDEMO FAILED: %s" % e, file=sys.stderr)
    except (KeyboardInterrupt, Interrupted):
        rc = 130
        print("\ninterrupted: stopping everything", file=sys.stderr)
    except Exception as e:  # the harness or the simulator broke: still tear down
        rc = 1
        import traceback
        traceback.print_exc()
        print("\nDEMO FAILED: %s: %s" % (type(e).__name__, e), file=sys.stderr)
    finally:
        # No second Ctrl-C may cut the teardown short.
        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(s, signal.SIG_IGN)
        try:
            demo.teardown(strict=(rc == 0))
        except DemoFailure as e:
            rc = 1
            print("DEMO FAILED at teardown: %s" % e, file=sys.stderr)
        except Exception as e:
            rc = rc or 1
            print("teardown error: %s: %s" % (type(e).__name__, e), file=sys.stderr)
    total = time.monotonic() - demo.t0
    if rc == 0:
        if not args.keep:
            demo.remove_tmp()
        print("\ndemo passed: %d agent%s, every step as described; total %.1fs"
              % (args.agents, "" if args.agents == 1 else "s", total))
    elif rc == 130:
        if not args.keep:
            demo.remove_tmp()
        print("stopped cleanly after %.1fs" % total, file=sys.stderr)
    elif demo.tmp:
        print("logs kept in %s (total %.1fs)" % (demo.tmp, total), file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
