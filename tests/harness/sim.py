"""The Provider simulator (tests/provider_sim.py) as a subprocess, and a
client for its control API with the simulator's method names.

    s = Sim.start(token="t0k3n", brokers={"p1": ("127.0.0.1", 5672)}, workdir=d)
    s.urls                      # {"p1": "http://127.0.0.1:PORT", ...}
    s.lb_url, s.control_url, s.token, s.token_file
    s.promote("p2"); s.kill("p1"); s.state()
    s.get_state("p1")           # (status, headers, parsed JSON or bytes) as a client
    s.acks(5); s.register_agent("agent-001", url, token); s.notify_unacked(5)
                                # with extra_args=["--acks"] (tests/provider_acks.py)
    s.stop()                    # SIGTERM, bounded wait, SIGKILL
"""

import base64
import json
import os
import select
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request

from . import util

SIM_PATH = os.path.join(util.TESTS_DIR, "provider_sim.py")


class SimError(RuntimeError):
    pass


class Sim:
    def __init__(self, proc, endpoints, token, token_file, workdir, log_path):
        self.proc = proc
        self.pid = proc.pid
        self.urls = dict(endpoints["nodes"])
        self.lb_url = endpoints["load_balancer"]
        self.control_url = endpoints["control"]
        self.token = token
        self.token_file = token_file
        self.workdir = workdir
        self.log_path = log_path

    @classmethod
    def start(cls, token="sim-provider-token", brokers=None, nodes=3, workdir=None,
              extra_args=(), timeout=10.0):
        """brokers: {"p1": (host, port), ...}; nodes without one get
        127.0.0.1:5672 (the simulator's default)."""
        workdir = workdir or tempfile.mkdtemp(prefix="dsm-sim-")
        os.makedirs(workdir, exist_ok=True)
        token_file = os.path.join(workdir, "provider.token")
        fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
        args = [util.PYTHON, SIM_PATH, "--nodes", str(nodes), "--token-file", token_file]
        for nid, (host, port) in sorted((brokers or {}).items()):
            args += ["--broker", "%s=%s:%d" % (nid, host, port)]
        args += list(extra_args)
        log_path = os.path.join(workdir, "sim.log")
        log = open(log_path, "ab")
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=log, start_new_session=True,
                                preexec_fn=util.pdeathsig_term)
        log.close()
        key = ("sim", proc.pid)
        util.register_cleanup(key, lambda: util.stop_popen(proc, timeout=3))
        try:
            line = cls._read_line(proc, timeout)
            endpoints = json.loads(line)
        except BaseException as e:
            util.stop_popen(proc, timeout=3)
            util.unregister_cleanup(key)
            if not isinstance(e, Exception):
                raise
            with open(log_path, "rb") as f:
                raise SimError("simulator failed to start:\n" + f.read().decode(errors="replace"))
        return cls(proc, endpoints, token, token_file, workdir, log_path)

    @staticmethod
    def _read_line(proc, timeout):
        deadline = time.monotonic() + timeout
        buf = b""
        fd = proc.stdout.fileno()
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("simulator did not print its ports")
            r, _, _ = select.select([fd], [], [], left)
            if r:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise SimError("simulator exited: %s" % proc.poll())
                buf += chunk
        return buf.split(b"\n", 1)[0].decode()

    def alive(self):
        return self.proc.poll() is None

    def stop(self, timeout=5.0):
        rc = util.stop_popen(self.proc, timeout=timeout)
        util.unregister_cleanup(("sim", self.proc.pid))
        try:
            self.proc.stdout.close()
        except Exception:
            pass
        return rc

    def log_text(self):
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    # ----- control API ---------------------------------------------------------

    def call(self, name, timeout=30.0, **args):
        data = json.dumps(args).encode()
        req = urllib.request.Request(self.control_url + "/" + name, data=data, method="POST",
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                doc = json.loads(r.read())
        except urllib.error.HTTPError as e:
            raise SimError("%s: HTTP %d %s" % (name, e.code, e.read().decode(errors="replace")))
        if not doc.get("ok"):
            raise SimError("%s: %s" % (name, doc))
        return doc.get("result")

    def _get(self, path, timeout=10.0):
        with urllib.request.urlopen(self.control_url + path, timeout=timeout) as r:
            return json.loads(r.read())["result"]

    def state(self):
        return self._get("/state")

    def requests(self, node_id, limit=100):
        return self._get("/requests?node=%s&limit=%d" % (node_id, limit))

    def stats(self):
        """GET /stats: requests, service latency and per-second counts."""
        return self._get("/stats")

    def counters(self, node_id):
        return self.state()["nodes"][node_id]["counters"]

    def promote(self, node_id, event=True):
        return self.call("promote", node=node_id, event=event)

    def kill(self, node_id):
        return self.call("kill", node=node_id)

    def start_node(self, node_id):
        return self.call("start", node=node_id)

    def sync(self, node_id):
        return self.call("sync", node=node_id)

    def revive_stale(self, node_id):
        return self.call("revive_stale", node=node_id)

    def conflict(self, node_id):
        return self.call("conflict", node=node_id)

    def hang(self, node_id, on=True):
        return self.call("hang", node=node_id, on=on)

    def slow(self, node_id, seconds):
        return self.call("slow", node=node_id, seconds=seconds)

    def fail(self, node_id, mode):
        return self.call("fail", node=node_id, mode=str(mode))

    def forge(self, node_id, doc=None):
        return self.call("forge", node=node_id, doc=doc)

    def lag(self, node_id, on=True):
        return self.call("lag", node=node_id, on=on)

    def set_version(self, node_id, version, event=False):
        return self.call("set_version", node=node_id, version=version, event=event)

    def offer_update(self, version, data, sha256=None, size=None, served=None, event=False):
        if isinstance(data, str):
            data = data.encode()
        args = {"version": version, "data_b64": base64.b64encode(data).decode(), "event": event}
        if sha256 is not None:
            args["sha256"] = sha256
        if size is not None:
            args["size"] = size
        if served is not None:
            args["served_b64"] = base64.b64encode(served).decode()
        return self.call("offer_update", **args)

    def withdraw_update(self):
        return self.call("withdraw_update")

    def drop_package(self, version):
        return self.call("drop_package", version=version)

    def set_broker(self, node_id, host, port, vhost=None, tls=None):
        args = {"node": node_id, "host": host, "port": port}
        if vhost is not None:
            args["vhost"] = vhost
        if tls is not None:
            args["tls"] = tls
        return self.call("set_broker", **args)

    def set_token(self, token):
        self.token = token
        return self.call("set_token", token=token)

    def publish(self, node_id, routing_key, body):
        if isinstance(body, (dict, list)):
            return self.call("publish", node=node_id, routing_key=routing_key, json=body)
        if isinstance(body, str):
            body = body.encode()
        return self.call("publish", node=node_id, routing_key=routing_key,
                         body_b64=base64.b64encode(body).decode())

    def reset_counters(self):
        return self.call("reset_counters")

    # Convergence acknowledgements (the simulator started with --acks).

    def acks(self, epoch=None):
        return self.call("acks") if epoch is None else self.call("acks", epoch=epoch)

    def register_agent(self, agent_id, notify_url, token):
        return self.call("register_agent", agent_id=agent_id, notify_url=notify_url, token=token)

    def agents(self):
        return self.call("agents")

    def notify_unacked(self, epoch):
        return self.call("notify_unacked", epoch=epoch)

    def wait_acks_bound(self, timeout=10.0):
        """Waits until the ack consumer of every broker is bound; returns the
        consumers. Raises TimeoutError naming the others."""
        deadline = time.monotonic() + timeout
        while True:
            cons = self.acks()["consumers"]
            if cons and all(c["state"] == "bound" for c in cons):
                return cons
            if time.monotonic() >= deadline:
                raise TimeoutError("ack consumers not bound within %.1fs: %r" % (timeout, cons))
            time.sleep(0.05)

    # ----- acting as a Provider client (for tests of the simulator) -----------

    def url_of(self, node_id_or_lb):
        return self.lb_url if node_id_or_lb == "lb" else self.urls[node_id_or_lb]

    def get(self, node_id_or_lb, path="/api/v1/ha/state", token=None, headers=None, timeout=5.0):
        """GET as a client: returns (status, headers dict, body bytes).
        token=None uses the simulator's token; token="" sends none."""
        h = dict(headers or {})
        tok = self.token if token is None else token
        if tok:
            h["Authorization"] = "Bearer " + tok
        req = urllib.request.Request(self.url_of(node_id_or_lb) + path, headers=h)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, dict(r.headers), r.read()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read()

    def get_state(self, node_id_or_lb, **kw):
        status, headers, body = self.get(node_id_or_lb, **kw)
        try:
            return status, headers, json.loads(body)
        except ValueError:
            return status, headers, body
