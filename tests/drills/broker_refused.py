"""Drill: the Primary's RabbitMQ refuses the Agent's login ([broker]
username / password_file wrong): no events, the daemon polls instead."""

NAME = "broker credentials refused"
SYMPTOM = r"(?m)^Broker: .*, down$"
CAUSE = r"(?i)(ACCESS_REFUSED|login (was )?refused|credentials (were )?refused)"
FIX = r"(?i)(\[broker\] (username|password_file)|broker\.password)"
GAPS = {}


def make(box):
    box.write_config(broker="username = dsm-drill-nobody\n")
    box.reload()


def undo(box):
    box.write_config()
    box.reload()
