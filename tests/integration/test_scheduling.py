"""Poll scheduling around broker moves (contract section 4, issue 14): a
connection being set up for a newly committed Primary is not a loss. The
daemon keeps its normal schedule until that connection actually fails, and
only then polls fast. With a fleet moving at once, anything else multiplies
the Provider's load exactly when it has just failed over."""

import os
import socket
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from harness import util  # noqa: E402


class Tarpit(threading.Thread):
    """Accepts TCP connections and never says a word: an AMQP handshake to
    it stays pending until the daemon's own handshake timeout."""

    def __init__(self):
        super().__init__(daemon=True)
        self.lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(16)
        self.lsock.settimeout(0.1)
        self.port = self.lsock.getsockname()[1]
        self.conns = []
        self.stopping = False

    def run(self):
        while not self.stopping:
            try:
                c, _ = self.lsock.accept()
                self.conns.append(c)
            except socket.timeout:
                continue
            except OSError:
                break

    def stop(self):
        self.stopping = True
        self.join(5)
        for c in self.conns:
            c.close()
        self.lsock.close()


def provider_requests(s):
    st = s.state()
    return sum(n["counters"]["requests"] for n in st["nodes"].values())


def test_pending_connection_to_new_broker_is_not_a_loss(sim_nobroker, daemon_factory):
    """p2's broker accepts and never answers: the connection to it stays
    pending (handshake timeout 2 x heartbeat = 20 s). Meanwhile the daemon
    polls on its normal schedule (poll_interval 30 s): no round at all in
    the 6 s after the commit. Fast polling (500 ms, 1 s, 2 s, 4 s) would
    have made three rounds, 9 requests or more."""
    s = sim_nobroker
    pit = Tarpit()
    pit.start()
    try:
        d = daemon_factory(sim=s, overrides={"provider": {"poll_interval": "30s",
                                                          "fast_poll_interval": "500ms"},
                                             "broker": {"heartbeat": "10s"}})
        d.wait_for_primary("p1", 1, timeout=15)
        s.set_broker("p2", "127.0.0.1", pit.port)
        s.promote("p2", event=False)
        d.notify()
        d.wait_for_primary("p2", 2, timeout=15)
        util.wait_until(lambda: len(pit.conns) >= 1, 10, what="a connection to the new broker")
        time.sleep(0.5)  # the committing round's own late answers
        before = provider_requests(s)
        time.sleep(6)
        after = provider_requests(s)
        code, doc = d.status()
        assert doc["broker_connection"] == "connecting", doc
        assert after - before <= 4, (before, after, d.log_tail())
    finally:
        pit.stop()


def test_failed_connection_to_new_broker_polls_fast(sim_nobroker, daemon_factory):
    """The other side: the new broker refuses (a closed port). That is a
    failure, so the daemon polls fast again (contract 4), here at least
    two rounds within 4 s although poll_interval is 30 s."""
    s = sim_nobroker
    d = daemon_factory(sim=s, overrides={"provider": {"poll_interval": "30s",
                                                      "fast_poll_interval": "500ms"}})
    d.wait_for_primary("p1", 1, timeout=15)
    s.promote("p2", event=False)
    d.notify()
    d.wait_for_primary("p2", 2, timeout=15)
    time.sleep(0.5)
    before = provider_requests(s)
    time.sleep(4)
    after = provider_requests(s)
    assert after - before >= 6, (before, after, d.log_tail())
