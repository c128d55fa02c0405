/* The AMQP connection to the committed Primary's broker (librabbitmq),
 * driven by the sd-event loop: its socket is an I/O source, frames are
 * read without blocking, heartbeats are sent and checked on timers. It
 * declares a server-named exclusive auto-delete queue bound to the events
 * exchange with provider.# and agent.#, consumes with acks, and reports
 * every well-formed event (provider_event_check(), as a hint) and every
 * loss. It also publishes, on a second channel in confirm mode, the
 * messages its user hands it (the convergence acknowledgement, ack.h). On loss or a failed attempt it
 * closes, backs off with full jitter and reconnects by itself.
 *
 * One thread besides the loop's, briefly: librabbitmq's connection setup
 * blocks, and a blocking call must never stall synchronization, so each
 * connection attempt runs on a short-lived worker thread (broker-connect.h)
 * that hands the ready connection back to the loop. Callers see none of
 * it: every callback below runs on the loop. */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <systemd/sd-event.h>

#include "config.h"
#include "provider.h"

typedef enum BrokerConnState {
        BROKER_DOWN,
        BROKER_CONNECTING,
        BROKER_CONNECTED,
} BrokerConnState;

typedef struct Broker Broker;

/* Callbacks run on the loop. They may call broker_set_target() and
 * broker_reconfigure(), never broker_free(). */
typedef struct BrokerCallbacks {
        /* An event arrived (already acknowledged). body is not NUL-terminated. */
        void (*event)(Broker *b, const char *routing_key, const void *body, size_t len, void *userdata);
        /* The connection state changed; reason is set for BROKER_DOWN. */
        void (*state_changed)(Broker *b, BrokerConnState state, const char *reason, void *userdata);
        /* A publisher confirm for the publish numbered seq on the current
         * connection (and, with multiple, every earlier one): ack true,
         * or nack (the broker could not take it). */
        void (*confirmed)(Broker *b, uint64_t seq, bool multiple, bool ack, void *userdata);
        /* The broker refused a publish ("403 ACCESS_REFUSED - ..."): the
         * publishing channel is closed until the next connection; consuming
         * goes on. */
        void (*publish_refused)(Broker *b, const char *reason, void *userdata);
} BrokerCallbacks;

int broker_new(sd_event *e, const Config *cfg, const BrokerCallbacks *cb, void *userdata, Broker **ret);
/* Closes the connection (channel and connection close, bounded). */
Broker *broker_free(Broker *b);
/* New credentials/exchange/heartbeat: reconnects when they changed. */
int broker_reconfigure(Broker *b, const Config *cfg);

/* Connects to target (the committed Primary's broker), or moves there
 * from the current one; NULL disconnects. Returns at once; progress is
 * reported through state_changed. A move (a target other than the current
 * one) reports connecting at once but starts its first attempt after a
 * random delay of up to 1 s, so that a fleet moving together does not
 * arrive at the new broker in the same instant; a first target and the
 * current one again (after a loss) are tried at once. */
int broker_set_target(Broker *b, const BrokerInfo *target);
/* Publishes body on the exchange with routing_key, on the publishing
 * channel (confirm mode), if the connection to target is up: *ret_seq is
 * the number the confirm will carry. -ENOTCONN: not connected; -ESTALE:
 * connected to another broker; -EPERM: a publish was refused on this
 * connection; -EIO: the connection was lost (reported as usual). Never
 * waits: a small message into a socket that poll() says can take it. */
int broker_publish(Broker *b, const BrokerInfo *target, const char *routing_key, const void *body,
                   size_t len, uint64_t *ret_seq);
BrokerConnState broker_state(const Broker *b);
const char *broker_conn_state_to_string(BrokerConnState s);
/* Connections made after the first (losses healed, moves to a new
 * Primary's broker), for GET /metrics. */
uint64_t broker_reconnects(const Broker *b);
