#!/usr/bin/python3
"""Configuration rules of contract section 2 seen from outside the process
(issue 13): the real daemon binary, its --check-config, its exit status and
its messages, and the notify listener's allow list.

- A Provider URL with credentials (user:password@ or user@) is a
  configuration error: exit 78 with FILE:LINE: message, the password shown
  nowhere.
- A load_balancer that is also one of the endpoints (however written) is
  rejected at the load_balancer's line: its answers come from any node and
  must not count as a node's vote.
- allow entries match their own family: `10.0.0.0/8, ::/0` admits no IPv4
  peer, also not one a dual-stack listener shows as ::ffff:127.0.0.1.
- The plain-http warning at start does not depend on the scheme's case.

Run: make integration PYTEST_ARGS='tests/integration/test_config_check.py -x -q'
"""

import os
import re
import socket

import pytest

from harness import util

PASSWORD = "Pw-s3cret-42"


def line_of(text, startswith):
    for i, ln in enumerate(text.splitlines(), 1):
        if ln.startswith(startswith):
            return i
    raise AssertionError("no line starting with %r" % startswith)


def provider(**keys):
    """[provider] overrides on top of the harness defaults (no simulator)."""
    return {"provider": {"endpoints": None, "load_balancer": None, **keys}}


def assert_rejected(d, key, words):
    """Both a start and --check-config exit 78 with FILE:LINE: at key's line."""
    text = open(d.config_path).read()
    line = line_of(text, key + " = ")
    for args in ((), ("--check-config",)):
        r = d.run(*args, timeout=15)
        assert r.returncode == 78, (args, r.returncode, r.stderr)
        assert re.search(r"^%s:%d: .*%s" % (re.escape(d.config_path), line, words), r.stderr, re.M), \
            (args, r.stderr)
        assert PASSWORD not in r.stderr + r.stdout, (args, r.stderr)
    assert not os.path.exists(d.settings_file)
    assert not os.path.exists(d.state_file)


# ----- credentials in URLs -------------------------------------------------------

@pytest.mark.parametrize("key,url", [
    ("endpoints", "http://agent:%s@127.0.0.1:1" % PASSWORD),
    ("endpoints", "https://p1.example, HTTPS://agent:%s@P2.example:8443/api" % PASSWORD),
    ("endpoints", "https://agent@p1.example"),
    ("load_balancer", "https://agent:%s@lb.example" % PASSWORD),
    ("load_balancer", "http://agent@lb.example:8080"),
])
def test_url_with_credentials_is_a_config_error(daemon_factory, key, url):
    d = daemon_factory(None, provider(**{key: url}), start=False)
    assert_rejected(d, key, "credentials")


# ----- a load balancer that is an endpoint ------------------------------------------

@pytest.mark.parametrize("lb", [
    "https://p2.example",
    "HTTPS://P2.Example:443/",
    "https://p1.example:8443/api/",
])
def test_load_balancer_equal_to_an_endpoint_is_rejected(daemon_factory, lb):
    eps = "https://p1.example:8443/api, https://p2.example"
    d = daemon_factory(None, provider(endpoints=eps, load_balancer=lb), start=False)
    assert_rejected(d, "load_balancer", "also in endpoints")


@pytest.mark.parametrize("lb", [
    "https://lb.example",
    "http://p2.example",            # another scheme: another origin
    "https://p2.example:8443",      # another port
    "https://p1.example:8443/other",
])
def test_load_balancer_elsewhere_is_accepted(daemon_factory, lb):
    eps = "https://p1.example:8443/api, https://p2.example"
    d = daemon_factory(None, provider(endpoints=eps, load_balancer=lb), start=False)
    r = d.run("--check-config", timeout=15)
    assert r.returncode == 0, r.stderr


# ----- plain http, any letter case ---------------------------------------------------

def test_plain_http_warning_in_any_case(daemon_factory):
    port = util.closed_port()
    d = daemon_factory(None, provider(endpoints="HTTP://127.0.0.1:%d" % port,
                                      load_balancer="Http://localhost:%d/lb" % port), start=False)
    r = d.run("--once", timeout=30)
    assert r.returncode != 0  # nobody answers
    assert re.search(r"endpoint HTTP://127\.0\.0\.1:%d uses plain http" % port, r.stderr), r.stderr
    assert re.search(r"load balancer Http://localhost:%d/lb uses plain http" % port, r.stderr), r.stderr


def test_no_plain_http_warning_for_https(daemon_factory):
    port = util.closed_port()
    d = daemon_factory(None, provider(endpoints="HTTPS://127.0.0.1:%d" % port), start=False)
    r = d.run("--once", timeout=30)
    assert "plain http" not in r.stderr, r.stderr


# ----- allow-list families -------------------------------------------------------------

def fetch_healthz(host, port, timeout=5.0):
    """The raw answer to GET /healthz; b"" when the peer is refused at
    accept (closed or reset before a byte is answered)."""
    with socket.create_connection((host, port), timeout=timeout) as s:
        try:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            return s.makefile("rb").read()
        except (BrokenPipeError, ConnectionResetError):
            return b""


def start_listener(daemon_factory, notify_socket, listen_host, allow):
    """The daemon (no Provider answers) listening on listen_host with allow;
    started once READY=1 (a /healthz probe could be refused)."""
    port = util.free_port(listen_host)
    listen = ("[%s]:%d" if ":" in listen_host else "%s:%d") % (listen_host, port)
    d = daemon_factory(None, {**provider(endpoints="http://127.0.0.1:%d" % util.closed_port()),
                              "notify": {"listen": listen, "allow": allow}},
                       notify_socket=notify_socket)
    return d, port


def test_ipv6_any_admits_no_ipv4_peer(daemon_factory, notify_socket):
    d, port = start_listener(daemon_factory, notify_socket, "127.0.0.1", "10.0.0.0/8, ::/0")
    mark = d.log_mark()
    assert fetch_healthz("127.0.0.1", port) == b""
    d.wait_for_log(r"peer not allowed", start=mark)


def test_ipv4_rule_admits_ipv4_peer(daemon_factory, notify_socket):
    d, port = start_listener(daemon_factory, notify_socket, "127.0.0.1", "127.0.0.0/8, ::/0")
    assert fetch_healthz("127.0.0.1", port).startswith(b"HTTP/1.1 200")


def test_dual_stack_mapped_ipv4_peer_is_ipv4(daemon_factory, notify_socket):
    """On [::] an IPv4 client shows as ::ffff:127.0.0.1: still an IPv4 peer."""
    try:
        util.free_port("::1")
    except OSError:
        pytest.skip("no IPv6 loopback")
    d, port = start_listener(daemon_factory, notify_socket, "::", "10.0.0.0/8, ::/0")
    mark = d.log_mark()
    assert fetch_healthz("127.0.0.1", port) == b""
    d.wait_for_log(r"peer not allowed", start=mark)
    assert fetch_healthz("::1", port).startswith(b"HTTP/1.1 200")
