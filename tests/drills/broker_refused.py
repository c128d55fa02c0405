"""Drill: the Primary's RabbitMQ refuses the Agent's login ([broker]
username / password_file wrong): no events, the daemon polls instead."""

NAME = "broker credentials refused"
SYMPTOM = r"(?m)^Broker: .*, down$"
CAUSE = r"(?i)(ACCESS_REFUSED|login (was )?refused|credentials (were )?refused)"
FIX = r"(?i)(\[broker\] (username|password_file)|broker\.password)"
GAPS = {
    ("status", "cause"): "the Broker line says only 'down'",
    ("status", "fix"): "nothing names [broker] username / password_file",
    ("journal", "fix"): "'login: 403 ACCESS_REFUSED' does not name [broker] username / password_file",
}


def make(box):
    box.write_config(broker="username = dsm-drill-nobody\n")
    box.reload()


def undo(box):
    box.write_config()
    box.reload()
