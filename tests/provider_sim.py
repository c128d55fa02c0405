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

The nodes and the load balancer are served by one event loop in one thread
(tests/provider_http.py): thousands of keep-alive connections, TCP_NODELAY,
a listen backlog of 4096, and each node's state answer rendered once per
change of what it reports. The control API has a thread per connection, so
a slow operation (publishing an event) never holds up the nodes.

Control API (JSON over HTTP on --control-port, loopback only):

  GET  /state                           the whole simulated cluster
  GET  /requests?node=p1&limit=50       the last requests a node served
  GET  /stats                           the load the nodes and the LB served
  POST /<operation>  {json arguments}   -> {"ok": true, "result": ...}

GET /stats counts the requests on the node listeners and the load balancer
since start or the last reset_counters:
  {"since": unix time of the last reset,
   "requests": {"total": N, "by_node": {"p1": n, ..., "lb": n}},
   "latency_ms": {"count": n, "p50": x, "p90": x, "p99": x, "max": x},
   "per_second": [[unix_second, requests], ...]}
by_node is by listener (a request through the LB counts under "lb").
latency_ms is the simulator's own service time, from the request head fully
read to the whole answer written to the socket, to 1 %; hung and slow
requests are counted but not timed (null figures when nothing was timed).
per_second lists the seconds that had requests, the last hour at most.

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
  reset_counters {}                     also resets GET /stats

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
import asyncio
import base64
import collections
import hashlib
import http.server
import json
import os
import random
import resource
import signal
import socket
import sys
import threading
import time
import urllib.parse

import provider_acks
import provider_http

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
        self.server = None  # its provider_http.Listener while listening
        self.generation = 0  # bumped at every kill: releases hung handlers
        self.hung = set()  # futures of hung requests, woken on a change
        self.rendered = None  # (document generation, mode, body, etag)
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
    """The control API: a thread per connection (operations may block on
    publishing; the node listeners are on the event loop, unaffected)."""
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, addr, handler, sim):
        self.sim = sim
        if ":" in addr[0]:
            self.address_family = socket.AF_INET6
        super().__init__(addr, handler)


class _ControlHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = provider_http.SERVER
    disable_nagle_algorithm = True  # TCP_NODELAY on every accepted socket
    timeout = 60  # idle keep-alive connections are closed after this

    def log_message(self, fmt, *args):
        if self.server.sim.verbose:
            log("%s %s" % (self.address_string(), fmt % args))

    def handle(self):
        try:
            super().handle()
        except (ConnectionError, socket.timeout, OSError):
            self.close_connection = True

    def send_all(self, status, body=b"", headers=None, content_type="application/json"):
        """Builds the whole response and writes it with one send."""
        self.wfile.write(provider_http.response_bytes(
            status, body, headers, content_type, self.close_connection, self.command == "HEAD",
            self.date_time_string()))
        self.log_request(status, len(body))

    def read_body(self, limit=16 * 1024 * 1024):
        n = int(self.headers.get("Content-Length") or 0)
        if n < 0 or n > limit:
            raise ValueError("body too large")
        return self.rfile.read(n) if n else b""

    def _reply(self, status, obj):
        self.send_all(status, (json.dumps(obj, sort_keys=True) + "\n").encode())

    def do_GET(self):
        sim = self.server.sim
        url = urllib.parse.urlsplit(self.path)
        q = urllib.parse.parse_qs(url.query)
        if url.path == "/state":
            self._reply(200, {"ok": True, "result": sim.state()})
        elif url.path == "/stats":
            self._reply(200, {"ok": True, "result": sim.stats()})
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
        # What the nodes report changes only with this generation: their
        # state answers are rendered once per generation (see _changed).
        self.doc_gen = 0
        self.http = provider_http.HttpLoop(log, verbose)
        self.listen_lock = threading.Lock()  # serializes kill/start
        self.ledger = provider_acks.AckLedger(self._ack_brokers, broker_user, broker_password,
                                              EXCHANGE) if acks else None

    # ----- lifecycle -------------------------------------------------------

    def start_all(self):
        self.http.start()
        for n in self.nodes.values():
            self._listen(n)
        self.lb_server = self.http.listen(self.host, self.lb_port, "lb", self._serve_lb)
        self.lb_port = self.lb_server.port
        self.control_server = _Server((self.host, self.control_port), _ControlHandler, self)
        self.control_port = self.control_server.server_address[1]
        threading.Thread(target=self.control_server.serve_forever, kwargs={"poll_interval": 0.05},
                         name="control", daemon=True).start()
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
        """Serves node on its port (the same one after a kill). Never called
        with self.lock held: the loop thread may be waiting for it."""
        with self.listen_lock:
            if node.server is not None:
                return
            lst = self.http.listen(node.host, node.port, node.id,
                                   lambda req: self._serve_node(node, req))
            with self.lock:
                node.port = lst.port
                node.server = lst

    def _unlisten(self, node):
        """Closes node's listener (connections refused), drops its open
        connections and releases the requests hung on it."""
        with self.listen_lock:
            lst = node.server
            if lst is None:
                return
            with self.lock:
                node.server = None
                node.generation += 1
            self.http.call(self._close_listener, lst, node)

    def _close_listener(self, lst, node):
        lst.close()
        self._wake_hung(node)

    def stop(self):
        self.stopping.set()
        if self.ledger is not None:
            self.ledger.stop()
        for n in self.nodes.values():
            self._unlisten(n)
        self.http.stop()
        if self.control_server is not None:
            self.control_server.shutdown()
            self.control_server.server_close()
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

    @staticmethod
    def _method_ok(req):
        """GET and HEAD are served; anything else is answered here."""
        if req.method in ("GET", "HEAD"):
            return True
        if req.method in ("POST", "PUT", "DELETE", "PATCH"):
            req.send(405, b'{"error": "method not allowed"}\n', {"Allow": "GET"})
        else:
            req.send_error(501, "Unsupported method (%r)" % req.method)
        return False

    def _serve_node(self, node, req):
        """A request on a node's own listener."""
        return self.serve(node, req, via_lb=False) if self._method_ok(req) else None

    def _serve_lb(self, req):
        """A request on the load balancer: answered as one up node."""
        if not self._method_ok(req):
            return None
        node = self.pick_node_for_lb()
        if node is None:
            req.send(503, b'{"error": "no node up"}\n')
            return None
        return self.serve(node, req, via_lb=True)

    def serve(self, n, req, via_lb):
        """Answers req as node n (also when it came through the LB). On the
        event loop: answers at once, or returns a coroutine (hang, slow)."""
        with self.lock:
            gen = n.generation
            hang, slow = n.hang, n.slow
            n.counters["requests"] += 1
            if via_lb:
                n.counters["via_lb"] += 1
            if hang:
                n.counters["hung"] += 1
            entry = {"t": time.time(), "method": req.method, "path": req.path,
                     "via_lb": via_lb, "if_none_match": req.header("If-None-Match"),
                     "user_agent": req.header("User-Agent"), "status": None,
                     "peer": req.peer}
            n.request_log.append(entry)
        if hang or slow > 0:
            req.untimed()
            return self._serve_later(n, req, entry, gen, hang, slow)
        self._answer(n, req, entry)
        return None

    async def _serve_later(self, n, req, entry, gen, hang, slow):
        """A hung node answers once released (dropped at a kill); a slow
        node after its delay."""
        if hang:
            await self._wait_hang(n, gen)
            with self.lock:
                if n.generation != gen or self.stopping.is_set():
                    entry["status"] = "dropped"
                    req.drop()
                    return
        if slow > 0:
            await asyncio.sleep(slow)
        self._answer(n, req, entry)

    async def _wait_hang(self, n, gen):
        loop = asyncio.get_running_loop()
        deadline = loop.time() + HANG_MAX_SECONDS
        while True:
            with self.lock:
                if not n.hang or n.generation != gen or self.stopping.is_set():
                    return
            left = deadline - loop.time()
            if left <= 0:
                return
            woken = loop.create_future()
            n.hung.add(woken)
            try:
                await asyncio.wait_for(woken, left)
            except asyncio.TimeoutError:
                return

    def _wake_hung(self, n):
        """Loop thread: the hung requests of n look at its state again."""
        for f in n.hung:
            if not f.done():
                f.set_result(None)
        n.hung.clear()

    def _answer(self, n, req, entry):
        path = urllib.parse.urlsplit(req.path).path
        auth = req.header("Authorization", "")
        with self.lock:
            token_ok = bool(self.token) and auth == "Bearer " + self.token
        if path == "/api/v1/ha/state":
            if not token_ok:
                self._count(n, entry, 401)
                req.send(401, b'{"error": "unauthorized"}\n',
                         {"WWW-Authenticate": 'Bearer realm="dsm"'})
                return
            self._serve_state(n, req, entry)
        elif path.startswith("/api/v1/agent/packages/"):
            if not token_ok:
                self._count(n, entry, 401)
                req.send(401, b'{"error": "unauthorized"}\n',
                         {"WWW-Authenticate": 'Bearer realm="dsm"'})
                return
            self._serve_package(n, req, entry, path)
        else:
            self._count(n, entry, 404)
            req.send(404, b'{"error": "not found"}\n')

    def _serve_package(self, n, req, entry, path):
        version = urllib.parse.unquote(path[len("/api/v1/agent/packages/"):])
        with self.lock:
            data = self.packages.get(version)
            n.counters["package_requests"] += 1
        if data is None:
            self._count(n, entry, 404)
            req.send(404, b'{"error": "no such package"}\n')
            return
        self._count(n, entry, 200)
        req.send(200, data, content_type="application/octet-stream")

    def _count(self, n, entry, status):
        with self.lock:
            entry["status"] = status
            n.counters["status_%s" % status] += 1

    def _changed(self):
        """What a node reports may have changed (self.lock held): every
        state answer is rendered again."""
        self.doc_gen += 1

    def _rendered(self, n):
        """(fail mode, body, ETag) of n's state answer, rendered once per
        document generation (self.lock held)."""
        r = n.rendered
        if r is not None and r[0] == self.doc_gen:
            return r[1:]
        mode = n.fail_mode
        body = etag = None
        if mode in ("none", "wrong_type", "huge", "reset"):
            doc = self.document(n)
            if n.forge:
                doc = _merge(doc, n.forge)
            if mode == "wrong_type":
                doc["epoch"] = str(doc["epoch"])
            if mode == "huge":
                body = self._huge_body(doc)
            else:
                body = (json.dumps(doc, separators=(",", ":")) + "\n").encode()
            etag = _etag(body)
        n.rendered = (self.doc_gen, mode, body, etag)
        return mode, body, etag

    def _serve_state(self, n, req, entry):
        with self.lock:
            mode, body, etag = self._rendered(n)
        if mode == "500":
            self._count(n, entry, 500)
            req.send(500, b'{"error": "internal error"}\n')
        elif mode == "304":
            # A broken node or proxy: "unchanged" whatever was asked.
            self._count(n, entry, 304)
            req.send(304, b"", {"ETag": '"stale"'})
        elif mode == "malformed":
            self._count(n, entry, 200)
            req.send(200, b'{"node": {"id": "%s", "role": ' % n.id.encode())
        elif mode == "reset":
            self._count(n, entry, "reset")
            head = ("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    "Content-Length: %d\r\nETag: %s\r\n\r\n" % (len(body), etag)).encode()
            req.reset(head + body[: len(body) // 2])
        elif mode == "none" and _etag_matches(req.header("If-None-Match"), etag):
            self._count(n, entry, 304)
            req.send(304, b"", {"ETag": etag})
        else:
            self._count(n, entry, 200)
            req.send(200, body, {"ETag": etag, "Cache-Control": "no-cache"})

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
            self._changed()
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
        self._listen(n)
        return {"node": node_id, "listening": True, "api_url": n.api_url}

    def sync(self, node_id):
        with self.lock:
            n = self._node(node_id)
            n.lag = False
            self._adopt(n)
            self._changed()
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
            self._changed()
        self._listen(n)
        return self.node_state(node_id)

    def conflict(self, node_id):
        with self.lock:
            n = self._node(node_id)
            n.role = "primary"
            n.primary_id = n.id
            n.epoch = self.epoch
            self._changed()
        return self.node_state(node_id)

    def hang(self, node_id, on=True):
        with self.lock:
            n = self._node(node_id)
            n.hang = bool(on)
        self.http.soon(self._wake_hung, n)
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
            self._changed()
        return self.node_state(node_id)

    def forge(self, node_id, doc=None):
        """A hostile or broken node: doc's fields are merged over every
        answer it gives (nested objects merged, anything else replaced);
        None stops it."""
        with self.lock:
            self._node(node_id).forge = dict(doc) if doc else None
            self._changed()
        return self.node_state(node_id)

    def lag(self, node_id, on=True):
        with self.lock:
            n = self._node(node_id)
            n.lag = bool(on)
            if not on:
                self._adopt(n)
            self._changed()
        return self.node_state(node_id)

    def set_version(self, node_id, version, event=False):
        with self.lock:
            self._node(node_id).version = str(version)
            self._changed()
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
            self._changed()
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
            self._changed()
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
            self._changed()
        return self.node_state(node_id)

    def set_token(self, token):
        with self.lock:
            self.token = str(token)
            self._changed()
        return None

    def reset_counters(self):
        with self.lock:
            for n in self.nodes.values():
                n.counters.clear()
                n.request_log.clear()
            self.lb_counters.clear()
        self.http.stats.reset()
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

    def stats(self):
        """GET /stats: the load the node listeners and the LB served."""
        return self.http.stats.snapshot()

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
        try:
            return getattr(self, name)(**kw)
        finally:
            with self.lock:
                self._changed()  # also for operations that do not say so


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
    # a connection is a file descriptor: a fleet of daemons needs thousands
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
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
