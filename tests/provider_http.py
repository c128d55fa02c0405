"""The HTTP serving layer of the Provider simulator (tests/provider_sim.py).

One asyncio event loop, in one thread, serves every node listener and the
load balancer, so a thousand daemons polling over keep-alive connections
cost one file descriptor each, not a thread each. What it does for the
simulator:

  HttpLoop   the loop and its thread; listen() binds a port and serves it
             with a handler; call() runs a function on the loop from another
             thread (the control API's) and returns its result
  Listener   one listening socket and the connections it accepted; close()
             closes the socket (new connections are refused) and drops them
  Request    one request: method, path, headers, peer; answered once with
             send(), send_error(), drop() (close, no answer) or reset()
  Stats      requests per listener and per second, and the service time,
             behind the control API's GET /stats

A handler is called on the loop for each request. It answers at once, or
returns a coroutine (a hung or slow node) that the loop runs as a task; a
connection reads its next request only once the current one is answered and
written out, as HTTP/1.1 wants. Every accepted socket has TCP_NODELAY, the
listen backlog is BACKLOG, idle keep-alive connections are closed after
IDLE_TIMEOUT seconds, and the answers are the ones http.server gave before
(status line, Server, Date, Content-Type, Content-Length, Connection: close
when closing; HEAD without the body; its HTML error pages).
"""

import asyncio
import collections
import concurrent.futures
import email.utils
import html
import http.server
import math
import socket
import struct
import sys
import threading
import time
import traceback

SERVER = "dsm-provider-sim/1.0"
ERROR_SERVER = SERVER + " Python/" + sys.version.split()[0]  # as http.server's send_error
BACKLOG = 4096
IDLE_TIMEOUT = 60.0
MAX_LINE = 65536
MAX_HEADERS = 100
PER_SECOND_MAX = 3600  # /stats keeps the last hour of per-second counts
RESPONSES = http.server.BaseHTTPRequestHandler.responses
LOG_STEP = math.log(1.01)  # latency histogram: buckets 1 % wide

_date_cache = [0, ""]


def http_date():
    """The Date header value, formatted once a second (loop thread only)."""
    now = int(time.time())
    if now != _date_cache[0]:
        _date_cache[:] = [now, email.utils.formatdate(now, usegmt=True)]
    return _date_cache[1]


def response_bytes(status, body, headers, content_type, close, head_only, date):
    """A whole answer: status line, Server, Date, Content-Type and
    Content-Length (none for a 304), headers, Connection: close when
    closing, then the body (none for a 304 or a HEAD)."""
    lines = ["HTTP/1.1 %d %s" % (status, RESPONSES.get(status, ("",))[0]),
             "Server: " + SERVER, "Date: " + date]
    if content_type and status != 304:
        lines.append("Content-Type: " + content_type)
    if status != 304:
        lines.append("Content-Length: %d" % len(body))
    for k, v in (headers or {}).items():
        lines.append("%s: %s" % (k, v))
    if close:
        lines.append("Connection: close")
    data = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    if status != 304 and not head_only:
        data += body
    return data


def bind_socket(host, port):
    """A listening TCP socket on host:port (errors raise in the caller)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, port))
        s.listen(BACKLOG)
        s.setblocking(False)
    except OSError:
        s.close()
        raise
    return s


class Stats:
    """Requests on the node listeners and the load balancer since start or
    the last reset, and the simulator's own service time: from the request
    head fully read to the whole answer written to the socket (hung and slow
    requests are counted but not timed). Thread-safe."""

    def __init__(self):
        self.lock = threading.Lock()
        self.names = []
        self.reset()

    def reset(self):
        with self.lock:
            self.since = time.time()
            self.by_name = collections.Counter()
            self.hist = collections.Counter()  # log bucket -> count
            self.count = 0
            self.max_us = 0.0
            self.seconds = collections.deque(maxlen=PER_SECOND_MAX)

    def add_name(self, name):
        with self.lock:
            if name not in self.names:
                self.names.append(name)

    def request(self, name):
        sec = int(time.time())
        with self.lock:
            self.by_name[name] += 1
            if self.seconds and self.seconds[-1][0] == sec:
                self.seconds[-1][1] += 1
            else:
                self.seconds.append([sec, 1])

    def latency(self, seconds):
        us = max(seconds * 1e6, 1.0)
        with self.lock:
            self.hist[int(math.log(us) / LOG_STEP)] += 1
            self.count += 1
            self.max_us = max(self.max_us, us)

    def _percentile(self, p):
        """Nearest rank, to 1 % (the bucket's middle), never above max."""
        rank = max(1, math.ceil(p / 100.0 * self.count))
        seen = 0
        for b in sorted(self.hist):
            seen += self.hist[b]
            if seen >= rank:
                return round(min(math.exp((b + 0.5) * LOG_STEP), self.max_us) / 1000.0, 3)
        return None

    def snapshot(self):
        """The GET /stats document (see tests/provider_sim.py)."""
        with self.lock:
            by = {name: self.by_name.get(name, 0) for name in self.names}
            by.update(self.by_name)
            lat = {"count": self.count, "p50": None, "p90": None, "p99": None, "max": None}
            if self.count:
                lat.update(p50=self._percentile(50), p90=self._percentile(90),
                           p99=self._percentile(99), max=round(self.max_us / 1000.0, 3))
            return {"since": self.since,
                    "requests": {"total": sum(self.by_name.values()), "by_node": by},
                    "latency_ms": lat,
                    "per_second": [list(x) for x in self.seconds]}


class Request:
    """One parsed request on a connection, answered exactly once."""

    __slots__ = ("conn", "t0", "requestline", "method", "path", "version", "headers",
                 "close", "timed", "answered")

    def __init__(self, conn, t0, requestline):
        self.conn = conn
        self.t0 = t0
        self.requestline = requestline
        self.method = self.path = None
        self.version = "HTTP/0.9"
        self.headers = {}
        self.close = True  # as http.server: kept alive only for HTTP/1.1
        self.timed = True
        self.answered = False

    @property
    def peer(self):
        return self.conn.peer

    def header(self, name, default=None):
        return self.headers.get(name.lower(), default)

    def untimed(self):
        """Leaves this request out of the latency figures (hang, slow)."""
        self.timed = False

    def parse(self, words, header_lines):
        """Fills the request from its head; (code, message) on an error."""
        if len(words) >= 3:
            err = self._parse_version(words[-1])
            if err:
                return err
        if len(words) != 3:
            return 400, "Bad request syntax (%r)" % self.requestline
        self.method, self.path = words[0], words[1]
        if len(header_lines) > MAX_HEADERS:
            return 431, "Too many headers"
        last = None
        for line in header_lines:
            line = line.rstrip("\r")
            if len(line) > MAX_LINE:
                return 431, "Line too long"
            if line[:1] in (" ", "\t") and last:  # obsolete line folding
                self.headers[last] += " " + line.strip()
                continue
            name, sep, value = line.partition(":")
            if sep:
                last = name.strip().lower()
                self.headers.setdefault(last, value.strip())
        conntype = self.headers.get("connection", "").lower()
        if conntype == "close":
            self.close = True
        elif conntype == "keep-alive":
            self.close = False
        return None

    def _parse_version(self, version):
        try:
            if not version.startswith("HTTP/"):
                raise ValueError
            major, minor = version.split("/", 1)[1].split(".")
            if not (major.isdigit() and minor.isdigit()) or len(major) > 10 or len(minor) > 10:
                raise ValueError
            number = (int(major), int(minor))
        except ValueError:
            return 400, "Bad request version (%r)" % version
        self.version = version
        if number >= (1, 1):
            self.close = False
        if number >= (2, 0):
            return 505, "Invalid HTTP version (%s)" % version.split("/", 1)[1]
        return None

    def send(self, status, body=b"", headers=None, content_type="application/json"):
        """The whole answer in one write, as the threaded server sent it."""
        data = response_bytes(status, body, headers, content_type, self.close,
                              self.method == "HEAD", http_date())
        self.conn.log_request(self, status, len(body))
        self.conn.answer(self, data)

    def send_error(self, code, message=None):
        """http.server's error page, and the connection closes."""
        short, explain = RESPONSES.get(code, ("???", "???"))
        message = message or short
        self.close = True
        lines = ["HTTP/1.1 %d %s" % (code, message), "Server: " + ERROR_SERVER,
                 "Date: " + http_date(), "Connection: close"]
        body = b""
        if code >= 200 and code not in (204, 205, 304):
            body = (http.server.DEFAULT_ERROR_MESSAGE % {
                "code": code, "message": html.escape(message, quote=False),
                "explain": html.escape(explain, quote=False)}).encode("UTF-8", "replace")
            lines += ["Content-Type: " + http.server.DEFAULT_ERROR_CONTENT_TYPE,
                      "Content-Length: %d" % len(body)]
        data = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace")
        if self.method != "HEAD":
            data += body
        self.conn.log_request(self, code, "-")
        self.conn.answer(self, data)

    def drop(self):
        """No answer: the connection closes (a hung request released by a
        kill, or a handler that failed)."""
        self.close = True
        self.timed = False
        self.conn.answer(self, None)

    def reset(self, data):
        """Writes data, then resets the connection (SO_LINGER 0)."""
        self.close = True
        self.timed = False
        self.conn.reset(self, data)


class _Conn(asyncio.Protocol):
    """One accepted connection: reads request heads, one at a time."""

    def __init__(self, listener):
        self.lst = listener
        self.buf = bytearray()
        self.req = None  # the request being answered
        self.written = None  # answered, its answer still in the write buffer
        self.written_at = 0.0
        self.skip = 0  # body bytes of the last request, discarded
        self.processing = False
        self.closing = False
        self.tr = None
        self.peer = None
        self.last = time.monotonic()

    # ----- asyncio callbacks ---------------------------------------------

    def connection_made(self, transport):
        self.tr = transport
        if self.lst.closed:  # accepted just before a kill
            transport.abort()
            self.closing = True
            return
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if peer else None
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # pause_writing() on anything left unsent, resume_writing() once it
        # is all written: the moment an answer is out.
        transport.set_write_buffer_limits(high=0, low=0)
        self.lst.conns.add(self)

    def connection_lost(self, exc):
        self.closing = True
        self.lst.conns.discard(self)

    def data_received(self, data):
        self.last = time.monotonic()
        self.buf += data
        self._process()

    def pause_writing(self):
        pass

    def resume_writing(self):
        req, self.written = self.written, None
        if req is not None:
            self._done(req)

    # ----- requests --------------------------------------------------------

    def _process(self):
        """Starts the buffered requests, one at a time."""
        if self.processing:
            return
        self.processing = True
        try:
            while self.req is None and not self.closing and self._skip_body():
                head = self._take_head()
                if head is None:
                    break
                self._start(head)
        finally:
            self.processing = False

    def _skip_body(self):
        n = min(self.skip, len(self.buf))
        del self.buf[:n]
        self.skip -= n
        return self.skip == 0

    def _take_head(self):
        buf = self.buf
        end, sep = buf.find(b"\r\n\r\n"), 4
        bare = buf.find(b"\n\n")
        if bare >= 0 and (end < 0 or bare < end):
            end, sep = bare, 2
        if end < 0:
            if len(buf) > MAX_LINE * (MAX_HEADERS + 1):
                self._close()
            return None
        head = bytes(buf[:end])
        del buf[:end + sep]
        return head

    def _start(self, head):
        lines = head.decode("iso-8859-1").split("\n")
        requestline = lines[0].rstrip("\r")
        words = requestline.split()
        if not words:  # http.server closes on an empty request line
            self._close()
            return
        req = Request(self, time.monotonic(), requestline)
        self.req = req
        self.lst.stats.request(self.lst.name)
        if len(requestline) > MAX_LINE:
            req.send_error(414)
            return
        err = req.parse(words, lines[1:])
        if err:
            req.send_error(*err)
            return
        self._prepare_body(req)
        try:
            pending = self.lst.handler(req)
        except Exception:
            traceback.print_exc()
            pending = None
        if pending is not None:
            self.lst.http.run(self._finish_later(req, pending))
        elif not req.answered:
            req.drop()

    def _prepare_body(self, req):
        """Bodies are never read: skipped (and 100-continue granted)."""
        try:
            self.skip = max(0, int(req.header("Content-Length") or 0))
        except ValueError:
            self.skip = 0
        if (req.header("Expect", "").lower() == "100-continue"
                and req.version >= "HTTP/1.1"):
            self.tr.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    async def _finish_later(self, req, pending):
        try:
            await pending
        except Exception:
            traceback.print_exc()
        if not req.answered:
            req.drop()

    def answer(self, req, data):
        """Writes req's answer (None: none); the next request starts once
        it is all written."""
        req.answered = True
        if self.closing or self.tr.is_closing():
            self.req = None
            return
        if data:
            self.tr.write(data)
        if self.tr.get_write_buffer_size():
            self.written = req
            self.written_at = time.monotonic()
        else:
            self._done(req)

    def reset(self, req, data):
        req.answered = True
        self.req = None
        if self.closing or self.tr.is_closing():
            return
        self.tr.write(data)
        self.tr.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                                    struct.pack("ii", 1, 0))
        self.closing = True
        self.tr.abort()

    def _done(self, req):
        if req.timed:
            self.lst.stats.latency(time.monotonic() - req.t0)
        self.req = None
        self.last = time.monotonic()
        if req.close:
            self._close()
        else:
            self._process()

    def _close(self):
        self.closing = True
        self.tr.close()

    def drop_now(self):
        """The node was killed: FIN to the client now, no answer."""
        self.closing = True
        try:
            self.tr.get_extra_info("socket").shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.tr.abort()

    def idle(self, now):
        """Idle for IDLE_TIMEOUT between requests, or that long writing one
        answer (the threaded server's socket timeout)."""
        if self.req is None:
            return now - self.last > IDLE_TIMEOUT
        return self.written is not None and now - self.written_at > IDLE_TIMEOUT

    def log_request(self, req, code, size):
        if self.lst.http.verbose:
            self.lst.http.log('%s "%s" %s %s' % (self.peer, req.requestline, code, size))


class Listener:
    """A listening socket served by the loop, and its connections."""

    def __init__(self, http_loop, name, handler, sock):
        self.http = http_loop
        self.stats = http_loop.stats
        self.name = name
        self.handler = handler
        self.sock = sock
        self.port = sock.getsockname()[1]
        self.conns = set()
        self.server = None
        self.closed = False

    async def start(self):
        self.server = await asyncio.get_running_loop().create_server(
            lambda: _Conn(self), sock=self.sock, backlog=BACKLOG)

    def close(self):
        """Loop thread: refuse new connections, drop the accepted ones."""
        self.closed = True
        if self.server is not None:
            self.server.close()
        else:
            self.sock.close()
        for c in list(self.conns):
            c.drop_now()
        self.http.listeners.discard(self)


class HttpLoop:
    """The event loop thread serving every Listener."""

    def __init__(self, log, verbose=False):
        self.loop = asyncio.new_event_loop()
        self.log = log
        self.verbose = verbose
        self.stats = Stats()
        self.listeners = set()
        self.tasks = set()
        self.thread = None

    def start(self):
        self.thread = threading.Thread(target=self._run, name="http-loop", daemon=True)
        self.thread.start()

    def _run(self):
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(self._sweep)
        self.loop.run_forever()

    def _sweep(self):
        """Closes keep-alive connections idle for IDLE_TIMEOUT."""
        now = time.monotonic()
        for lst in list(self.listeners):
            for c in [c for c in lst.conns if c.idle(now)]:
                c._close()
        self.loop.call_later(5.0, self._sweep)

    def call(self, fn, *args, timeout=30.0):
        """fn(*args) on the loop thread; returns its result here."""
        if threading.current_thread() is self.thread:
            return fn(*args)
        fut = concurrent.futures.Future()

        def run():
            try:
                fut.set_result(fn(*args))
            except BaseException as e:
                fut.set_exception(e)

        self.loop.call_soon_threadsafe(run)
        return fut.result(timeout)

    def soon(self, fn, *args):
        """fn(*args) on the loop thread, without waiting."""
        self.loop.call_soon_threadsafe(fn, *args)

    def run(self, coro):
        """Runs coro as a task of the loop (loop thread only)."""
        task = self.loop.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def listen(self, host, port, name, handler):
        """Binds host:port here (OSError raises) and serves it on the loop
        with handler(request). Returns the Listener."""
        lst = Listener(self, name, handler, bind_socket(host, port))
        self.stats.add_name(name)
        try:
            asyncio.run_coroutine_threadsafe(lst.start(), self.loop).result(30.0)
        except BaseException:
            lst.sock.close()
            raise
        self.call(self.listeners.add, lst)
        return lst

    def close(self, lst):
        self.call(lst.close)

    def stop(self):
        if self.thread is None:
            return
        for lst in list(self.listeners):
            self.close(lst)
        self.call(lambda: [t.cancel() for t in self.tasks])
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10.0)
        self.thread = None
