"""Fixtures for whole-process tests (run with /usr/bin/python3 -m pytest).

rabbit_nodes    session: 2 real RabbitMQ nodes on loopback (list of
                harness.rabbit.RabbitNode: .host .port .kill() .sigstop()
                .sigcont() .restart()), started in parallel at first use.
sim             function: the Provider simulator (harness.sim.Sim) with p1's
                broker on rabbit_nodes[0], p2's and p3's on rabbit_nodes[1].
sim_nobroker    function: the simulator with brokers on closed loopback ports.
sim_factory     function: sim_factory(brokers=None, nodes=3, token=..., extra_args=())
notify_socket   function: harness.notify_socket.NotifySocket.
daemon_factory  function: daemon_factory(sim=None, overrides=None,
                notify_socket=None, start=True, **Daemon kwargs) -> Daemon;
                every daemon is stopped at teardown (log tail printed when the
                test failed).
daemon_bin      the daemon binary path (skips when it is not built).
"""

import os
import signal
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from harness import daemon as daemon_mod  # noqa: E402
from harness import rabbit, util  # noqa: E402
from harness.notify_socket import NotifySocket  # noqa: E402
from harness.sim import Sim  # noqa: E402


def _term_to_interrupt(signum, frame):
    # SIGTERM to pytest: unwind like Ctrl-C so every finalizer runs.
    raise KeyboardInterrupt("SIGTERM")


def pytest_configure(config):
    try:
        signal.signal(signal.SIGTERM, _term_to_interrupt)
    except ValueError:
        pass  # not the main thread


def pytest_unconfigure(config):
    util.cleanup_all()


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)


def _failed(request):
    rep = getattr(request.node, "rep_call", None)
    return rep is not None and rep.failed


@pytest.fixture(scope="session")
def rabbit_nodes(tmp_path_factory):
    if not rabbit.available():
        pytest.skip("rabbitmq-server is not installed")
    group = rabbit.RabbitGroup()
    try:
        nodes = group.start(2)
        sys.stderr.write("\nrabbit_nodes: 2 nodes accepted AMQP %.1fs after start (%s)\n"
                         % (group.start_seconds, ", ".join(repr(n) for n in nodes)))
        yield nodes
    finally:
        group.cleanup()


@pytest.fixture
def rabbit_ok(rabbit_nodes):
    """rabbit_nodes, each one restarted if an earlier test left it dead or
    frozen."""
    for n in rabbit_nodes:
        n.sigcont()
        if not n.alive() or not rabbit.amqp_ready(n.host, n.port, timeout=2):
            n.restart()
    return rabbit_nodes


@pytest.fixture
def sim_factory(tmp_path):
    sims = []

    def make(brokers=None, nodes=3, token="sim-provider-token", extra_args=()):
        wd = tmp_path / ("sim%d" % len(sims))
        s = Sim.start(token=token, brokers=brokers, nodes=nodes, workdir=str(wd),
                      extra_args=extra_args)
        sims.append(s)
        return s

    yield make
    for s in sims:
        s.stop()


@pytest.fixture
def sim(sim_factory, rabbit_ok):
    a, b = rabbit_ok[0], rabbit_ok[1]
    return sim_factory(brokers={"p1": (a.host, a.port), "p2": (b.host, b.port),
                                "p3": (b.host, b.port)})


@pytest.fixture
def sim_nobroker(sim_factory):
    return sim_factory(brokers={nid: ("127.0.0.1", util.closed_port())
                                for nid in ("p1", "p2", "p3")})


@pytest.fixture
def notify_socket():
    ns = NotifySocket()
    yield ns
    ns.close()


@pytest.fixture
def daemon_bin():
    if not os.path.exists(daemon_mod.DAEMON_BIN):
        pytest.skip("daemon not built: %s" % daemon_mod.DAEMON_BIN)
    return daemon_mod.DAEMON_BIN


@pytest.fixture
def daemon_factory(tmp_path, request, daemon_bin):
    daemons = []

    def make(sim=None, overrides=None, notify_socket=None, start=True, wait=True, **kw):
        wd = tmp_path / ("daemon%d" % len(daemons))
        d = daemon_mod.Daemon(str(wd), sim=sim, overrides=overrides,
                              notify_socket=notify_socket, binary=daemon_bin, **kw)
        daemons.append(d)
        if start:
            d.start(wait=wait)
        return d

    yield make
    failed = _failed(request)
    for d in daemons:
        rc = d.stop()
        if failed:
            sys.stderr.write("\n%s\n(exit code %s)\n" % (d.log_tail(120), rc))
