"""A frame-aware AMQP 0-9-1 TCP proxy in front of a real RabbitMQ node, for
hostile-broker tests: it forwards every frame both ways and lets a test
drop frames, inject frames, or cut the connection when the client sends a
given frame, while recording what passed (time, direction, type, channel,
class, method).

    p = AmqpProxy(node.host, node.port)
    p.kill_on = lambda f: f.channel == 2 and f.method == (60, 40)   # basic.publish
    p.drop_s2c = lambda f: f.type == HEARTBEAT
    p.s2c_extra = lambda f: [frames to send after f]
    ... p.port ...
    p.close()
"""

import socket
import struct
import threading
import time

METHOD, HEADER, BODY, HEARTBEAT = 1, 2, 3, 8
FRAME_END = b"\xce"
PROTOCOL_HEADER = b"AMQP\x00\x00\x09\x01"


class Frame:
    __slots__ = ("type", "channel", "payload", "t", "direction")

    def __init__(self, ftype, channel, payload, direction):
        self.type, self.channel, self.payload = ftype, channel, payload
        self.t, self.direction = time.monotonic(), direction

    @property
    def method(self):
        if self.type != METHOD or len(self.payload) < 4:
            return None
        return struct.unpack(">HH", self.payload[:4])

    def raw(self):
        return frame(self.type, self.channel, self.payload)

    def __repr__(self):
        return "<%s %s ch%d %s %dB>" % (self.direction, self.type, self.channel, self.method, len(self.payload))


def frame(ftype, channel, payload):
    return struct.pack(">BHI", ftype, channel, len(payload)) + payload + FRAME_END


def shortstr(s):
    b = s.encode()
    return struct.pack(">B", len(b)) + b


def method_frame(channel, class_id, method_id, args=b""):
    return frame(METHOD, channel, struct.pack(">HH", class_id, method_id) + args)


def header_frame(channel, size, class_id=60):
    return frame(HEADER, channel, struct.pack(">HHQH", class_id, 0, size, 0))


def body_frame(channel, data):
    return frame(BODY, channel, data)


def basic_ack(channel, tag, multiple=False):
    return method_frame(channel, 60, 80, struct.pack(">QB", tag, 1 if multiple else 0))


def basic_nack(channel, tag, multiple=False):
    return method_frame(channel, 60, 120, struct.pack(">QB", tag, 1 if multiple else 0))


def basic_return(channel, code, text, exchange, key):
    return method_frame(channel, 60, 50, struct.pack(">H", code) + shortstr(text) + shortstr(exchange)
                        + shortstr(key))


class _Pair:
    def __init__(self, proxy, client, upstream):
        self.proxy, self.client, self.upstream = proxy, client, upstream
        self.lock = {id(client): threading.Lock(), id(upstream): threading.Lock()}
        self.closed = False

    def send(self, sock, data):
        with self.lock[id(sock)]:
            sock.sendall(data)

    def inject_s2c(self, data):
        if not self.closed:
            try:
                self.send(self.client, data)
            except OSError:
                pass

    def close(self):
        if self.closed:
            return
        self.closed = True
        for s in (self.client, self.upstream):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def pump(self, src, dst, direction):
        buf = b""
        header_left = len(PROTOCOL_HEADER) if direction == "c2s" else 0
        try:
            while not self.closed:
                data = src.recv(65536)
                if not data:
                    break
                buf += data
                if header_left:
                    n = min(header_left, len(buf))
                    self.send(dst, buf[:n])
                    buf, header_left = buf[n:], header_left - n
                while len(buf) >= 8:
                    ftype, ch, size = struct.unpack(">BHI", buf[:7])
                    if len(buf) < 8 + size:
                        break
                    f = Frame(ftype, ch, buf[7:7 + size], direction)
                    buf = buf[8 + size:]
                    self.proxy._record(self, f)
                    if direction == "c2s" and self.proxy.kill_on and self.proxy.kill_on(f):
                        self.proxy.killed += 1
                        self.close()
                        return
                    drop = self.proxy.drop_s2c if direction == "s2c" else self.proxy.drop_c2s
                    if drop and drop(f):
                        continue
                    out = f.raw()
                    if direction == "s2c" and self.proxy.s2c_extra:
                        out += b"".join(self.proxy.s2c_extra(f) or [])
                    self.send(dst, out)
        except OSError:
            pass
        self.close()


class AmqpProxy:
    def __init__(self, host, port):
        self.upstream = (host, port)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.host, self.port = "127.0.0.1", self.sock.getsockname()[1]
        self.kill_on = None    # f -> bool: cut the connection when the client sends f
        self.drop_s2c = None   # f -> bool: do not forward the broker's frame f
        self.drop_c2s = None   # f -> bool: do not forward the client's frame f
        self.s2c_extra = None  # f -> [bytes]: frames to send the client right after f
        self.frames = []       # every frame seen, both ways
        self.pairs = []
        self.killed = 0
        self.accepted = []     # monotonic time of each accepted connection
        self._lock = threading.Lock()
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _record(self, pair, f):
        with self._lock:
            self.frames.append(f)

    def _accept(self):
        while not self._stop:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            try:
                u = socket.create_connection(self.upstream, timeout=5)
                u.settimeout(None)
            except OSError:
                c.close()
                continue
            for s in (c, u):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            pair = _Pair(self, c, u)
            with self._lock:
                self.pairs.append(pair)
                self.accepted.append(time.monotonic())
            threading.Thread(target=pair.pump, args=(c, u, "c2s"), daemon=True).start()
            threading.Thread(target=pair.pump, args=(u, c, "s2c"), daemon=True).start()

    def seen(self, direction=None, ftype=None, channel=None, method=None, since=0.0):
        with self._lock:
            return [f for f in self.frames if f.t >= since
                    and (direction is None or f.direction == direction)
                    and (ftype is None or f.type == ftype)
                    and (channel is None or f.channel == channel)
                    and (method is None or f.method == method)]

    def inject_s2c(self, data):
        """Sends raw frames to the client of the newest live connection."""
        with self._lock:
            live = [p for p in self.pairs if not p.closed]
        assert live, "no live connection through the proxy"
        live[-1].inject_s2c(data)

    def connections(self):
        with self._lock:
            return len(self.accepted)

    def close(self):
        self._stop = True
        self.sock.close()
        with self._lock:
            pairs = list(self.pairs)
        for p in pairs:
            p.close()
