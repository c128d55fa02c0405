"""Drill: the old Primary comes back after a promotion, still claiming the
role at its old epoch. The daemon ignores it and must say so."""

NAME = "stale Primary back online"
SYMPTOM = r"(?i)stale primary p1"
CAUSE = r"(?i)stale (provider )?primary p1"
FIX = r"(?i)(demote|resynchroni[sz]e|Provider operators)"
GAPS = {
    ("status", "fix"): "the warning 'stale primary p1 at epoch 1' does not say who acts",
    ("journal", "fix"): "'Ignoring stale primary p1' does not say who acts (only journalctl -x's catalog does)",
}


def make(box):
    box.sim.revive_stale("p1")


def undo(box):
    box.sim.sync("p1")
