"""The Provider's side of the convergence acknowledgement (issue 15).

After a commit has been written and on_change succeeded, every daemon
publishes one message on the new Primary's broker: the topic exchange of
[broker] exchange (dsm.provider.events), routing key fleet.agent.synced,
content_type application/json, body

    {"agent_id": "agent-001", "epoch": 5, "primary_id": "p2",
     "settings_written_at": "2026-12-03T16:20:01.123Z", "daemon": "1.2.3"}

AckLedger, used by the Provider simulator (tests/provider_sim.py --acks):

- keeps one consumer per distinct broker of the simulated nodes (host, port,
  vhost, tls), each a thread with its own pika connection, on a server-named
  exclusive queue bound to the exchange with fleet.agent.synced only; a
  broker that is down is retried with backoff, a node whose broker moves
  (set_broker) gets a consumer on the new address and the old one is closed
  when no node names it any more. Nothing here raises into the simulator.
- records the acks per epoch, {epoch: {agent_id: {"received_at",
  "settings_written_at", "primary_id", "daemon", "broker"}}}; a body that is
  not a JSON object with every field well typed is counted as malformed, a
  second ack of one Agent for one epoch as a duplicate; neither is recorded.
- knows the Agents (register_agent: where to notify them, with which token)
  and notifies those that did not acknowledge an epoch (contract section 6:
  POST /v1/notify with the Agent's bearer token and
  {"reason": "primary promoted", "epoch": E}), from worker threads with
  bounded timeouts.

Acks published while no consumer is bound on a broker are not seen (the
queues are exclusive): the ledger binds every broker at start, and a moved
broker within SCAN_INTERVAL plus one connection.
"""

import collections
import http.client
import json
import random
import re
import ssl
import sys
import threading
import time
import urllib.parse

ROUTING_KEY = "fleet.agent.synced"
AGENT_ID_RE = re.compile(r"\A[A-Za-z0-9._:-]{1,64}\Z")
NODE_ID_RE = re.compile(r"\A[A-Za-z0-9._-]{1,64}\Z")
RFC3339_RE = re.compile(r"\A\d{4}-\d\d-\d\d[Tt]\d\d:\d\d:\d\d(\.\d{1,9})?([Zz]|[+-]\d\d:\d\d)\Z")
DAEMON_VERSION_MAX = 64
SCAN_INTERVAL = 0.05        # how often the set of brokers is compared with the nodes'
BACKOFF_BASE, BACKOFF_CAP = 0.1, 1.0
CONNECT_TIMEOUT = 2.0
NOTIFY_TIMEOUT = 2.0        # per request: connect, send, answer
NOTIFY_WORKERS = 32
NOTIFY_URL_MAX = 2048
MALFORMED_LOGGED = 20       # the first ones are logged, the rest only counted


def _log(msg):
    sys.stderr.write("provider-acks: %s\n" % msg)
    sys.stderr.flush()


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def parse_ack(body):
    """The ack in body (bytes) as a dict, or a string saying why it is
    malformed. Unknown fields are ignored (a later daemon may add some)."""
    try:
        doc = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return "not JSON"
    if not isinstance(doc, dict):
        return "not a JSON object"
    checks = (
        ("agent_id", lambda v: isinstance(v, str) and AGENT_ID_RE.match(v)),
        ("epoch", lambda v: _is_int(v) and v >= 1),
        ("primary_id", lambda v: isinstance(v, str) and NODE_ID_RE.match(v)),
        ("settings_written_at", lambda v: isinstance(v, str) and RFC3339_RE.match(v)),
        ("daemon", lambda v: isinstance(v, str) and 1 <= len(v) <= DAEMON_VERSION_MAX),
    )
    for name, ok in checks:
        if name not in doc:
            return "missing %s" % name
        if not ok(doc[name]):
            return "bad %s" % name
    return {name: doc[name] for name, _ in checks}


def broker_key(b):
    return (str(b["host"]), int(b["port"]), str(b.get("vhost") or "/"), bool(b.get("tls")))


def broker_label(key):
    host, port = key[0], key[1]
    return "%s:%d" % ("[%s]" % host if ":" in host else host, port)


class _Consumer(threading.Thread):
    """One broker: connect, declare, bind, consume; on any failure wait
    (full jitter, doubling up to BACKOFF_CAP) and start again until stopped."""

    def __init__(self, ledger, key):
        super().__init__(name="acks-" + broker_label(key), daemon=True)
        self.ledger = ledger
        self.key = key
        self.label = broker_label(key)
        self.halt = threading.Event()
        self.state = "connecting"  # connecting, bound, down
        self.since = time.time()
        self.error = None
        self.connections = 0

    def _on_message(self, channel, method, props, body):
        self.ledger.record(body, self.label, props.user_id)

    def _set(self, state, error=None):
        if state != self.state:
            if state == "down" and self.state != "down":
                _log("%s: consumer down: %s (retrying)" % (self.label, error))
            elif state == "bound" and self.connections > 1:
                _log("%s: consumer bound again" % self.label)
            self.state, self.since = state, time.time()
        self.error = error

    def run(self):
        failures = 0
        while not self.halt.is_set():
            try:
                self._consume()
                failures = 0
            except Exception as e:  # the broker, never the simulator
                failures += 1
                self._set("down", "%s: %s" % (type(e).__name__, e))
            if self.halt.is_set():
                break
            ceiling = min(BACKOFF_CAP, BACKOFF_BASE * 2 ** max(0, failures - 1))
            self.halt.wait(random.uniform(0.1 * ceiling, ceiling))

    def _params(self, pika):
        host, port, vhost, tls = self.key
        params = dict(host=host, port=port, virtual_host=vhost,
                      credentials=pika.PlainCredentials(self.ledger.user, self.ledger.password),
                      connection_attempts=1, socket_timeout=CONNECT_TIMEOUT,
                      blocked_connection_timeout=CONNECT_TIMEOUT,
                      stack_timeout=CONNECT_TIMEOUT + 1, heartbeat=5)
        if tls:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE  # a lab tool: the daemon verifies, not this
            params["ssl_options"] = pika.SSLOptions(ctx, host)
        return pika.ConnectionParameters(**params)

    def _consume(self):
        import pika  # lazily: the simulator runs without pika when acks are off
        self._set("connecting", self.error)
        conn = pika.BlockingConnection(self._params(pika))
        self.connections += 1
        try:
            ch = conn.channel()
            ch.exchange_declare(exchange=self.ledger.exchange, exchange_type="topic", durable=True)
            q = ch.queue_declare(queue="", exclusive=True, auto_delete=True).method.queue
            ch.queue_bind(queue=q, exchange=self.ledger.exchange, routing_key=ROUTING_KEY)
            ch.basic_consume(queue=q, auto_ack=True, on_message_callback=self._on_message)
            self._set("bound")
            while not self.halt.is_set():
                conn.process_data_events(time_limit=0.1)
        finally:
            try:
                conn.close()
            except Exception:
                pass


class AckLedger:
    """Acks per epoch, the consumers that collect them, the known Agents.
    brokers() returns the nodes' broker dicts (host, port, vhost, tls).
    Every public method is thread-safe."""

    def __init__(self, brokers, user, password, exchange):
        self.brokers = brokers
        self.user = user
        self.password = password
        self.exchange = exchange
        self.lock = threading.Lock()
        self.epochs = {}  # epoch -> {agent_id: record}
        self.duplicates = collections.Counter()  # epoch -> count
        self.malformed = 0
        self.registry = collections.OrderedDict()  # agent_id -> {notify_url, token, registered_at}
        self.consumers = {}  # broker key -> _Consumer
        self.retired = []  # consumers told to stop, until their connection is closed
        self.stopping = threading.Event()
        self.thread = None

    # ----- consumers ----------------------------------------------------------

    def start(self):
        self._reconcile()
        self.thread = threading.Thread(target=self._supervise, name="acks", daemon=True)
        self.thread.start()

    def stop(self, timeout=3.0):
        self.stopping.set()
        if self.thread is not None:
            self.thread.join(timeout)
        with self.lock:
            consumers = list(self.consumers.values()) + self.retired
            self.consumers.clear()
        for c in consumers:
            c.halt.set()
        deadline = time.monotonic() + timeout
        for c in consumers:
            c.join(max(0.0, deadline - time.monotonic()))

    def _supervise(self):
        while not self.stopping.wait(SCAN_INTERVAL):
            try:
                self._reconcile()
            except Exception as e:  # never take the simulator down
                _log("scan failed: %s: %s" % (type(e).__name__, e))

    def _reconcile(self):
        """One consumer per broker some node names now."""
        wanted = {broker_key(b) for b in self.brokers()}
        with self.lock:
            if self.stopping.is_set():
                return
            self.retired = [c for c in self.retired if c.is_alive()]
            for k in [k for k in self.consumers if k not in wanted]:
                c = self.consumers.pop(k)
                c.halt.set()
                self.retired.append(c)
            for k in wanted - set(self.consumers):
                c = self.consumers[k] = _Consumer(self, k)
                c.start()

    def consumer_states(self):
        """Every consumer; one that no node names any more is "closing"
        until its connection is closed (it may still receive until then)."""
        with self.lock:
            cons = [c for _, c in sorted(self.consumers.items())]
            cons += [c for c in self.retired if c.is_alive()]
            return [{"broker": c.label, "vhost": c.key[2], "tls": c.key[3],
                     "state": "closing" if c.halt.is_set() else c.state, "since": c.since,
                     "error": c.error, "connections": c.connections} for c in cons]

    # ----- the ledger -----------------------------------------------------------

    def record(self, body, label, user_id=None):
        """One delivery: "ok", "duplicate" or "malformed"."""
        ack = parse_ack(body)
        now = time.time()
        with self.lock:
            if not isinstance(ack, dict):
                self.malformed += 1
                n = self.malformed
            else:
                per = self.epochs.setdefault(ack["epoch"], {})
                if ack["agent_id"] in per:
                    self.duplicates[ack["epoch"]] += 1
                    return "duplicate"
                # user_id: the broker user RabbitMQ vouches for (the daemon
                # sets it; RabbitMQ refuses any other than the connection's).
                per[ack["agent_id"]] = {"received_at": now, "broker": label, "user_id": user_id,
                                        "settings_written_at": ack["settings_written_at"],
                                        "primary_id": ack["primary_id"], "daemon": ack["daemon"]}
                return "ok"
        if n <= MALFORMED_LOGGED:
            _log("%s: malformed ack (%s) ignored: %r" % (label, ack, bytes(body[:120])))
        return "malformed"

    @staticmethod
    def _epoch(epoch):
        if not _is_int(epoch) or epoch < 1:
            raise ValueError("epoch must be an integer >= 1")
        return epoch

    def acks(self, epoch=None):
        """The acks of one epoch; without one, the count of every epoch."""
        consumers = self.consumer_states()
        with self.lock:
            if epoch is None:
                return {"epochs": {str(e): len(a) for e, a in sorted(self.epochs.items())},
                        "malformed": self.malformed, "duplicates": sum(self.duplicates.values()),
                        "consumers": consumers}
            epoch = self._epoch(epoch)
            agents = {k: dict(v) for k, v in self.epochs.get(epoch, {}).items()}
            times = [v["received_at"] for v in agents.values()]
            return {"epoch": epoch, "count": len(agents),
                    "first_at": min(times) if times else None,
                    "last_at": max(times) if times else None,
                    "agents": agents, "malformed": self.malformed,
                    "duplicates": self.duplicates[epoch], "consumers": consumers}

    # ----- the Agents the Provider knows ---------------------------------------------

    def register_agent(self, agent_id, notify_url, token):
        if not isinstance(agent_id, str) or not AGENT_ID_RE.match(agent_id):
            raise ValueError("agent_id must be 1-64 characters of [A-Za-z0-9._:-]")
        if not isinstance(token, str) or not token or any(c in token for c in "\r\n"):
            raise ValueError("token must be a non-empty string on one line")
        url = _notify_target(notify_url)
        with self.lock:
            self.registry[agent_id] = {"notify_url": notify_url, "url": url, "token": token,
                                       "registered_at": time.time()}
        return {"agent_id": agent_id, "notify_url": url}

    def agents(self):
        """The registered Agents (tokens not shown)."""
        with self.lock:
            return {aid: {"notify_url": r["url"], "registered_at": r["registered_at"]}
                    for aid, r in self.registry.items()}

    def unacked(self, epoch):
        """Registered Agents with no ack for epoch or a later one."""
        epoch = self._epoch(epoch)
        with self.lock:
            acked = set()
            for e, per in self.epochs.items():
                if e >= epoch:
                    acked.update(per)
            return [(aid, dict(r)) for aid, r in self.registry.items() if aid not in acked]

    def notify_unacked(self, epoch, timeout=NOTIFY_TIMEOUT):
        """POSTs the notify of contract section 6 to every registered Agent
        that did not acknowledge epoch (or a later one), in parallel, each
        bounded by timeout. {"notified": [ids], "results": {id: status}}:
        the HTTP status, or "error: ..."."""
        targets = self.unacked(epoch)
        body = json.dumps({"reason": "primary promoted", "epoch": epoch}).encode()
        results = _post_all([(aid, r["url"], r["token"]) for aid, r in targets], body, timeout)
        notified = [aid for aid, _ in targets]
        _log("notify_unacked epoch %d: %d Agent(s): %s" % (epoch, len(notified),
                                                          ", ".join(notified[:20]) or "none"))
        return {"epoch": epoch, "notified": notified, "results": results}


def _notify_target(notify_url):
    """The POST URL for an Agent's notify listener: its base URL
    (http[s]://host:port) gets /v1/notify; a URL with a path is kept."""
    if not isinstance(notify_url, str) or len(notify_url) > NOTIFY_URL_MAX:
        raise ValueError("notify_url must be a string of at most %d bytes" % NOTIFY_URL_MAX)
    u = urllib.parse.urlsplit(notify_url)
    try:
        port = u.port
    except ValueError:
        raise ValueError("notify_url has a bad port") from None
    if u.scheme not in ("http", "https") or not u.hostname or u.username or u.password or port == 0:
        raise ValueError("notify_url must be http[s]://host[:port][/path], without credentials")
    if u.path in ("", "/"):
        return urllib.parse.urlunsplit((u.scheme, u.netloc, "/v1/notify", "", ""))
    return notify_url


def _post_all(targets, body, timeout):
    """POSTs body to every (agent_id, url, token) from at most
    NOTIFY_WORKERS daemon threads (a hung Agent never holds the simulator's
    exit); waits no longer than each request's bound allows. {agent_id:
    status}."""
    work = collections.deque(targets)
    results = {}
    lock = threading.Lock()

    def worker():
        while True:
            with lock:
                if not work:
                    return
                aid, url, token = work.popleft()
            status = _post_notify(url, token, body, timeout)
            with lock:
                results[aid] = status

    threads = [threading.Thread(target=worker, name="notify", daemon=True)
               for _ in range(min(NOTIFY_WORKERS, len(targets)))]
    for t in threads:
        t.start()
    rounds = -(-len(targets) // NOTIFY_WORKERS)
    deadline = time.monotonic() + rounds * (timeout + 1) + 1
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    with lock:
        return {aid: results.get(aid, "error: no answer in time") for aid, _, _ in targets}


def _post_notify(url, token, body, timeout):
    u = urllib.parse.urlsplit(url)
    if u.scheme == "https":
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # a lab tool: Agents' listeners are self-signed
        conn = http.client.HTTPSConnection(u.hostname, u.port or 443, timeout=timeout, context=ctx)
    else:
        conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=timeout)
    path = u.path + ("?" + u.query if u.query else "")
    try:
        conn.request("POST", path, body=body,
                     headers={"Authorization": "Bearer " + token,
                              "Content-Type": "application/json", "Connection": "close"})
        resp = conn.getresponse()
        resp.read(4096)
        return resp.status
    except Exception as e:  # refused, timed out, reset: reported, never raised
        return "error: %s: %s" % (type(e).__name__, e)
    finally:
        conn.close()
