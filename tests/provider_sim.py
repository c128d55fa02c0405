#!/usr/bin/python3
"""Provider HA cluster simulator for dsm-agent-sync (contract section 3).

Runs N Provider nodes (default 3: p1 primary, p2 and p3 standbys), each an
HTTP server on its own loopback port, a load balancer in front of them, and a
control API to drive failovers. A support engineer can point a real
dsm-agent-syncd at it and rehearse a failover; the test harness
(tests/harness/sim.py) drives the same operations.

Endpoints served by every node (and by the load balancer, which answers each
request as one up node, round-robin or random):

  GET /api/v1/ha/state                  the state document of contract section 3
                                        (Bearer token checked: 401 when wrong;
                                        ETag; 304 on If-None-Match)
  GET /api/v1/agent/packages/<version>  the bytes registered by offer_update

Control API (JSON over HTTP on --control-port, loopback only):

  GET  /state                           the whole simulated cluster
  GET  /requests?node=p1&limit=50       the last requests a node served
  POST /<operation>  {json arguments}   -> {"ok": true, "result": ...}

Operations (POST body fields in brackets):
  promote      {node, event=true}       epoch += 1, node becomes Primary; up,
                                        non-lagging nodes adopt it; when event,
                                        publish provider.primary.changed on the
                                        old and the new Primary's broker
  kill         {node}                   close the node's listener (refused)
  start        {node}                   listen again on the same port (the node
                                        keeps its own last view of the cluster)
  sync         {node}                   the node catches up with the cluster
  revive_stale {node}                   the node comes back believing it is still
                                        Primary at its old epoch
  conflict     {node}                   the node claims Primary at the current epoch
  hang         {node, on=true}          accept connections, never answer
  slow         {node, seconds}          answer after a delay (0: normal)
  fail         {node, mode}             500 | malformed | wrong_type | huge |
                                        reset | none
  lag          {node, on}               replication lag: keep the previous view
  set_version  {node, version, event=false}
  offer_update {version, data | data_b64, sha256?, size?, served_b64?, event=false}
  withdraw_update {}
  drop_package {version}                the package URL answers 404
  set_broker   {node, host, port, vhost?, tls?}
  set_token    {token}
  publish      {node, routing_key, body | json}
  reset_counters {}

Convergence acknowledgements (with --acks; tests/provider_acks.py): a
consumer on every distinct broker of the nodes records the Agents'
fleet.agent.synced messages per epoch.
  acks         {epoch?}                 {epoch, count, first_at, last_at, agents,
                                        malformed, duplicates, consumers}; without
                                        epoch, the count of every epoch
  register_agent {agent_id, notify_url, token}  where the Provider notifies it
  agents       {}                       the registered Agents (no tokens)
  notify_unacked {epoch}                POST /v1/notify to each registered Agent
                                        with no ack for epoch (or a later one):
                                        {notified: [ids], results: {id: status}}

Run with --help for the command line. At start the program prints one JSON
line on stdout: {"nodes": {"p1": "http://127.0.0.1:PORT", ...},
"load_balancer": "http://...", "control": "http://...", "pid": N}.
SIGTERM or SIGINT stops it cleanly.
"""

import argparse
import base64
import collections
import hashlib
import http.server
import json
import os
import random
import signal
import socket
import socketserver
import struct
import sys
import threading
import time
import urllib.parse

import provider_acks

EXCHANGE = "dsm.provider.events"
FAIL_MODES = ("none", "500", "malformed", "wrong_type", "huge", "reset", "304")
HUGE_SIZE = 10 * 1024 * 1024
REQUEST_LOG_MAX = 500
HANG_MAX_SECONDS = 3600.0


def log(msg):
    sys.stderr.write("provider-sim: %s\n" % msg)
    sys.stderr.flush()


class Node:
    """One simulated Provider node: its listener and its own view."""

    def __init__(self, node_id, host, port, version, broker):
        self.id = node_id
        self.host = host
        self.port = port  # fixed after the first bind
        self.version = version
        self.broker = dict(broker)  # host, port, vhost, tls
        # The node's own view of the cluster (what it reports).
        self.role = "standby"
        self.epoch = 1
        self.primary_id = None
        self.last_primary_epoch = None  # last epoch at which it was primary
        # Behaviour.
        self.fail_mode = "none"
        self.forge = None  # a hostile node: fields merged over its answers
        self.hang = False
        self.slow = 0.0
        self.lag = False
        # Runtime.
        self.server = None
        self.thread = None
        self.generation = 0  # bumped at every kill: releases hung handlers
        self.conns = set()
        self.counters = collections.Counter()
        self.request_log = collections.deque(maxlen=REQUEST_LOG_MAX)

    @property
    def api_url(self):
        host = self.host
        if ":" in host:
            host = "[%s]" % host
        return "http://%s:%d" % (host, self.port)

    @property
    def listening(self):
        return self.server is not None


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, addr, handler, sim, node=None, lb=False):
        self.sim = sim
        self.node = node
        self.is_lb = lb
        if ":" in addr[0]:
            self.address_family = socket.AF_INET6
        super().__init__(addr, handler)


class _ResetConnection(Exception):
    pass


class _BaseHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "dsm-provider-sim/1.0"
    disable_nagle_algorithm = True  # TCP_NODELAY on every accepted socket
    timeout = 60  # idle keep-alive connections are closed after this

    def log_message(self, fmt, *args):
        if self.server.sim.verbose:
            log("%s %s" % (self.address_string(), fmt % args))

    def handle(self):
        try:
            super().handle()
        except (_ResetConnection, ConnectionError, socket.timeout, OSError):
            self.close_connection = True

    def send_all(self, status, body=b"", headers=None, content_type="application/json"):
        """Builds the whole response and writes it with one send."""
        lines = ["HTTP/1.1 %d %s" % (status, self.responses.get(status, ("",))[0]),
                 "Server: " + self.server_version,
                 "Date: " + self.date_time_string()]
        if content_type and status != 304:
            lines.append("Content-Type: " + content_type)
        if status != 304:
            lines.append("Content-Length: %d" % len(body))
        for k, v in (headers or {}).items():
            lines.append("%s: %s" % (k, v))
        if self.close_connection:
            lines.append("Connection: close")
        data = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        if status != 304 and self.command != "HEAD":
            data += body
        self.wfile.write(data)
        self.log_request(status, len(body))

    def read_body(self, limit=16 * 1024 * 1024):
        n = int(self.headers.get("Content-Length") or 0)
        if n < 0 or n > limit:
            raise ValueError("body too large")
        return self.rfile.read(n) if n else b""


class _NodeHandler(_BaseHandler):
    def setup(self):
        super().setup()
        node = self.server.node
        if node is not None:
            with self.server.sim.lock:
                node.conns.add(self.connection)

    def finish(self):
        try:
            super().finish()
        finally:
            node = self.server.node
            if node is not None:
                with self.server.sim.lock:
                    node.conns.discard(self.connection)

    def do_GET(self):
        sim = self.server.sim
        if self.server.is_lb:
            node = sim.pick_node_for_lb()
            if node is None:
                self.send_all(503, b'{"error": "no node up"}\n')
                return
            sim.serve(node, self, via_lb=True)
        else:
            sim.serve(self.server.node, self, via_lb=False)

    def do_HEAD(self):
        self.do_GET()

    def do_POST(self):
        self.send_all(405, b'{"error": "method not allowed"}\n', {"Allow": "GET"})

    do_PUT = do_DELETE = do_PATCH = do_POST


class _ControlHandler(_BaseHandler):
    def _reply(self, status, obj):
        self.send_all(status, (json.dumps(obj, sort_keys=True) + "\n").encode())

    def do_GET(self):
        sim = self.server.sim
        url = urllib.parse.urlsplit(self.path)
        q = urllib.parse.parse_qs(url.query)
        if url.path == "/state":
            self._reply(200, {"ok": True, "result": sim.state()})
        elif url.path == "/requests":
            node = (q.get("node") or [""])[0]
            limit = int((q.get("limit") or ["100"])[0])
            try:
                self._reply(200, {"ok": True, "result": sim.requests(node, limit)})
            except KeyError as e:
                self._reply(404, {"ok": False, "error": "unknown node %s" % e})
        else:
            self._reply(404, {"ok": False, "error": "unknown path"})

    def do_POST(self):
        sim = self.server.sim
        name = urllib.parse.urlsplit(self.path).path.strip("/")
        try:
            raw = self.read_body()
            args = json.loads(raw.decode() or "{}") if raw else {}
            if not isinstance(args, dict):
                raise ValueError("body must be a JSON object")
        except (ValueError, UnicodeDecodeError) as e:
            self._reply(400, {"ok": False, "error": "bad request: %s" % e})
            return
        try:
            result = sim.control(name, args)
        except KeyError as e:
            self._reply(404, {"ok": False, "error": "unknown: %s" % e})
            return
        except (ValueError, TypeError) as e:
            self._reply(400, {"ok": False, "error": str(e)})
            return
        self._reply(200, {"ok": True, "result": result})


def _merge(base, over):
    """base with over's fields merged in: nested objects merged, anything
    else replaced."""
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _etag(body):
    return '"%s"' % hashlib.sha256(body).hexdigest()[:32]


def _etag_matches(header, etag):
    if not header:
        return False
    for tag in header.split(","):
        tag = tag.strip()
        if tag.startswith("W/"):
            tag = tag[2:]
        if tag == etag or tag == "*":
            return True
    return False


class ProviderSim:
    """The simulated cluster. Every public method is thread-safe."""

    def __init__(self, n_nodes=3, host="127.0.0.1", base_port=0, lb_port=0,
                 control_port=0, token="", brokers=None, vhost="/", tls=False,
                 version="9.0.1", epoch=1, primary="p1", lb_policy="round_robin",
                 broker_user="guest", broker_password="guest", verbose=False,
                 publish_timeout=3.0, acks=False):
        if not 1 <= n_nodes <= 9:
            raise ValueError("nodes must be 1..9")
        self.lock = threading.RLock()
        self.host = host
        self.token = token
        self.verbose = verbose
        self.lb_policy = lb_policy
        self.lb_next = 0
        self.broker_user = broker_user
        self.broker_password = broker_password
        self.publish_timeout = publish_timeout
        self.stopping = threading.Event()
        self.nodes = collections.OrderedDict()
        brokers = brokers or {}
        for i in range(n_nodes):
            nid = "p%d" % (i + 1)
            bh, bp = brokers.get(nid, ("127.0.0.1", 5672))
            port = base_port + i if base_port else 0
            self.nodes[nid] = Node(nid, host, port, version,
                                   {"host": bh, "port": int(bp), "vhost": vhost, "tls": bool(tls)})
        if primary not in self.nodes:
            raise ValueError("unknown primary %s" % primary)
        self.epoch = int(epoch)
        self.primary_id = primary
        for n in self.nodes.values():
            self._adopt(n)
        self.update = None  # dict(version, sha256, size)
        self.packages = {}  # version -> bytes served
        self.lb_port = lb_port
        self.control_port = control_port
        self.lb_server = None
        self.control_server = None
        self.lb_counters = collections.Counter()
        self.events = collections.deque(maxlen=REQUEST_LOG_MAX)  # publish results
        self._huge_cache = None
        self._threads = []
        self.ledger = provider_acks.AckLedger(self._ack_brokers, broker_user, broker_password,
                                              EXCHANGE) if acks else None

    # ----- lifecycle -------------------------------------------------------

    def _serve_thread(self, server, name):
        t = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                             name=name, daemon=True)
        t.start()
        return t

    def start_all(self):
        for n in self.nodes.values():
            self._listen(n)
        self.lb_server = _Server((self.host, self.lb_port), _NodeHandler, self, lb=True)
        self.lb_port = self.lb_server.server_address[1]
        self._threads.append(self._serve_thread(self.lb_server, "lb"))
        self.control_server = _Server((self.host, self.control_port), _ControlHandler, self)
        self.control_port = self.control_server.server_address[1]
        self._threads.append(self._serve_thread(self.control_server, "control"))
        if self.ledger is not None:
            self.ledger.start()
        return self.endpoints()

    def _url(self, port):
        host = "[%s]" % self.host if ":" in self.host else self.host
        return "http://%s:%d" % (host, port)

    def endpoints(self):
        return {"nodes": {n.id: n.api_url for n in self.nodes.values()},
                "load_balancer": self._url(self.lb_port),
                "control": self._url(self.control_port),
                "pid": os.getpid()}

    def _listen(self, node):
        if node.server is not None:
            return
        srv = _Server((node.host, node.port), _NodeHandler, self, node=node)
        node.port = srv.server_address[1]
        node.server = srv
        node.thread = self._serve_thread(srv, "node-" + node.id)

    def _unlisten(self, node):
        srv = node.server
        if srv is None:
            return
        node.server = None
        with self.lock:
            node.generation += 1
            conns = list(node.conns)
        srv.shutdown()
        srv.server_close()
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def stop(self):
        self.stopping.set()
        if self.ledger is not None:
            self.ledger.stop()
        for n in self.nodes.values():
            self._unlisten(n)
        for srv in (self.lb_server, self.control_server):
            if srv is not None:
                srv.shutdown()
                srv.server_close()
        self.lb_server = self.control_server = None

    # ----- the cluster model ---------------------------------------------

    def _node(self, node_id):
        try:
            return self.nodes[node_id]
        except KeyError:
            raise KeyError(node_id) from None

    def _adopt(self, n):
        """n takes the cluster's current view."""
        n.epoch = self.epoch
        n.primary_id = self.primary_id
        n.role = "primary" if n.id == self.primary_id else "standby"
        if n.role == "primary":
            n.last_primary_epoch = self.epoch

    def document(self, n):
        """The state document node n serves, as a dict."""
        p = self.nodes.get(n.primary_id) or n
        doc = {
            "node": {"id": n.id, "role": n.role, "version": n.version, "api_url": n.api_url},
            "epoch": n.epoch,
            "primary": {"id": p.id, "api_url": p.api_url,
                        "broker": dict(p.broker)},
            "nodes": [{"id": x.id, "api_url": x.api_url} for x in self.nodes.values()],
            "agent_update": None,
        }
        if self.update is not None:
            u = self.update
            doc["agent_update"] = {
                "version": u["version"],
                "url": "%s/api/v1/agent/packages/%s" % (p.api_url, urllib.parse.quote(u["version"])),
                "sha256": u["sha256"], "size": u["size"]}
        return doc

    def _huge_body(self, doc):
        if self._huge_cache is None:
            self._huge_cache = b"x" * HUGE_SIZE
        head = json.dumps(doc)[:-1].encode() + b', "padding": "'
        return head + self._huge_cache + b'"}'

    # ----- serving ---------------------------------------------------------

    def pick_node_for_lb(self):
        with self.lock:
            up = [n for n in self.nodes.values() if n.listening]
            self.lb_counters["requests"] += 1
            if not up:
                self.lb_counters["no_node"] += 1
                return None
            if self.lb_policy == "random":
                return random.choice(up)
            n = up[self.lb_next % len(up)]
            self.lb_next += 1
            return n

    def _wait_hang(self, n, gen):
        deadline = time.monotonic() + HANG_MAX_SECONDS
        while time.monotonic() < deadline:
            with self.lock:
                if not n.hang or n.generation != gen:
                    return
            if self.stopping.wait(0.05):
                return

    def serve(self, n, h, via_lb):
        """Answers request h as node n (also when it came through the LB)."""
        t0 = time.time()
        with self.lock:
            gen = n.generation
            hang, slow = n.hang, n.slow
            n.counters["requests"] += 1
            if via_lb:
                n.counters["via_lb"] += 1
        entry = {"t": t0, "method": h.command, "path": h.path, "via_lb": via_lb,
                 "if_none_match": h.headers.get("If-None-Match"),
                 "user_agent": h.headers.get("User-Agent"), "status": None,
                 "peer": h.client_address[0]}
        with self.lock:
            n.request_log.append(entry)
        if hang:
            with self.lock:
                n.counters["hung"] += 1
            self._wait_hang(n, gen)
            with self.lock:
                if n.generation != gen or self.stopping.is_set():
                    h.close_connection = True
                    entry["status"] = "dropped"
                    return
        if slow > 0:
            if self.stopping.wait(slow):
                return
        path = urllib.parse.urlsplit(h.path).path
        auth = h.headers.get("Authorization", "")
        with self.lock:
            token_ok = bool(self.token) and auth == "Bearer " + self.token
        if path == "/api/v1/ha/state":
            if not token_ok:
                self._count(n, entry, 401)
                h.send_all(401, b'{"error": "unauthorized"}\n',
                           {"WWW-Authenticate": 'Bearer realm="dsm"'})
                return
            self._serve_state(n, h, entry)
        elif path.startswith("/api/v1/agent/packages/"):
            if not token_ok:
                self._count(n, entry, 401)
                h.send_all(401, b'{"error": "unauthorized"}\n',
                           {"WWW-Authenticate": 'Bearer realm="dsm"'})
                return
            version = urllib.parse.unquote(path[len("/api/v1/agent/packages/"):])
            with self.lock:
                data = self.packages.get(version)
                n.counters["package_requests"] += 1
            if data is None:
                self._count(n, entry, 404)
                h.send_all(404, b'{"error": "no such package"}\n')
                return
            self._count(n, entry, 200)
            h.send_all(200, data, content_type="application/octet-stream")
        else:
            self._count(n, entry, 404)
            h.send_all(404, b'{"error": "not found"}\n')

    def _count(self, n, entry, status):
        with self.lock:
            entry["status"] = status
            n.counters["status_%s" % status] += 1

    def _serve_state(self, n, h, entry):
        with self.lock:
            mode = n.fail_mode
            doc = self.document(n)
            if n.forge:
                doc = _merge(doc, n.forge)
        if mode == "500":
            self._count(n, entry, 500)
            h.send_all(500, b'{"error": "internal error"}\n')
            return
        if mode == "304":
            # A broken node or proxy: "unchanged" whatever was asked.
            self._count(n, entry, 304)
            h.send_all(304, b"", {"ETag": '"stale"'})
            return
        if mode == "malformed":
            self._count(n, entry, 200)
            h.send_all(200, b'{"node": {"id": "%s", "role": ' % n.id.encode())
            return
        if mode == "wrong_type":
            doc["epoch"] = str(doc["epoch"])
        if mode == "huge":
            body = self._huge_body(doc)
        else:
            body = (json.dumps(doc, separators=(",", ":")) + "\n").encode()
        etag = _etag(body)
        if mode == "reset":
            self._count(n, entry, "reset")
            head = ("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    "Content-Length: %d\r\nETag: %s\r\n\r\n" % (len(body), etag)).encode()
            try:
                h.wfile.write(head + body[: len(body) // 2])
                h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                        struct.pack("ii", 1, 0))
            finally:
                h.close_connection = True
                try:
                    h.connection.close()
                except OSError:
                    pass
            raise _ResetConnection()
        if mode == "none" and _etag_matches(h.headers.get("If-None-Match"), etag):
            self._count(n, entry, 304)
            h.send_all(304, b"", {"ETag": etag})
            return
        self._count(n, entry, 200)
        h.send_all(200, body, {"ETag": etag, "Cache-Control": "no-cache"})

    # ----- events ----------------------------------------------------------

    def _publish_to(self, broker, routing_key, body):
        """Publishes one message; returns "ok" or an error string."""
        try:
            import pika  # noqa: imported lazily: optional for standalone use
        except ImportError:
            return "error: python3-pika is not installed"
        params = dict(host=broker["host"], port=int(broker["port"]),
                      virtual_host=broker.get("vhost") or "/",
                      credentials=pika.PlainCredentials(self.broker_user, self.broker_password),
                      connection_attempts=1, socket_timeout=self.publish_timeout,
                      blocked_connection_timeout=self.publish_timeout,
                      stack_timeout=self.publish_timeout + 1)
        if broker.get("tls"):
            import ssl
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            params["ssl_options"] = pika.SSLOptions(ctx, broker["host"])
        conn = None
        try:
            conn = pika.BlockingConnection(pika.ConnectionParameters(**params))
            ch = conn.channel()
            ch.exchange_declare(exchange=EXCHANGE, exchange_type="topic", durable=True)
            ch.basic_publish(exchange=EXCHANGE, routing_key=routing_key, body=body,
                             properties=pika.BasicProperties(content_type="application/json",
                                                             delivery_mode=1))
            return "ok"
        except Exception as e:  # report, never raise: brokers may be down
            return "error: %s: %r" % (type(e).__name__, e)
        finally:
            if conn is not None:
                try:
                    conn.close()
                except Exception:
                    pass

    def _publish_many(self, node_ids, routing_key, body):
        """Publishes on each distinct broker of node_ids. {node_id: result}."""
        with self.lock:
            targets = []
            seen = set()
            for nid in node_ids:
                b = dict(self._node(nid).broker)
                key = (b["host"], b["port"], b["vhost"])
                if key in seen:
                    continue
                seen.add(key)
                targets.append((nid, b))
        results = {}
        for nid, b in targets:
            r = self._publish_to(b, routing_key, body)
            results[nid] = r
            rec = {"t": time.time(), "node": nid, "routing_key": routing_key,
                   "broker": "%s:%s" % (b["host"], b["port"]), "result": r}
            with self.lock:
                self.events.append(rec)
            if r != "ok":
                log("publish %s on %s's broker %s:%s failed: %s"
                    % (routing_key, nid, b["host"], b["port"], r))
        return results

    def publish(self, node_id, routing_key, body):
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
        elif isinstance(body, str):
            body = body.encode()
        return self._publish_many([node_id], routing_key, body)[node_id]

    # ----- operations --------------------------------------------------------

    def promote(self, node_id, event=True):
        with self.lock:
            new = self._node(node_id)
            old_id = self.primary_id
            self.epoch += 1
            self.primary_id = node_id
            for n in self.nodes.values():
                if n is new:
                    self._adopt(n)
                elif n.listening and not n.lag:
                    self._adopt(n)  # the old primary, if up, becomes standby
            body = json.dumps({"epoch": self.epoch, "primary_id": node_id,
                               "api_url": new.api_url}).encode()
            epoch = self.epoch
        result = {"epoch": epoch, "primary_id": node_id, "old_primary_id": old_id}
        if event:
            result["published"] = self._publish_many([old_id, node_id],
                                                     "provider.primary.changed", body)
        log("promoted %s at epoch %d (old primary %s)" % (node_id, epoch, old_id))
        return result

    def kill(self, node_id):
        n = self._node(node_id)
        self._unlisten(n)
        return {"node": node_id, "listening": False}

    def start(self, node_id):
        n = self._node(node_id)
        with self.lock:
            self._listen(n)
        return {"node": node_id, "listening": True, "api_url": n.api_url}

    def sync(self, node_id):
        with self.lock:
            n = self._node(node_id)
            n.lag = False
            self._adopt(n)
        return self.node_state(node_id)

    def revive_stale(self, node_id):
        with self.lock:
            n = self._node(node_id)
            n.role = "primary"
            n.primary_id = n.id
            if n.last_primary_epoch is not None and n.last_primary_epoch < self.epoch:
                n.epoch = n.last_primary_epoch
            else:
                n.epoch = max(1, self.epoch - 1)
            self._listen(n)
        return self.node_state(node_id)

    def conflict(self, node_id):
        with self.lock:
            n = self._node(node_id)
            n.role = "primary"
            n.primary_id = n.id
            n.epoch = self.epoch
        return self.node_state(node_id)

    def hang(self, node_id, on=True):
        with self.lock:
            self._node(node_id).hang = bool(on)
        return self.node_state(node_id)

    def slow(self, node_id, seconds):
        with self.lock:
            self._node(node_id).slow = max(0.0, float(seconds))
        return self.node_state(node_id)

    def fail(self, node_id, mode):
        mode = str(mode)
        if mode not in FAIL_MODES:
            raise ValueError("mode must be one of %s" % ", ".join(FAIL_MODES))
        with self.lock:
            self._node(node_id).fail_mode = mode
        return self.node_state(node_id)

    def forge(self, node_id, doc=None):
        """A hostile or broken node: doc's fields are merged over every
        answer it gives (nested objects merged, anything else replaced);
        None stops it."""
        with self.lock:
            self._node(node_id).forge = dict(doc) if doc else None
        return self.node_state(node_id)

    def lag(self, node_id, on=True):
        with self.lock:
            n = self._node(node_id)
            n.lag = bool(on)
            if not on:
                self._adopt(n)
        return self.node_state(node_id)

    def set_version(self, node_id, version, event=False):
        with self.lock:
            self._node(node_id).version = str(version)
            primary = self.primary_id
        res = self.node_state(node_id)
        if event:
            res["published"] = self.publish(primary, "provider.version.changed",
                                            {"node_id": node_id, "version": str(version)})
        return res

    def offer_update(self, version, data, sha256=None, size=None, served=None, event=False):
        if isinstance(data, str):
            data = data.encode()
        with self.lock:
            self.update = {"version": str(version),
                           "sha256": sha256 or hashlib.sha256(data).hexdigest(),
                           "size": int(size) if size is not None else len(data)}
            self.packages[str(version)] = data if served is None else served
            primary = self.primary_id
            res = dict(self.update)
            res["url"] = self.document(self.nodes[primary])["agent_update"]["url"]
        if event:
            res["published"] = self.publish(primary, "agent.update.available",
                                            {"version": str(version)})
        return res

    def withdraw_update(self):
        with self.lock:
            self.update = None
        return None

    def drop_package(self, version):
        with self.lock:
            self.packages.pop(str(version), None)
        return None

    def set_broker(self, node_id, host, port, vhost=None, tls=None):
        with self.lock:
            n = self._node(node_id)
            n.broker["host"] = str(host)
            n.broker["port"] = int(port)
            if vhost is not None:
                n.broker["vhost"] = str(vhost)
            if tls is not None:
                n.broker["tls"] = bool(tls)
        return self.node_state(node_id)

    def set_token(self, token):
        with self.lock:
            self.token = str(token)
        return None

    def reset_counters(self):
        with self.lock:
            for n in self.nodes.values():
                n.counters.clear()
                n.request_log.clear()
            self.lb_counters.clear()
        return None

    # ----- introspection -----------------------------------------------------

    def node_state(self, node_id):
        with self.lock:
            n = self._node(node_id)
            return {"id": n.id, "api_url": n.api_url, "port": n.port,
                    "listening": n.listening, "role": n.role, "epoch": n.epoch,
                    "primary_id": n.primary_id, "version": n.version,
                    "broker": dict(n.broker), "fail_mode": n.fail_mode, "hang": n.hang,
                    "slow": n.slow, "lag": n.lag, "counters": dict(n.counters)}

    def state(self):
        with self.lock:
            return {"epoch": self.epoch, "primary_id": self.primary_id,
                    "nodes": {nid: self.node_state(nid) for nid in self.nodes},
                    "update": dict(self.update) if self.update else None,
                    "packages": sorted(self.packages),
                    "load_balancer": {"url": self._url(self.lb_port), "policy": self.lb_policy,
                                      "counters": dict(self.lb_counters)},
                    "events": list(self.events)}

    def requests(self, node_id, limit=100):
        with self.lock:
            log_ = list(self._node(node_id).request_log)
        return log_[-int(limit):] if limit else log_

    # ----- convergence acknowledgements (tests/provider_acks.py) -------------

    def _ack_brokers(self):
        with self.lock:
            return [dict(n.broker) for n in self.nodes.values()]

    def _acks_on(self):
        if self.ledger is None:
            raise ValueError("acks are off: start the simulator with --acks")
        return self.ledger

    def acks(self, epoch=None):
        return self._acks_on().acks(epoch)

    def register_agent(self, agent_id, notify_url, token):
        return self._acks_on().register_agent(agent_id, notify_url, token)

    def agents(self):
        return self._acks_on().agents()

    def notify_unacked(self, epoch):
        return self._acks_on().notify_unacked(epoch)

    OPERATIONS = {
        "promote": ("node", "event"), "kill": ("node",), "start": ("node",),
        "sync": ("node",), "revive_stale": ("node",), "conflict": ("node",),
        "hang": ("node", "on"), "slow": ("node", "seconds"), "fail": ("node", "mode"),
        "lag": ("node", "on"), "forge": ("node", "doc"), "set_version": ("node", "version", "event"),
        "offer_update": ("version", "data", "sha256", "size", "served", "event"),
        "withdraw_update": (), "drop_package": ("version",),
        "set_broker": ("node", "host", "port", "vhost", "tls"), "set_token": ("token",),
        "publish": ("node", "routing_key", "body"), "reset_counters": (),
        "state": (), "acks": ("epoch",), "register_agent": ("agent_id", "notify_url", "token"),
        "agents": (), "notify_unacked": ("epoch",),
    }

    def control(self, name, args):
        """Runs operation name with JSON args (the control API)."""
        if name not in self.OPERATIONS:
            raise KeyError(name)
        args = dict(args)
        for k in ("data_b64", "served_b64", "body_b64"):
            if k in args:
                args[k[:-4]] = base64.b64decode(args.pop(k))
        if "json" in args:
            args["body"] = json.dumps(args.pop("json")).encode()
        allowed = self.OPERATIONS[name]
        unknown = set(args) - set(allowed)
        if unknown:
            raise ValueError("unknown argument(s) for %s: %s" % (name, ", ".join(sorted(unknown))))
        kw = {}
        for k, v in args.items():
            kw["node_id" if k == "node" else k] = v
        if name == "offer_update" and "data" not in kw:
            raise ValueError("offer_update needs data or data_b64")
        return getattr(self, name)(**kw)


def _parse_broker(s):
    try:
        nid, addr = s.split("=", 1)
        host, port = addr.rsplit(":", 1)
        host = host.strip("[]")
        return nid, (host, int(port))
    except ValueError:
        raise argparse.ArgumentTypeError("expected NODE=HOST:PORT, got %r" % s)


def main(argv=None):
    ap = argparse.ArgumentParser(
        prog="provider_sim.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Example (rehearse a failover):\n"
        "  ./provider_sim.py --token-file provider.token --broker p1=127.0.0.1:5672 \\\n"
        "      --broker p2=127.0.0.1:5673 --broker p3=127.0.0.1:5674 --base-port 8441\n"
        "  curl -s -X POST -d '{\"node\": \"p1\"}' http://127.0.0.1:CONTROL/kill\n"
        "  curl -s -X POST -d '{\"node\": \"p2\"}' http://127.0.0.1:CONTROL/promote\n"
        "  curl -s http://127.0.0.1:CONTROL/state")
    ap.add_argument("--nodes", type=int, default=3, help="number of Provider nodes, p1..pN (default 3)")
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on and advertise (default 127.0.0.1)")
    ap.add_argument("--base-port", type=int, default=0,
                    help="p1 listens on this port, p2 on the next, ... (default: ephemeral ports)")
    ap.add_argument("--lb-port", type=int, default=0, help="load balancer port (default ephemeral)")
    ap.add_argument("--control-port", type=int, default=0, help="control API port (default ephemeral)")
    ap.add_argument("--lb-policy", choices=("round_robin", "random"), default="round_robin",
                    help="how the load balancer picks an up node (default round_robin)")
    ap.add_argument("--token-file", help="file holding the Provider bearer token (first line)")
    ap.add_argument("--token", help="the Provider bearer token (prefer --token-file)")
    ap.add_argument("--broker", action="append", type=_parse_broker, default=[], metavar="NODE=HOST:PORT",
                    help="a node's RabbitMQ broker, repeatable (default 127.0.0.1:5672 for every node)")
    ap.add_argument("--vhost", default="/", help="broker vhost reported for every node (default /)")
    ap.add_argument("--tls", action="store_true", help="report tls = true for every broker")
    ap.add_argument("--broker-user", default="guest", help="user for publishing events (default guest)")
    ap.add_argument("--broker-password-file", help="password file for publishing (default: guest)")
    ap.add_argument("--provider-version", default="9.0.1", help="every node's version at start (default 9.0.1)")
    ap.add_argument("--epoch", type=int, default=1, help="epoch at start (default 1)")
    ap.add_argument("--primary", default="p1", help="Primary at start (default p1)")
    ap.add_argument("--acks", action="store_true",
                    help="consume the Agents' fleet.agent.synced acks on every node's broker")
    ap.add_argument("-v", "--verbose", action="store_true", help="log every request on stderr")
    args = ap.parse_args(argv)

    if args.token_file:
        with open(args.token_file) as f:
            token = f.readline().strip()
    elif args.token:
        token = args.token
    else:
        ap.error("one of --token-file or --token is required")
    if not token:
        ap.error("the token is empty")
    password = "guest"
    if args.broker_password_file:
        with open(args.broker_password_file) as f:
            password = f.readline().rstrip("\n")

    sim = ProviderSim(n_nodes=args.nodes, host=args.host, base_port=args.base_port,
                      lb_port=args.lb_port, control_port=args.control_port, token=token,
                      brokers=dict(args.broker), vhost=args.vhost, tls=args.tls,
                      version=args.provider_version, epoch=args.epoch, primary=args.primary,
                      lb_policy=args.lb_policy, broker_user=args.broker_user,
                      broker_password=password, verbose=args.verbose, acks=args.acks)
    stop = threading.Event()

    def on_signal(signum, frame):
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        eps = sim.start_all()
    except OSError as e:
        log("cannot listen: %s" % e)
        sim.stop()
        return 1
    sys.stdout.write(json.dumps(eps) + "\n")
    sys.stdout.flush()
    log("running: %s" % json.dumps(eps))
    while not stop.wait(1.0):
        pass
    log("stopping")
    sim.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
