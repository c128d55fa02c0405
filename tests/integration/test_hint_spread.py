"""[provider] hint_spread: a fleet-wide trigger (event, notify, broker loss)
reaches every agent at once; each waits a random delay of up to hint_spread
before its poll round, so the Provider is not asked by the whole fleet in
the same second. With hint_spread = 0 (the default) the round starts at once.

The daemon runs against the simulator with brokers on closed ports and both
poll intervals at 60 s, so every round after start-up is one the test caused.
"""

import time

from harness import util

QUIET = {"provider": {"poll_interval": "60s", "fast_poll_interval": "60s"}}


def requests_p1(sim):
    return sim.state()["nodes"]["p1"]["counters"].get("requests", 0)


def wait_quiet(sim, settle=0.8, timeout=20.0):
    """Until the simulator has seen no request for `settle` seconds."""
    deadline = time.monotonic() + timeout
    last, since = requests_p1(sim), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = requests_p1(sim)
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= settle:
            return now
    raise TimeoutError("the daemon never went quiet")


def delay_of_notify(d, sim):
    """Seconds from a notify to the first GET it causes at p1."""
    before = requests_p1(sim)
    t0 = time.monotonic()
    status, _ = d.notify({"reason": "hint_spread test"})
    assert status == 202
    util.wait_until(lambda: requests_p1(sim) > before, 10.0, what="the round a notify causes")
    return time.monotonic() - t0


def start(daemon_factory, sim, spread):
    ov = {k: dict(v) for k, v in QUIET.items()}
    ov["provider"]["hint_spread"] = spread
    d = daemon_factory(sim, overrides=ov)
    d.wait_for_primary("p1", 1, timeout=15)
    wait_quiet(sim)
    return d


def test_hint_spread_delays_hint_rounds_within_the_bound(daemon_factory, sim_nobroker):
    sim = sim_nobroker
    d = start(daemon_factory, sim, "2s")
    delays = []
    for _ in range(4):
        delays.append(delay_of_notify(d, sim))
        wait_quiet(sim, settle=0.3)
    # Every round still comes, within the spread (plus scheduling slack) ...
    assert max(delays) < 2.0 + 1.5, delays
    # ... and the draws are spread: four draws all under 0.1 s of a uniform
    # 0-2 s delay happen with probability 0.05^4.
    assert max(delays) > 0.1, delays


def test_without_hint_spread_a_notify_polls_at_once(daemon_factory, sim_nobroker):
    sim = sim_nobroker
    d = start(daemon_factory, sim, "0s")
    delays = []
    for _ in range(3):
        delays.append(delay_of_notify(d, sim))
        wait_quiet(sim, settle=0.4)
    assert max(delays) < 1.0, delays
