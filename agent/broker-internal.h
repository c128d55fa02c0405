/* What the files of the broker connection share (agent/broker.c, the
 * connection on the loop; agent/broker-publish.c, the publishing channel):
 * the Broker itself and the few helpers both call. Nothing else includes
 * this. */
#pragma once

#include <stdbool.h>
#include <stdint.h>

#include <amqp.h>

#include "broker-connect.h"
#include "broker.h"

/* A delivery in progress: a basic.deliver method, a header, body frames. */
typedef struct Delivery {
        bool active;
        bool have_header;
        uint64_t tag;
        char routing_key[256];
        uint64_t size;
        uint64_t got;
        char *body; /* NULL while discarding an oversized body */
} Delivery;

struct Broker {
        sd_event *event;
        BrokerCallbacks cb;
        void *userdata;
        BrokerParams params; /* current settings and target */
        bool have_target;
        BrokerConnState state;

        BrokerAttempt *attempt;
        sd_event_source *attempt_source;
        sd_event_source *retry_source; /* the next attempt, after a backoff or a spread */
        unsigned failures;             /* failed attempts and losses since the last success */
        uint64_t connects;             /* connections made, for GET /metrics */
        bool loss_logged;              /* a warning went out for the current outage */

        amqp_connection_state_t conn;
        uint64_t conn_gen; /* bumped whenever conn goes away */
        sd_event_source *io_source;
        sd_event_source *drain_source;
        sd_event_source *hb_send_source;
        sd_event_source *hb_check_source;
        usec_t heartbeat; /* negotiated, 0: off */
        usec_t last_rx;
        usec_t last_tx; /* our last heartbeat */
        Delivery delivery;

        bool publish_open;    /* the publishing channel is usable on this connection */
        uint64_t publish_seq; /* the delivery tag of the last publish (per connection) */
};

/* True when a small send cannot block: the socket takes it now. */
bool broker_can_send(Broker *b);
/* The established connection failed: closes it, logs, backs off and
 * reports BROKER_DOWN. */
void broker_lost(Broker *b, const char *reason, bool graceful);
void broker_lost_status(Broker *b, const char *what, int status);
/* A method frame on the publishing channel (confirms, a refusal). */
int broker_on_publish_method(Broker *b, const amqp_frame_t *f);
