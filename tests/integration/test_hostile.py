"""The daemon against a hostile Provider and an unlucky fleet (issue 12's
review, second pass): each test is a way found to make the real daemon
commit a pair the contract does not confirm, or one that held. The hostile
node is the simulator's `forge` (fields merged over a node's answers)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from harness import util  # noqa: E402
from harness.rounds import expected_settings, poll_now  # noqa: E402

EVIL = {"host": "evil.example", "port": 5672, "vhost": "/", "tls": False}


def known_ids(d):
    return sorted(n["id"] for n in d.read_state()["nodes"])


def test_standby_listing_only_itself_does_not_shrink_the_cluster(sim_nobroker, daemon_factory):
    """Contract rule 6: the cluster a majority is counted in never shrinks
    below what the daemon knows; "a lone Standby that lists no other node,
    or only itself, is one vote of three in a known three-node cluster".
    Committed to p1 in a known p1/p2/p3 cluster, p1 and p2 answer 500. p3,
    rebuilt or confused, still follows p1 at epoch 1 but lists only itself:
    the known cluster (state file) must stay p1/p2/p3. Then p3, still a
    Standby, names itself Primary at epoch 8 with a broker of its choosing:
    one vote of three, nothing is committed, no credentials go there.
    Before the fix the daemon took p3's one-node list as the cluster and
    committed p3 "confirmed_by_majority" (a majority of one)."""
    s = sim_nobroker
    d = daemon_factory(sim=s, overrides={"provider": {"poll_interval": "1s"}})
    d.wait_for_primary("p1", 1, timeout=15)
    before = d.settings_text()
    assert known_ids(d) == ["p1", "p2", "p3"]

    s.fail("p1", "500")
    s.fail("p2", "500")
    s.forge("p3", {"nodes": [{"id": "p3", "api_url": s.urls["p3"]}]})
    poll_now(d, rounds=3)
    assert known_ids(d) == ["p1", "p2", "p3"]

    s.forge("p3", {"epoch": 8, "node": {"role": "standby"}, "nodes": [],
                   "primary": {"id": "p3", "api_url": s.urls["p3"], "broker": EVIL}})
    poll_now(d, rounds=3)
    assert d.read_state()["epoch"] == 1
    assert d.settings_text() == before
    assert "evil.example" not in d.log_text(), d.log_tail()

    # The cluster heals: p1 answers again and confirms itself; nothing moved.
    s.forge("p3", None)
    s.fail("p1", "none")
    s.fail("p2", "none")
    poll_now(d, rounds=2)
    assert d.read_state()["epoch"] == 1
    assert d.settings_text() == expected_settings(s, "p1", 1)


def test_four_node_cluster_two_standbys_after_a_shrink(sim_factory, daemon_factory):
    """The same in a known four-node cluster with no node naming itself:
    p4 lists only itself while p1..p3 fail; then p3 and p4 name p2 at
    epoch 8. Two of four is no majority (before the fix: two of three)."""
    s = sim_factory(nodes=4, brokers={n: ("127.0.0.1", util.closed_port())
                                      for n in ("p1", "p2", "p3", "p4")})
    d = daemon_factory(sim=s, overrides={"provider": {"poll_interval": "1s"}})
    d.wait_for_primary("p1", 1, timeout=15)
    assert known_ids(d) == ["p1", "p2", "p3", "p4"]
    before = d.settings_text()

    for n in ("p1", "p2", "p3"):
        s.fail(n, "500")
    s.forge("p4", {"nodes": [{"id": "p4", "api_url": s.urls["p4"]}]})
    poll_now(d, rounds=3)
    assert known_ids(d) == ["p1", "p2", "p3", "p4"]

    s.fail("p3", "none")
    claim = {"epoch": 8, "node": {"role": "standby"}, "nodes": [],
             "primary": {"id": "p2", "api_url": s.urls["p2"], "broker": EVIL}}
    s.forge("p3", claim)
    s.forge("p4", claim)
    poll_now(d, rounds=3)
    assert d.read_state()["epoch"] == 1
    assert d.settings_text() == before
    assert "evil.example" not in d.log_text(), d.log_tail()
