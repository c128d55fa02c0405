"""The benchmark sections (the fleet's are in fleet.py). Each takes (env,
opts) and returns a dict of figures with a "targets" list: {"metric",
"value", "target", "met", "unit"}."""

import http.client
import json
import os
import threading
import time

from common import (MID_PRIMARY_COMMITTED, LogTail, PROD, is_connected, is_settings, log, probe_amqp,
                    probe_atomic_replace, probe_http_get, proc_cpu_seconds, proc_ctxsw, proc_mem,
                    proc_private_by_mapping, proc_threads, summary, wait_log)

NODES = ("p1", "p2", "p3")

# Failover / primary-death daemons: poll timer out of the way, quick heartbeats.
FAILOVER_CFG = {"provider": {"poll_interval": "30s", "fast_poll_interval": "500ms"},
                "broker": {"heartbeat": "2s"}}
# A move to another broker waits a random time of up to 1 s before its first
# attempt, so that a fleet does not arrive at once (agent/broker.c
# MOVE_SPREAD_MAX_USEC, issue 14): part of every "new broker consuming".
MOVE_SPREAD_MS = 1000.0


def target(metric, value, limit, unit="ms", note=""):
    met = None if value is None or limit is None else value <= limit
    return {"metric": metric, "value": value, "target": limit, "met": met, "unit": unit, "note": note}


def next_node(cur):
    return NODES[(NODES.index(cur) + 1) % len(NODES)]


class Publisher:
    """Pre-opened pika channels per broker, so that the timestamp taken just
    before basic_publish is the moment the event leaves the Provider."""

    def __init__(self):
        self.conns = {}

    def _chan(self, host, port):
        import pika
        key = (host, port)
        if key not in self.conns:
            conn = pika.BlockingConnection(pika.ConnectionParameters(
                host=host, port=port, credentials=pika.PlainCredentials("guest", "guest"),
                heartbeat=0, connection_attempts=1, socket_timeout=5, blocked_connection_timeout=5))
            ch = conn.channel()
            ch.exchange_declare(exchange="dsm.provider.events", exchange_type="topic", durable=True)
            self.conns[key] = (conn, ch)
        return self.conns[key][1]

    def publish(self, host, port, body):
        """Returns the time.time() taken just before the publish."""
        import pika
        for attempt in (0, 1):
            try:
                ch = self._chan(host, port)
                t0 = time.time()
                ch.basic_publish(exchange="dsm.provider.events", routing_key="provider.primary.changed",
                                 body=json.dumps(body).encode(),
                                 properties=pika.BasicProperties(content_type="application/json"))
                return t0
            except Exception:
                self.drop(host, port)
                if attempt:
                    raise

    def drop(self, host, port):
        c = self.conns.pop((host, port), None)
        if c:
            try:
                c[0].close()
            except Exception:
                pass

    def close(self):
        for k in list(self.conns):
            self.drop(*k)


class FilePoller(threading.Thread):
    """Polls the settings file every ~1 ms; records when each epoch first
    appears (the rename is visible before the directory fsync)."""

    def __init__(self, path, period=0.001):
        super().__init__(daemon=True)
        self.path = path
        self.period = period
        self.seen = {}  # epoch -> time.time()
        self.stop_ev = threading.Event()

    def run(self):
        last = None
        while not self.stop_ev.is_set():
            try:
                st = os.stat(self.path)
                key = (st.st_ino, st.st_mtime_ns, st.st_size)
                if key != last:
                    t = time.time()
                    with open(self.path) as f:
                        text = f.read()
                    last = key
                    for line in text.splitlines():
                        if line.startswith("epoch"):
                            ep = int(line.split("=")[1])
                            self.seen.setdefault(ep, t)
            except (OSError, ValueError, IndexError):
                pass
            time.sleep(self.period)

    def stop(self):
        self.stop_ev.set()
        self.join(2)


def _start_daemon(env, sim, name, overrides):
    d = env.new_daemon(name, sim, overrides)
    tail = LogTail(d.log_path)
    d.start(wait=True, timeout=20)
    st = sim.state()
    peer = env.broker_of(st, st["primary_id"])
    if not wait_log(tail, is_connected(peer), 30):
        raise RuntimeError("daemon %s never connected to %s\n%s" % (name, peer, d.log_tail()))
    return d, tail


def measure_floor(env, sim, broker, directory, n):
    """The floor on the same broker, simulator and file system."""
    log("floor: amqp_probe x%d on %s:%d, GET x%d, atomic replace x%d" % (n, broker.host, broker.port, 5 * n, n))
    amqp = probe_amqp(broker.host, broker.port, n)
    get = probe_http_get(sim.urls["p1"], sim.token, 5 * n)
    rep = probe_atomic_replace(directory, n)
    f = {"publish_consume_ms": amqp["publish_consume_ms"], "amqp_setup_ms": amqp["setup_ms"],
         "http_get_ms": summary(get, 1000), "atomic_replace_ms": summary(rep, 1000)}
    f["event_path_ms"] = round(f["publish_consume_ms"]["p50"] + f["http_get_ms"]["p50"]
                               + f["atomic_replace_ms"]["p50"], 3)
    f["event_path_reconnect_ms"] = round(f["event_path_ms"] + f["amqp_setup_ms"]["p50"], 3)
    return f


# ----- 1. failover with an event ----------------------------------------------

def failover(env, opts):
    n = opts.promotes
    env.start_brokers()
    sim = env.start_sim("failover")
    pub = Publisher()
    fp = None
    try:
        d, tail = _start_daemon(env, sim, "failover", FAILOVER_CFG)
        fp = FilePoller(d.settings_file)
        fp.start()
        settings, settings_file, connected, committed, dropped = [], [], [], [], 0
        cur = sim.state()["primary_id"]
        log("failover: %d promotes with an event" % n)
        for i in range(n):
            st = sim.state()
            old_b = st["nodes"][cur]["broker"]
            nxt = next_node(cur)
            new_peer = env.broker_of(st, nxt)
            tail.skip_to_end()
            r = sim.promote(nxt, event=False)
            ep = r["epoch"]
            t0 = pub.publish(old_b["host"], old_b["port"],
                             {"epoch": ep, "primary_id": nxt, "api_url": sim.urls[nxt]})
            got_s = got_c = got_k = None
            deadline = time.monotonic() + 15
            while (got_s is None or got_c is None) and time.monotonic() < deadline:
                for t, f in tail.read():
                    if got_k is None and f.get("MESSAGE_ID") == MID_PRIMARY_COMMITTED \
                            and f.get("DSM_EPOCH") == str(ep):
                        got_k = t
                    if got_s is None and is_settings(ep)(f):
                        got_s = t
                    if got_c is None and is_connected(new_peer)(f):
                        got_c = t
                time.sleep(0.002)
            if got_s is None or got_c is None:
                raise RuntimeError("failover %d: no convergence to %s\n%s" % (i, nxt, d.log_tail()))
            if got_s < t0 - 0.001:  # the 30 s poll timer won the race: not an event latency
                dropped += 1
            else:
                settings.append(got_s - t0)
                connected.append(got_c - t0)
                if got_k is not None:
                    committed.append(got_k - t0)
                fs = fp.seen.get(ep)
                if fs is not None:
                    settings_file.append(fs - t0)
            cur = nxt
            time.sleep(0.15)  # let the old connection close before the next event
        fp.stop()
        broker = env.brokers[0]
        floor = measure_floor(env, sim, broker, d.workdir, opts.floor_n)
        res = {"promotes": n, "dropped_poll_won": dropped,
               "settings_ms": summary(settings, 1000),
               "settings_file_poll_ms": summary(settings_file, 1000),
               "committed_log_ms": summary(committed, 1000),
               "new_broker_connected_ms": summary(connected, 1000),
               "floor": floor}
        lim1 = round(2 * floor["event_path_ms"], 3)
        lim2 = round(2 * floor["event_path_reconnect_ms"] + MOVE_SPREAD_MS, 3)
        res["targets"] = [
            target("failover: event -> settings rewritten, p99", res["settings_ms"]["p99"], lim1,
                   note="2 x (publish-to-consume + GET + atomic replace) p50 floors"),
            target("failover: event -> new broker consuming, p99", res["new_broker_connected_ms"]["p99"],
                   lim2, note="2 x (that + bare AMQP connect..consume) p50 floors + the move's spread (1 s)"),
        ]
        res["ratios"] = {"settings_p99_over_floor": _ratio(res["settings_ms"]["p99"], floor["event_path_ms"]),
                         "connected_p99_over_floor": _ratio(res["new_broker_connected_ms"]["p99"],
                                                            floor["event_path_reconnect_ms"])}
        return res
    finally:
        if fp is not None:
            fp.stop()
        pub.close()
        env.stop_daemons()
        env.stop_sim(sim)


def _ratio(a, b):
    return None if a is None or not b else round(a / b, 2)


# ----- 2. the Primary dies, promotion without an event ---------------------------

def primary_death(env, opts):
    n = opts.deaths
    env.start_brokers()
    sim = env.start_sim("death")
    restarts = {}
    restart_s = []

    def restart(idx):
        try:
            restart_s.append(env.restart_broker(env.brokers[idx]))
        except Exception as e:  # the iteration that needs it reports it
            log("broker %d restart failed: %s" % (idx, str(e).splitlines()[0] if str(e) else repr(e)))

    try:
        d, tail = _start_daemon(env, sim, "death", FAILOVER_CFG)
        from_promote, from_kill, connected, misses = [], [], [], []
        cur = sim.state()["primary_id"]
        log("primary death: %d iterations (each kills a broker; restarts run in the background)" % n)
        for i in range(n):
            nxt = next_node(cur)
            nidx = NODES.index(nxt) % len(env.brokers)
            job = restarts.pop(nidx, None)
            if job is not None:
                job[0].wait(300)
            if not env.brokers[nidx].alive():
                log("broker of %s is down; starting it again" % nxt)
                env.call_in_worker(lambda: env.restart_broker(env.brokers[nidx]))
            st = sim.state()
            new_peer = env.broker_of(st, nxt)
            cidx = NODES.index(cur) % len(env.brokers)
            tail.skip_to_end()
            sim.kill(cur)
            t_kill = time.time()
            env.brokers[cidx].kill()
            t_p = time.time()
            r = sim.promote(nxt, event=False)
            ep = r["epoch"]
            got_s = got_c = None
            deadline = time.monotonic() + 15
            while (got_s is None or got_c is None) and time.monotonic() < deadline:
                for t, f in tail.read():
                    if got_s is None and is_settings(ep)(f):
                        got_s = t
                    if got_c is None and is_connected(new_peer)(f):
                        got_c = t
                time.sleep(0.002)
            if got_s is None:
                raise RuntimeError("death %d: no settings for %s\n%s" % (i, nxt, d.log_tail()))
            from_promote.append(got_s - t_p)
            from_kill.append(got_s - t_kill)
            if got_c is None:  # counted, reported; the next iteration still runs
                misses.append({"iteration": i, "epoch": ep, "broker": new_peer})
                log("death %d: no broker connection to %s within 15 s" % (i, new_peer))
            else:
                connected.append(got_c - t_p)
            # The dead node comes back as a caught-up Standby; its broker restarts meanwhile.
            sim.sync(cur)
            sim.start_node(cur)
            restarts[cidx] = env.in_worker(lambda idx=cidx: restart(idx))
            cur = nxt
            time.sleep(0.3)
        for job in restarts.values():
            job[0].wait(300)
        res = {"iterations": n,
               "settings_from_promote_ms": summary(from_promote, 1000),
               "settings_from_kill_ms": summary(from_kill, 1000),
               "new_broker_connected_from_promote_ms": summary(connected, 1000),
               "broker_restart_s": summary(restart_s),
               "broker_not_connected_within_15s": misses}
        fast = 500.0
        res["targets"] = [target("primary death: promote -> settings rewritten, p99",
                                 res["settings_from_promote_ms"]["p99"], fast + 250,
                                 note="fast_poll_interval 500 ms + 250 ms; poll_jitter 0.2"),
                          target("primary death: iterations without a broker connection after 15 s",
                                 len(misses), 0, "")]
        return res
    finally:
        for job in restarts.values():
            job[0].wait(300)
        env.stop_daemons()
        env.stop_sim(sim)


# ----- 3. idle footprint -------------------------------------------------------

def idle(env, opts):
    dur = opts.idle_seconds
    env.start_brokers()
    sim = env.start_sim("idle")
    try:
        d, tail = _start_daemon(env, sim, "idle", {})
        time.sleep(2.0)  # let start-up work (first round, on_change) finish
        pid = d.pid
        c0, w0, t0 = proc_cpu_seconds(pid), proc_ctxsw(pid), time.monotonic()
        log("idle: %d s connected and idle (poll_interval %s, heartbeat %s)"
            % (dur, PROD["poll_interval"], PROD["heartbeat"]))
        time.sleep(dur)
        c1, w1, t1 = proc_cpu_seconds(pid), proc_ctxsw(pid), time.monotonic()
        mem = proc_mem(pid)
        top = proc_private_by_mapping(pid)
        el = t1 - t0
        res = {"seconds": round(el, 1), "config": dict(PROD),
               "private_kib": mem["private_kib"], "private_dirty_kib": mem["private_dirty_kib"],
               "pss_kib": mem["pss_kib"], "rss_kib": mem["rss_kib"],
               "threads": proc_threads(pid),
               "private_top_kib": [[k, m] for k, m in top],
               "cpu_ms": round((c1 - c0) * 1000, 1), "cpu_percent": round(100 * (c1 - c0) / el, 4),
               "wakeups_per_s": round((w1 - w0) / el, 3), "context_switches": w1 - w0}
        res["targets"] = [target("idle: private dirty memory", round(mem["private_dirty_kib"] / 1024, 3), 2.0,
                                 "MiB"),
                          target("idle: wakeups", res["wakeups_per_s"], 0.5, "/s")]
        return res
    finally:
        env.stop_daemons()
        env.stop_sim(sim)


# ----- 4. notify ---------------------------------------------------------------

# ----- 2b. the Primary's host vanishes (rule 7) --------------------------------

def vanished(env, opts):
    """The Primary's host vanishes: its API accepts and never answers and its
    broker is frozen (SIGSTOP: no RST, no FIN). The operator promotes the
    next node and the Provider API notifies the agent. Measured: notify ->
    settings rewritten. With request_timeout 5 s, only a round that decides
    as soon as its answers decide it (rule 7) gets there in milliseconds."""
    n = opts.deaths
    env.start_brokers()
    sim = env.start_sim("vanished")
    cfg = {"provider": {"poll_interval": "30s", "fast_poll_interval": "500ms", "request_timeout": "5s"},
           "broker": {"heartbeat": "2s"}}
    frozen = None
    try:
        d, tail = _start_daemon(env, sim, "vanished", cfg)
        conn = _notify_conn(d)
        token = d.notify_token
        lat = []
        cur = sim.state()["primary_id"]
        log("vanished host: %d iterations, request_timeout 5 s" % n)
        for i in range(n):
            nxt = next_node(cur)
            cidx = NODES.index(cur) % len(env.brokers)
            sim.hang(cur, True)
            frozen = env.brokers[cidx]
            frozen.sigstop()
            ep = sim.promote(nxt, event=False)["epoch"]
            tail.skip_to_end()
            t0 = time.time()
            if _post(conn, token) != 202:
                raise RuntimeError("notify refused")
            got = wait_log(tail, is_settings(ep), 15)
            if got is None:
                raise RuntimeError("vanished %d: no settings for %s\n%s" % (i, nxt, d.log_tail()))
            lat.append(got[0] - t0)
            # The host comes back as a caught-up Standby before the next turn.
            frozen.sigcont()
            frozen = None
            sim.hang(cur, False)
            sim.sync(cur)
            cur = nxt
            time.sleep(0.3)
        res = {"iterations": n, "notify_to_settings_ms": summary(lat, 1000)}
        res["targets"] = [target("vanished host: notify -> settings rewritten, p99",
                                 res["notify_to_settings_ms"]["p99"], 50.0,
                                 note="request_timeout 5 s; the issue's goal")]
        return res
    finally:
        if frozen is not None:
            frozen.sigcont()
        env.stop_daemons()
        env.stop_sim(sim)


def _notify_conn(d):
    return http.client.HTTPConnection("127.0.0.1", d.notify_port, timeout=5)


def _post(conn, token):
    conn.request("POST", "/v1/notify", body=b"", headers={"Authorization": "Bearer " + token,
                                                          "Content-Length": "0"})
    r = conn.getresponse()
    r.read()
    return r.status


def notify(env, opts):
    env.start_brokers()
    sim = env.start_sim("notify")
    try:
        d, tail = _start_daemon(env, sim, "notify", {})
        time.sleep(1.0)
        # Latency: notify -> first GET the simulator sees (spaced under the rate limit).
        lat, rtt = [], []
        conn = _notify_conn(d)
        log("notify: %d latency samples" % opts.notify_samples)
        for i in range(opts.notify_samples):
            t0 = time.time()
            st = _post(conn, d.notify_token)
            rtt.append(time.time() - t0)
            if st != 202:
                raise RuntimeError("notify answered %d" % st)
            time.sleep(0.2)
            first = None
            for nid in NODES:
                for req in sim.requests(nid, 20):
                    if req["t"] >= t0 and (first is None or req["t"] < first):
                        first = req["t"]
            if first is not None:
                lat.append(first - t0)
        conn.close()
        time.sleep(2.5)  # refill the token bucket
        # Throughput: C keep-alive clients for D seconds.
        C, D = opts.notify_clients, opts.notify_seconds
        counts = [dict() for _ in range(C)]
        stop_at = time.monotonic() + D
        pid = d.pid
        cpu0 = proc_cpu_seconds(pid)

        def client(k):
            c = _notify_conn(d)
            cnt = counts[k]
            while time.monotonic() < stop_at:
                try:
                    s = _post(c, d.notify_token)
                    cnt[s] = cnt.get(s, 0) + 1
                except (OSError, http.client.HTTPException):
                    cnt["error"] = cnt.get("error", 0) + 1
                    c.close()
                    c = _notify_conn(d)
            c.close()

        log("notify: throughput, %d clients for %d s" % (C, D))
        t0 = time.monotonic()
        ths = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(C)]
        for t in ths:
            t.start()
        for t in ths:
            t.join(D + 10)
        el = time.monotonic() - t0
        cpu = proc_cpu_seconds(pid) - cpu0
        tot = {}
        for cnt in counts:
            for k, v in cnt.items():
                tot[str(k)] = tot.get(str(k), 0) + v
        answered = sum(v for k, v in tot.items() if k != "error")
        res = {"latency_to_poll_ms": summary(lat, 1000), "notify_rtt_ms": summary(rtt, 1000),
               "clients": C, "seconds": round(el, 2), "status_counts": tot,
               "accepted_per_s": round(tot.get("202", 0) / el, 1),
               "answered_per_s": round(answered / el, 1),
               "daemon_cpu_percent": round(100 * cpu / el, 1)}
        res["targets"] = []
        return res
    finally:
        env.stop_daemons()
        env.stop_sim(sim)


# ----- 5. fleet: tests/bench/fleet.py -----------------------------------------
