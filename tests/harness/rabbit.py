"""Real RabbitMQ nodes on loopback for whole-process tests.

Each node is a separate `rabbitmq-server` (Debian's 3.10) running as user
rabbitmq with its own node name, ports, data, logs, config and cookie in a
temp dir; a private epmd (loopback only, own port) serves them all. The
system service is never touched.

    group = RabbitGroup()
    nodes = group.start(2)          # in parallel; waits until each accepts AMQP
    nodes[0].host, nodes[0].port
    nodes[0].kill()                 # SIGKILL the beam: connections drop
    nodes[0].sigstop(); nodes[0].sigcont()   # unresponsive, TCP stays open
    nodes[0].restart()
    group.stop()                    # always; also registered for interpreter exit

Optional TLS listener (in addition to the plain one, which stays):

    tls_node, = group.start(1, tls=dict(cert="server.pem", key="server.key", ca="ca.pem"))
    tls_node.tls_port               # AMQPS on 127.0.0.1 (no client certificate asked)

The three PEM files are copied into the node's directory (readable by user
rabbitmq); the node is ready once both listeners accept connections.
"""

import os
import pwd
import resource
import secrets
import shutil
import signal
import subprocess
import tempfile
import threading
import time

from . import util

RABBITMQ_SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"
EPMD = "/usr/bin/epmd"
START_TIMEOUT = 90.0


def available():
    return os.path.exists(RABBITMQ_SERVER) and os.path.exists(EPMD)


def amqp_ready(host, port, timeout=1.0, user="guest", password="guest"):
    """True when a pika connection opens (the broker accepts AMQP logins)."""
    import pika
    try:
        conn = pika.BlockingConnection(pika.ConnectionParameters(
            host=host, port=port, credentials=pika.PlainCredentials(user, password),
            connection_attempts=1, socket_timeout=timeout, stack_timeout=timeout + 1,
            blocked_connection_timeout=timeout))
    except Exception:
        return False
    try:
        conn.close()
    except Exception:
        pass
    return True


def _node_preexec():
    """preexec_fn of a node: dies with its parent thread, and may open as
    many files as the hard limit allows. RabbitMQ sizes its limit on
    sockets from the file limit it starts with (about 90 % of it), and a
    fleet benchmark connects 1000 Agents and more to one node; a soft
    limit of 1024 would refuse some of them."""
    util.pdeathsig_term()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class Epmd:
    """A private epmd on 127.0.0.1:<port>, stopped by PID."""

    def __init__(self, workdir):
        self.port = util.free_port()
        self.log = open(os.path.join(workdir, "epmd.log"), "wb")
        env = {"PATH": "/usr/bin:/bin", "ERL_EPMD_ADDRESS": "127.0.0.1",
               "ERL_EPMD_PORT": str(self.port)}
        self.proc = subprocess.Popen(
            [EPMD, "-address", "127.0.0.1", "-port", str(self.port)],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT, env=env,
            start_new_session=True, preexec_fn=util.pdeathsig_term)
        util.register_cleanup(("epmd", self.proc.pid), self.stop)
        util.wait_until(lambda: util.port_open("127.0.0.1", self.port, 0.2) or self.proc.poll() is not None,
                        10, what="epmd to listen")
        if self.proc.poll() is not None:
            raise RuntimeError("epmd exited with %s" % self.proc.returncode)

    def stop(self):
        util.unregister_cleanup(("epmd", self.proc.pid))
        util.stop_popen(self.proc, timeout=5)
        self.log.close()


class RabbitNode:
    def __init__(self, group, index, workdir, epmd_port, tls=None):
        self.group = group
        self.index = index
        self.tls = dict(tls) if tls else None
        self.name = "%s%d_%d@localhost" % ("dsmtls" if self.tls else "dsmtest", index, os.getpid())
        self.host = "127.0.0.1"
        self.port = util.free_port()
        self.tls_port = util.free_port() if self.tls else None
        self.dist_port = util.free_port()
        self.dir = os.path.join(workdir, "node%d" % index)
        self.epmd_port = epmd_port
        self.proc = None
        self.beam_pid = None
        self.start_seconds = None
        self._console = None
        self._setup_dir()

    # ----- files -----------------------------------------------------------

    def _setup_dir(self):
        pw = pwd.getpwnam("rabbitmq")
        d = self.dir
        for sub in ("", "home", "mnesia", "log"):
            os.makedirs(os.path.join(d, sub), exist_ok=True)
        with open(os.path.join(d, "rabbitmq.conf"), "w") as f:
            f.write("loopback_users = none\n"
                    "listeners.tcp.default = 127.0.0.1:%d\n"
                    "disk_free_limit.absolute = 10MB\n"
                    "log.console = false\n"
                    "log.file.level = info\n" % self.port)
            if self.tls:
                tdir = os.path.join(d, "tls")
                os.makedirs(tdir, exist_ok=True)
                paths = {}
                for k in ("ca", "cert", "key"):
                    paths[k] = os.path.join(tdir, k + ".pem")
                    shutil.copyfile(self.tls[k], paths[k])
                os.chmod(paths["key"], 0o600)
                f.write("listeners.ssl.default = 127.0.0.1:%d\n"
                        "ssl_options.cacertfile = %s\n"
                        "ssl_options.certfile = %s\n"
                        "ssl_options.keyfile = %s\n"
                        "ssl_options.verify = verify_none\n"
                        "ssl_options.fail_if_no_peer_cert = false\n"
                        % (self.tls_port, paths["ca"], paths["cert"], paths["key"]))
        with open(os.path.join(d, "enabled_plugins"), "w") as f:
            f.write("[].\n")
        with open(os.path.join(d, "rabbitmq-env.conf"), "w") as f:
            f.write("# empty: every setting comes from the environment\n")
        cookie = os.path.join(d, "home", ".erlang.cookie")
        with open(cookie, "w") as f:
            f.write(secrets.token_hex(16).upper())
        for root, dirs, files in os.walk(d):
            for x in [root] + [os.path.join(root, y) for y in files]:
                os.chown(x, pw.pw_uid, pw.pw_gid)
        os.chmod(cookie, 0o400)

    def env(self):
        d = self.dir
        return {
            "PATH": "/usr/lib/rabbitmq/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": os.path.join(d, "home"),
            "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "ERL_EPMD_PORT": str(self.epmd_port),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_CONF_ENV_FILE": os.path.join(d, "rabbitmq-env.conf"),
            "RABBITMQ_CONFIG_FILE": os.path.join(d, "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": os.path.join(d, "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": os.path.join(d, "mnesia"),
            "RABBITMQ_LOG_BASE": os.path.join(d, "log"),
            "RABBITMQ_PID_FILE": os.path.join(d, "rabbit.pid"),
            "RABBITMQ_PLUGINS_EXPAND_DIR": os.path.join(d, "plugins-expand"),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS":
                "-kernel inet_dist_use_interface {127,0,0,1}",
        }

    # ----- lifecycle -------------------------------------------------------

    def spawn(self):
        """Starts the server process without waiting."""
        assert self.proc is None or self.proc.poll() is not None
        self.beam_pid = None
        self._t0 = time.monotonic()
        self._console = open(os.path.join(self.dir, "console.log"), "ab")
        self.proc = subprocess.Popen(
            [RABBITMQ_SERVER], cwd=self.dir, env=self.env(),
            stdin=subprocess.DEVNULL, stdout=self._console, stderr=subprocess.STDOUT,
            user="rabbitmq", group="rabbitmq", extra_groups=[],
            start_new_session=True, preexec_fn=_node_preexec)
        util.register_cleanup(("rabbit", self.name), self._force_stop)

    def find_beam(self):
        """The beam.smp pid in the server's session (the script runs erl,
        which execs beam.smp), or None."""
        if self.proc is None:
            return None
        for pid, comm, state in util.pids_in_session(self.proc.pid):
            if comm.startswith("beam") and state != "Z":
                return pid
        return None

    def wait_ready(self, timeout=START_TIMEOUT):
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError("rabbitmq node %s exited with %s during start:\n%s"
                                   % (self.name, self.proc.returncode, self.log_tail()))
            if util.port_open(self.host, self.port, 0.2) and amqp_ready(self.host, self.port) \
                    and (self.tls_port is None or util.port_open(self.host, self.tls_port, 0.2)):
                break
            if time.monotonic() >= deadline:
                raise TimeoutError("rabbitmq node %s did not accept AMQP within %.0fs:\n%s"
                                   % (self.name, timeout, self.log_tail()))
            time.sleep(0.2)
        self.start_seconds = time.monotonic() - self._t0
        self.beam_pid = util.wait_until(self.find_beam, 5, what="beam.smp pid")
        return self.start_seconds

    def start(self, timeout=START_TIMEOUT):
        self.spawn()
        return self.wait_ready(timeout)

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def kill(self):
        """SIGKILL the beam process: every connection drops at once."""
        pid = self.beam_pid or self.find_beam()
        if pid:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc is not None:
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                util.stop_popen(self.proc, signal.SIGKILL, timeout=5)
        self.beam_pid = None
        util.unregister_cleanup(("rabbit", self.name))

    def sigstop(self):
        """Freezes the broker: TCP stays open, nothing answers (heartbeats stop)."""
        os.kill(self.beam_pid or self.find_beam(), signal.SIGSTOP)

    def sigcont(self):
        pid = self.beam_pid or self.find_beam()
        if pid:
            os.kill(pid, signal.SIGCONT)

    def stop(self, timeout=20.0):
        """Graceful stop (SIGTERM to the beam), SIGKILL after the bound."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            pid = self.beam_pid or self.find_beam()
            if pid:
                try:
                    os.kill(pid, signal.SIGCONT)
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        rc = util.stop_popen(self.proc, signal.SIGKILL, timeout=5)
        util.unregister_cleanup(("rabbit", self.name))
        self.beam_pid = None
        if self._console:
            self._console.close()
            self._console = None
        return rc

    def _force_stop(self):
        if self.proc is not None and self.proc.poll() is None:
            util.kill_group(self.proc.pid, signal.SIGCONT)
            util.stop_popen(self.proc, signal.SIGKILL, timeout=5)

    def restart(self, timeout=START_TIMEOUT):
        self.stop()
        return self.start(timeout)

    def log_tail(self, n=40):
        out = []
        for name in ("console.log", os.path.join("log", self.name + ".log")):
            try:
                with open(os.path.join(self.dir, name), "rb") as f:
                    lines = f.read().decode(errors="replace").splitlines()[-n:]
                out.append("--- %s ---\n%s" % (name, "\n".join(lines)))
            except OSError:
                pass
        return "\n".join(out)

    def url(self, user="guest", password="guest", vhost="%2F"):
        return "amqp://%s:%s@%s:%d/%s" % (user, password, self.host, self.port, vhost)

    def __repr__(self):
        return "RabbitNode(%s, %s:%d)" % (self.name, self.host, self.port)


class RabbitGroup:
    """A set of independent RabbitMQ nodes sharing one private epmd."""

    def __init__(self, workdir=None):
        self.workdir = workdir or tempfile.mkdtemp(prefix="dsm-rabbit-")
        os.chmod(self.workdir, 0o755)
        self.epmd = None
        self.nodes = []
        self.lock = threading.Lock()
        self.start_seconds = None

    def start(self, n=2, timeout=START_TIMEOUT, tls=None):
        """Starts n nodes in parallel; returns them once each accepts AMQP.
        tls: dict(cert=, key=, ca=) PEM paths: each node also gets a TLS
        listener (node.tls_port)."""
        if not available():
            raise RuntimeError("rabbitmq-server is not installed")
        t0 = time.monotonic()
        if self.epmd is None:
            self.epmd = Epmd(self.workdir)
        new = [RabbitNode(self, len(self.nodes) + i + 1, self.workdir, self.epmd.port, tls=tls)
               for i in range(n)]
        self.nodes.extend(new)
        try:
            for node in new:
                node.spawn()
            for node in new:
                node.wait_ready(max(1.0, timeout - (time.monotonic() - t0)))
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - t0
        return new

    def stop(self):
        threads = [threading.Thread(target=n.stop, daemon=True) for n in self.nodes]
        for t in threads:
            t.start()
        for t in threads:
            t.join(40)
        for n in self.nodes:
            n._force_stop()
        if self.epmd is not None:
            self.epmd.stop()
            self.epmd = None

    def cleanup(self):
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)
