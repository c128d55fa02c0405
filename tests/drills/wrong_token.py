"""Drill: the Provider token in /etc/dsm-agent-sync/provider.token is wrong
(rotated on the Provider, not on the Agent): every node answers 401."""

NAME = "wrong Provider token"
SYMPTOM = r"HTTP 401"
CAUSE = r"(?i)(token (was )?(refused|rejected|wrong|not accepted)|wrong (provider )?token|unauthori[sz]ed)"
FIX = r"(?i)(provider\.token|\[provider\] token_file)"
GAPS = {}


def make(box):
    box.sh("echo not-the-provider-token > /etc/dsm-agent-sync/provider.token")
    box.reload()


def undo(box):
    box.sh("echo %s > /etc/dsm-agent-sync/provider.token" % box.sim.token)
    box.reload()
