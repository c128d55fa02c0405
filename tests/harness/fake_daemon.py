#!/usr/bin/python3
"""A minimal stand-in for dsm-agent-syncd, used only to test the harness
itself (tests/integration/test_sim.py) without the real binary: reads the
INI, sends READY=1/STATUS=/WATCHDOG=1 like sd_notify, polls the endpoints
(no rule: follows the first node that says primary with the highest epoch),
writes the settings file, serves /healthz, /v1/status and /v1/notify.
Not a model of the daemon's behaviour."""

import configparser
import http.server
import json
import os
import signal
import socket
import sys
import threading
import time
import urllib.request


def sd_notify(msg):
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        s.sendto(msg.encode(), path)
    finally:
        s.close()


def main():
    cfg_path = sys.argv[sys.argv.index("-c") + 1]
    cp = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=(";",))
    cp.read(cfg_path)
    token = open(cp["provider"]["token_file"]).readline().strip()
    ntoken = open(cp["notify"]["token_file"]).readline().strip()
    endpoints = [x.strip() for x in cp["provider"]["endpoints"].split(",")]
    settings = cp["broker"]["settings_file"]
    stop = threading.Event()
    wake = threading.Event()
    status = {"epoch": 0, "primary": None, "counters": {"polls": 0, "notifies": 0}}

    class H(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def reply(self, code, obj):
            b = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Length", str(len(b)))
            self.end_headers()
            self.wfile.write(b)

        def authed(self):
            return self.headers.get("Authorization") == "Bearer " + ntoken

        def do_GET(self):
            if self.path == "/healthz":
                return self.reply(200, {"status": "ok"})
            if not self.authed():
                return self.reply(401, {"error": "unauthorized"})
            self.reply(200, status)

        def do_POST(self):
            n = int(self.headers.get("Content-Length") or 0)
            self.rfile.read(n)
            if not self.authed():
                return self.reply(401, {"error": "unauthorized"})
            status["counters"]["notifies"] += 1
            wake.set()
            self.reply(202, {"status": "accepted"})

    host, port = cp["notify"]["listen"].rsplit(":", 1)
    srv = http.server.ThreadingHTTPServer((host, int(port)), H)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    signal.signal(signal.SIGTERM, lambda *a: stop.set())
    sd_notify("READY=1\nSTATUS=starting")
    wd = int(os.environ.get("WATCHDOG_USEC") or 0)
    last_wd = 0.0
    while not stop.is_set():
        best = None
        for url in endpoints:
            try:
                req = urllib.request.Request(url + "/api/v1/ha/state",
                                             headers={"Authorization": "Bearer " + token})
                with urllib.request.urlopen(req, timeout=1) as r:
                    doc = json.loads(r.read())
                if doc["node"]["role"] == "primary" and (best is None or doc["epoch"] > best["epoch"]):
                    best = doc
            except Exception:
                pass
        status["counters"]["polls"] += 1
        if best and best["epoch"] > status["epoch"]:
            p, b = best["primary"], best["primary"]["broker"]
            text = ("# Managed by dsm-agent-syncd. Local changes are overwritten.\n[rabbitmq]\n"
                    "host = %s\nport = %d\nvhost = %s\ntls = %s\n\n[provider]\nprimary_id = %s\n"
                    "epoch = %d\napi_url = %s\n" % (b["host"], b["port"], b["vhost"],
                                                    "true" if b["tls"] else "false", p["id"],
                                                    best["epoch"], p["api_url"]))
            with open(settings + ".tmp", "w") as f:
                f.write(text)
            os.replace(settings + ".tmp", settings)
            status["epoch"], status["primary"] = best["epoch"], p["id"]
            sys.stderr.write("primary committed epoch=%d primary_id=%s\n" % (best["epoch"], p["id"]))
            sys.stderr.flush()
            sd_notify("STATUS=primary %s epoch %d" % (p["id"], best["epoch"]))
        if wd and time.monotonic() - last_wd >= wd / 2e6:
            sd_notify("WATCHDOG=1")
            last_wd = time.monotonic()
        wake.wait(0.1)
        wake.clear()
    srv.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
