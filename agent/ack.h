/* The convergence acknowledgement (docs/acks.md): after a commit's settings
 * file was written and on_change succeeded, one fleet.agent.synced message
 * on the committed Primary's broker, published with a confirm, so that the
 * Provider can see which Agents have moved and notify those that have not.
 *
 * The Ack owns the one message in hand (a newer commit replaces it), sends
 * it when the connection to that commit's broker is up, sends it again
 * after a reconnect or a nack (bounded), and counts outcomes for
 * GET /metrics. A refusal (the Agent's broker user may not publish) costs
 * a log line and a counter, nothing else. It never waits: the broker module
 * publishes without blocking and reports confirms on the loop. */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <systemd/sd-event.h>

#include "broker.h"
#include "state.h"

#define ACK_ROUTING_KEY "fleet.agent.synced"
/* Publishes of one acknowledgement before it is given up (nacked, or the
 * connection lost before the confirm). */
#define ACK_SENDS_MAX 5

/* The same order as MetricsAck (agent/metrics.h). */
typedef enum AckOutcome {
        ACK_CONFIRMED,  /* the broker confirmed it */
        ACK_NACKED,     /* the broker nacked one publish (it is sent again) */
        ACK_REFUSED,    /* the broker refused the publish (403, 404): dropped */
        ACK_SUPERSEDED, /* a newer commit came before a confirm: replaced */
        ACK_GAVE_UP,    /* ACK_SENDS_MAX publishes without a confirm */
        _ACK_OUTCOME_MAX,
} AckOutcome;

typedef struct Ack Ack;

/* agent_id: [daemon] agent_id, or the machine id (ack_default_agent_id).
 * record_path: where the last confirmed epoch is kept across restarts
 * (NULL: in memory only); a commit at or below it is not acknowledged. */
int ack_new(sd_event *e, Broker *broker, const char *agent_id, const char *record_path, Ack **ret);
Ack *ack_free(Ack *a);

/* The settings file describes c and on_change succeeded (or none is set);
 * written_at: when the file was renamed into place, CLOCK_REALTIME. */
void ack_converged(Ack *a, const Committed *c, uint64_t written_at);

/* The broker's callbacks, forwarded by the manager. */
void ack_broker_state(Ack *a, BrokerConnState state);
void ack_confirmed(Ack *a, uint64_t seq, bool multiple, bool ok);
void ack_refused(Ack *a, const char *reason);

/* Counters for GET /metrics. */
uint64_t ack_outcomes(const Ack *a, AckOutcome o);
uint64_t ack_publishes(const Ack *a);
/* The epoch of the last confirmed acknowledgement, 0 if none. */
uint64_t ack_confirmed_epoch(const Ack *a);
const char *ack_outcome_to_string(AckOutcome o);

/* Pure: the message body (JSON, no newline) into *ret (free()). */
int ack_render(const char *agent_id, const Committed *c, uint64_t written_at, char **ret);
/* The default agent id: the machine id (32 hex digits), else the host
 * name if it is a valid agent id. -ENXIO when neither is. */
int ack_default_agent_id(char *buf, size_t size);
