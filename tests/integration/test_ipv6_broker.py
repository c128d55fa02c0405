"""A Primary whose broker host is an IPv6 literal (contract sections 3 and
5): given as "::1" or "[::1]", it is committed, written to the settings file
in one form (no brackets, as section 5's `host = ...` line reads), and
connected. The RabbitMQ nodes of the tests listen on 127.0.0.1, so the test
puts a small TCP relay on [::1] in front of one: the daemon's AMQP
connection really goes over IPv6."""

import os
import selectors
import socket
import sys
import threading

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from harness.rounds import poll_now  # noqa: E402


class Relay(threading.Thread):
    """Accepts on [::1]:port, relays each connection to target; stop() ends
    every connection and the thread."""

    def __init__(self, target):
        super().__init__(daemon=True)
        self.target = target
        self.lsock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind(("::1", 0))
        self.lsock.listen(16)
        self.port = self.lsock.getsockname()[1]
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.lsock, selectors.EVENT_READ, None)
        self.peers = {}
        self.accepted = 0
        self.stopping = False

    def run(self):
        while not self.stopping:
            for key, _ in self.sel.select(0.1):
                if key.data is None:
                    c, _ = self.lsock.accept()
                    self.accepted += 1
                    u = socket.create_connection(self.target)
                    for a, b in ((c, u), (u, c)):
                        self.peers[a] = b
                        self.sel.register(a, selectors.EVENT_READ, b)
                    continue
                src, dst = key.fileobj, key.data
                try:
                    data = src.recv(65536)
                except OSError:
                    data = b""
                if not data:
                    self._close(src)
                    continue
                try:
                    dst.sendall(data)
                except OSError:
                    self._close(src)
        for s in list(self.peers):
            self._close(s)
        self.sel.close()
        self.lsock.close()

    def _close(self, s):
        other = self.peers.pop(s, None)
        for x in (s, other):
            if x is None:
                continue
            self.peers.pop(x, None)
            try:
                self.sel.unregister(x)
            except (KeyError, ValueError):
                pass
            x.close()

    def stop(self):
        self.stopping = True
        self.join(5)


def _ipv6_loopback():
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.parametrize("form", ["::1", "[::1]"])
def test_ipv6_broker_host(form, sim, rabbit_ok, daemon_factory):
    if not _ipv6_loopback():
        pytest.skip("no IPv6 loopback on this machine")
    s = sim
    target = rabbit_ok[1]
    relay = Relay((target.host, target.port))
    relay.start()
    try:
        d = daemon_factory(sim=s, overrides={"provider": {"poll_interval": "1s"}})
        d.wait_for_primary("p1", 1, timeout=20)
        s.set_broker("p2", form, relay.port)
        s.promote("p2", event=False)
        poll_now(d, rounds=1)
        st = d.wait_for_primary("p2", 2, timeout=20)
        assert st["rabbitmq"]["host"] == "::1", st
        assert int(st["rabbitmq"]["port"]) == relay.port
        assert "host = ::1\n" in d.settings_text()
        d.wait_for_log(r"MESSAGE_ID=\w+.*broker ::1:%d connected|broker ::1:%d connected"
                       % (relay.port, relay.port), 20)
        assert relay.accepted >= 1
        code, doc = d.status()
        assert code == 200 and doc["broker_connection"] == "connected", doc
        assert doc["primary"]["broker"]["host"] == "::1"
    finally:
        relay.stop()
