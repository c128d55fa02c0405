"""Drill: an agent update is offered while one Provider node still runs
the previous version (a Provider update stopped half-way): it is held."""

NAME = "version skew holding an update"
SYMPTOM = r"held"
CAUSE = r"(?i)version.skew: p3=9\.0\.1"
FIX = r"(?i)(once every Provider node|same version|finish the Provider update|update p3)"
GAPS = {}


def make(box):
    for n in ("p1", "p2"):
        box.sim.set_version(n, "9.0.3")
    box.offer_agent_update("9.0.3")


def undo(box):
    box.sim.withdraw_update()
    for n in ("p1", "p2"):
        box.sim.set_version(n, "9.0.1")
