"""Support drills (issue 13): four broken Agents, each made by one module
here and run in the real-systemd test's container
(tests/integration/test_systemd.py, test_drill). Each module has

    NAME       the drill (and its runbook entry in docs/operations.md)
    make(box)  breaks the running Agent; undo(box) repairs it
    SYMPTOM    regex that the first screen of `dsm-agent-syncctl status`
               or `journalctl -u dsm-agent-syncd -n 20` must match: the
               Agent is broken the way the drill means (always asserted)
    CAUSE      regex: the cause, in words
    FIX        regex: a pointer at the fix
    GAPS       {(where, what): why}: the checks today's daemon and control
               tool do not pass yet (where: "status" or "journal"; what:
               "cause" or "fix"). The drill then ends as an expected failure
               naming them, and passes once they are closed; a check that
               fails and is not listed fails the drill.

Both screens are asked to match CAUSE and FIX.
"""

from . import broker_refused, stale_primary, version_skew, wrong_token

DRILLS = [wrong_token, version_skew, broker_refused, stale_primary]
