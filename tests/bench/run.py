#!/usr/bin/python3
"""make bench: dsm-agent-syncd benchmarks against real RabbitMQ nodes and the
Provider simulator on loopback, with the floor measured in the same run.

    DSM_BUILD_DIR=build /usr/bin/python3 tests/bench/run.py [--quick]
        [--only failover,death,vanished,idle,notify,fleet,fleet_spread]
        [--agents N] [--markdown]
    make bench AGENTS=1000 BENCH_ARGS='--only fleet'

Prints a readable report, writes every figure to build/bench.json (or
--json PATH), and with --markdown also prints the table that
docs/performance.md carries. Sections: failover (issue 3), death (issue 3),
vanished (rule 7), idle (issue 3), notify (issue 4), fleet and fleet_spread
(issues 8 and 14; in fleet.py; N agents: --agents, else $AGENTS, else 200).
"""

import argparse
import datetime
import json
import os
import platform
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import fleet  # noqa: E402
import sections  # noqa: E402

SECTIONS = ("failover", "death", "vanished", "idle", "notify", "fleet", "fleet_spread")


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small smoke run (minutes -> about one)")
    ap.add_argument("--only", default="", help="comma-separated sections: " + ",".join(SECTIONS))
    ap.add_argument("--agents", type=int, default=None, help="fleet size (default $AGENTS or 200; quick 20)")
    ap.add_argument("--json", default=None, help="output file (default $DSM_BUILD_DIR/bench.json)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs) under /tmp")
    ap.add_argument("--markdown", action="store_true", help="also print the docs/performance.md table")
    a = ap.parse_args(argv)
    q = a.quick
    a.sections = [s.strip() for s in a.only.split(",") if s.strip()] or list(SECTIONS)
    for s in a.sections:
        if s not in SECTIONS:
            ap.error("unknown section %r" % s)
    a.promotes = 10 if q else 50
    a.deaths = 4 if q else 20
    a.idle_seconds = 10 if q else 60
    a.floor_n = 30 if q else 200
    a.notify_samples = 10 if q else 40
    a.notify_clients = 4
    a.notify_seconds = 2 if q else 5
    if a.agents is None:
        a.agents = int(os.environ.get("AGENTS") or (20 if q else 200))
    a.fleet_poll = "5s" if q else "30s"
    a.fleet_hint_spread = "0s"
    a.fleet_spread_value = "1s" if q else "4s"
    # One poll interval is enough at 500 agents and more (>= 50 requests/s):
    # keeps make bench AGENTS=1000 near 12 minutes.
    a.fleet_steady = 10 if q else (30 if a.agents >= 500 else 60)
    a.json = a.json or os.path.join(common.BUILD_DIR, "bench.json")
    return a


def _v(x, unit=""):
    if x is None:
        return "n/a"
    if isinstance(x, float):
        x = ("%.3f" % x).rstrip("0").rstrip(".") if abs(x) < 10 else "%.1f" % x
    return "%s%s" % (x, (" " + unit) if unit else "")


def report(res):
    out = []
    w = out.append
    m = res["machine"]
    w("dsm-agent-syncd benchmarks  %s  (%s CPUs, %s, load %s at start)"
      % (res["date"], m["cpus"], m["kernel"], m["loadavg"]))
    w("command: %s   total %.0f s" % (res["command"], res["total_seconds"]))
    s = res["sections"]
    if "failover" in s and "error" not in s["failover"]:
        f = s["failover"]
        fl = f["floor"]
        w("\n1. Failover with an event (%d promotes, poll_interval 30s, heartbeat 2s; %d dropped: poll won)"
          % (f["promotes"], f["dropped_poll_won"]))
        w("   event -> primary committed (daemon log):   " + common.fmt_ms(f["committed_log_ms"]))
        w("   event -> settings rewritten (daemon log):  " + common.fmt_ms(f["settings_ms"]))
        w("   event -> settings visible (1 ms file poll): " + common.fmt_ms(f["settings_file_poll_ms"]))
        w("   event -> new broker consuming (daemon log): " + common.fmt_ms(f["new_broker_connected_ms"]))
        w("   floor (p50): publish->consume %.2f ms, GET state %.2f ms, atomic replace %.2f ms, "
          "AMQP connect..consume %.2f ms"
          % (fl["publish_consume_ms"]["p50"], fl["http_get_ms"]["p50"], fl["atomic_replace_ms"]["p50"],
             fl["amqp_setup_ms"]["p50"]))
        w("   settings p99 / floor = %sx (target <= 2x); connected p99 / floor = %sx (target <= 2x + 1 s move spread)"
          % (_v(f["ratios"]["settings_p99_over_floor"]), _v(f["ratios"]["connected_p99_over_floor"])))
    if "death" in s and "error" not in s["death"]:
        f = s["death"]
        w("\n2. Primary dies (API + broker SIGKILLed), promotion without an event (%d iterations)"
          % f["iterations"])
        w("   promote -> settings rewritten:   " + common.fmt_ms(f["settings_from_promote_ms"]))
        w("   broker kill -> settings:         " + common.fmt_ms(f["settings_from_kill_ms"]))
        w("   promote -> new broker consuming: " + common.fmt_ms(f["new_broker_connected_from_promote_ms"]))
        w("   iterations without a broker connection within 15 s: %d" % len(f["broker_not_connected_within_15s"]))
        w("   (RabbitMQ restart between iterations, in the background: p50 %s s)"
          % _v(f["broker_restart_s"]["p50"]))
    if "idle" in s and "error" not in s["idle"]:
        f = s["idle"]
        w("\n3. Idle footprint (%s s connected, poll_interval 30s, heartbeat 10s)" % f["seconds"])
        w("   private %s KiB (of which dirty %s KiB), PSS %s KiB, RSS %s KiB, %d thread(s)"
          % (f["private_kib"], f.get("private_dirty_kib"), f["pss_kib"], f["rss_kib"], f["threads"]))
        w("   largest private mappings (KiB): " + ", ".join("%s %s" % (m, k) for k, m in f["private_top_kib"]))
        w("   CPU %s ms (%s %%), wakeups %s/s (%d context switches)"
          % (f["cpu_ms"], f["cpu_percent"], f["wakeups_per_s"], f["context_switches"]))
    if "notify" in s and "error" not in s["notify"]:
        f = s["notify"]
        w("\n4. Notify")
        w("   notify -> first Provider GET:  " + common.fmt_ms(f["latency_to_poll_ms"]))
        w("   notify request round trip:     " + common.fmt_ms(f["notify_rtt_ms"]))
        w("   %d keep-alive clients, %s s: accepted %s/s, answered %s/s (status counts %s), daemon CPU %s %%"
          % (f["clients"], f["seconds"], f["accepted_per_s"], f["answered_per_s"],
             json.dumps(f["status_counts"], sort_keys=True), f["daemon_cpu_percent"]))
    for fname in ("fleet", "fleet_spread"):
        if fname in s and "error" not in s[fname]:
            out.extend(report_fleet(s[fname]))
    for name, r in s.items():
        if "error" in r:
            w("\n%s: FAILED: %s" % (name, r["error"]))
    w("\nTargets")
    for t in res["targets"]:
        w("   [%s] %s: %s (target <= %s)" % ({True: "met", False: "MISSED", None: "n/a"}[t["met"]],
                                             t["metric"], _v(t["value"], t["unit"]), _v(t["target"], t["unit"])))
    return "\n".join(out)


def _cpu(c):
    if not c:
        return "n/a"
    parts = ["%s %s s (%s %%)" % (k, _v(c[k]["s"]), _v(c[k]["pct"]))
             for k in ("daemons", "brokers", "simulator", "bench", "other")]
    # One process, one thread serving (GIL or event loop): its bound is one core.
    parts[2] = parts[2][:-1] + "; %s %% of one core)" % _v(round(c["simulator"]["pct"] * c["cpus"], 1))
    kids = c.get("daemons_children")
    if kids and kids["s"]:
        parts.insert(1, "their on_change runs %s s" % _v(kids["s"]))
    io = c.get("iowait")
    return "%s; machine busy %s %% of %d CPUs%s" % (", ".join(parts), _v(c["machine"]["pct"]), c["cpus"],
                                                   ", iowait %s %%" % _v(io["pct"]) if io else "")


def _lat(lat):
    if lat is None:
        return "n/a (threaded simulator)"
    return "p50 %s ms, p90 %s ms, p99 %s ms, max %s ms (n=%s)" % (
        _v(lat.get("p50")), _v(lat.get("p90")), _v(lat.get("p99")), _v(lat.get("max")), lat.get("count"))


def report_fleet(f):
    out = []
    w = out.append
    st = f["steady"]
    mem = f["memory"]
    w("\n5. Fleet: %d agents (poll_interval %s, heartbeat %s, hint_spread %s, fast_poll_interval %s); "
      "all connected %s s after the first start (batches of %s)"
      % (f["agents"], f["poll_interval"], f["heartbeat"], f.get("hint_spread", "0s"), f.get("fast_poll_interval"),
         f["start_to_all_connected_s"], f.get("start_batch")))
    w("   per agent (KiB, mean / max): RSS %s / %s, private dirty %s / %s, private %s / %s, PSS %s / %s"
      % tuple(_v(mem[k][m]) for k in ("rss_kib", "private_dirty_kib", "private_kib", "pss_kib")
              for m in ("mean", "max")))
    w("   steady %s s: %s req/s (%s per 1000 agents; 200: %s, 304: %s), peak 1 s bucket %s req/s [%s]"
      % (st["seconds"], st["rps"], st["rps_per_1000_agents"], st["status_200"], st["status_304"],
         st["peak_1s_rps"], st["rate_source"]))
    w("      CPU: " + _cpu(st["cpu"]))
    w("      simulator's own request latency: " + _lat(st["sim_latency_ms"]))
    for k, label, ref in (("event_failover", "promote with an event", "publish"),
                          ("primary_death", "primary death (promote without an event)", "promote")):
        e = f[k]
        w("   %s: %d/%d settings rewritten, %d/%d consuming on the new broker, all within %s s of the %s"
          % (label, e["converged"], e["of"], e["connected"], e["of"], e["window_s"], ref))
        w("      settings rewritten:            " + common.fmt_ms(e["settings_ms"]))
        w("      consuming on the new broker:   " + common.fmt_ms(e["connected_ms"]))
        w("      Provider state requests until all consume: %s = %s per agent; peak 1 s %s req/s = %sx the steady "
          "rate, %sx its peak [%s]"
          % (e["requests"], e["requests_per_agent"], e["provider_peak_rps"],
             _v(_ratio(e["provider_peak_rps"], st["rps"])), _v(_ratio(e["provider_peak_rps"], st["peak_1s_rps"])),
             e["rate_source"]))
        w("      connection storm (first..last consuming) %s ms; agents logging a broker loss or failed attempt "
          "%d (%d lines%s)" % (e["storm_ms"], e["agents_with_failed_attempts"], e["broker_lost_lines"],
             "".join("; %d x %s" % (c, r) for r, c in sorted(e.get("broker_lost_reasons", {}).items(),
                                                           key=lambda x: -x[1]))))
        w("      CPU: " + _cpu(e["cpu"]))
        w("         per agent: daemon %s ms, brokers %s ms"
          % (_v(round(1000 * e["cpu"]["daemons"]["s"] / f["agents"], 2)),
             _v(round(1000 * e["cpu"]["brokers"]["s"] / f["agents"], 2))))
        w("      simulator's own request latency: " + _lat(e["sim_latency_ms"]))
        tl = e.get("busy_timeline") or []
        if tl:
            w("      % of the CPUs busy (machine/daemons/brokers) in the interval ending at t s: "
              + " ".join("%s:%.0f/%.0f/%.0f" % tuple(x) for x in tl))
    return out


def _ratio(a, b):
    return None if a is None or not b else round(a / b, 1)


def markdown(res):
    out = ["| target | measured | limit | met |", "| --- | --- | --- | --- |"]
    for t in res["targets"]:
        out.append("| %s | %s | <= %s | %s |" % (t["metric"], _v(t["value"], t["unit"]), _v(t["target"], t["unit"]),
                                                 {True: "yes", False: "**no**", None: "n/a"}[t["met"]]))
    return "\n".join(out)


def main(argv=None):
    opts = parse_args(argv if argv is not None else sys.argv[1:])
    nofile = common.raise_nofile()

    def on_term(signum, frame):
        raise KeyboardInterrupt()

    signal.signal(signal.SIGTERM, on_term)
    for exe in (os.path.join(common.BUILD_DIR, "dsm-agent-syncd"), os.path.join(common.TOOLS_DIR, "amqp_probe")):
        if not os.path.exists(exe):
            sys.stderr.write("missing %s: run make all and the tools first (make bench does)\n" % exe)
            return 2
    t_start = time.monotonic()
    res = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
           "command": " ".join(["tests/bench/run.py"] + (argv if argv is not None else sys.argv[1:])),
           "machine": {"cpus": os.cpu_count(), "kernel": platform.release(),
                       "loadavg": open("/proc/loadavg").read().split()[0], "nofile": nofile[0]},
           "quick": opts.quick, "sections": {}, "targets": []}
    env = common.Env()
    funcs = {"failover": sections.failover, "death": sections.primary_death, "vanished": sections.vanished, "idle": sections.idle,
             "notify": sections.notify, "fleet": fleet.fleet, "fleet_spread": fleet.fleet_spread}
    failed = False
    try:
        for name in opts.sections:
            t0 = time.monotonic()
            common.log("section %s" % name)
            try:
                r = funcs[name](env, opts)
            except KeyboardInterrupt:
                raise
            except Exception as e:  # report and go on with the next section
                import traceback
                traceback.print_exc()
                r = {"error": "%s: %s" % (type(e).__name__, str(e).splitlines()[0] if str(e) else "")}
                failed = True
            r["section_seconds"] = round(time.monotonic() - t0, 1)
            res["sections"][name] = r
            res["targets"].extend(r.get("targets", []))
            common.log("section %s done in %.0f s" % (name, r["section_seconds"]))
    except KeyboardInterrupt:
        common.log("interrupted")
        failed = True
    finally:
        env.close(keep=opts.keep or failed)
        if env.rabbit_start_s is not None:
            res["rabbit_start_seconds"] = round(env.rabbit_start_s, 1)
        res["total_seconds"] = round(time.monotonic() - t_start, 1)
        os.makedirs(os.path.dirname(os.path.abspath(opts.json)), exist_ok=True)
        with open(opts.json, "w") as f:
            json.dump(res, f, indent=2, sort_keys=True)
            f.write("\n")
    print(report(res))
    if opts.markdown:
        print("\n" + markdown(res))
    print("\nfigures: %s" % opts.json)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
