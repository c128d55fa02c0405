"""Drill: the old Primary comes back after a promotion, still claiming the
role at its old epoch. The daemon ignores it and must say so."""

NAME = "stale Primary back online"
SYMPTOM = r"(?i)stale primary p1"
CAUSE = r"(?i)stale (provider )?primary p1"
FIX = r"(?i)(demote|resynchroni[sz]e|Provider operators)"
GAPS = {}


def make(box):
    box.sim.revive_stale("p1")


def undo(box):
    box.sim.sync("p1")
