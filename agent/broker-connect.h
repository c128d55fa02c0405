/* The blocking half of the broker connection: one connection attempt (TCP
 * connect, TLS handshake, AMQP login, channel open, exchange and queue
 * declare, bind, qos, consume, the publishing channel in confirm mode) on a short-lived worker thread.
 *
 * librabbitmq's connection setup is a chain of blocking RPCs, and nothing
 * may stall the loop that runs synchronization, so each attempt gets a
 * detached thread that owns its own amqp connection and shares only the
 * BrokerAttempt with the loop. When it is done it writes the attempt's
 * eventfd; the loop (agent/broker.c) then takes the ready connection, or
 * the reason it failed, and owns it from there on. */
#pragma once

#include <stdbool.h>
#include <stddef.h>

#include <amqp.h>

#include "provider.h"
#include "util.h"

#define BROKER_CHANNEL 1
/* Publishing (the convergence acknowledgement) has its own channel in
 * confirm mode: a broker that refuses a publish closes that channel only,
 * and consuming goes on. */
#define BROKER_PUBLISH_CHANNEL 2
#define BROKER_REASON_MAX      256

/* What one attempt needs. The attempt keeps its own copy, so that the
 * worker shares nothing with the loop but the BrokerAttempt itself. */
typedef struct BrokerParams {
        BrokerInfo target;
        char *username;
        char *password;
        char *exchange;
        char *ca_file; /* NULL: system store */
        usec_t heartbeat;
} BrokerParams;

/* Frees the strings (wiping the password) and zeroes *p. */
void broker_params_done(BrokerParams *p);
/* A deep copy into *dst; -ENOMEM leaves *dst empty. */
int broker_params_copy(BrokerParams *dst, const BrokerParams *src);

typedef struct BrokerAttempt BrokerAttempt;

/* A new attempt for p (copied), not yet running: the caller watches
 * broker_attempt_fd() first, then calls broker_attempt_spawn(). */
int broker_attempt_new(const BrokerParams *p, BrokerAttempt **ret);
/* Starts the worker thread (all signals blocked in it). */
int broker_attempt_spawn(BrokerAttempt *a);
/* An eventfd that becomes readable once, when the result is ready. */
int broker_attempt_fd(const BrokerAttempt *a);
/* When the attempt was created, CLOCK_MONOTONIC. */
usec_t broker_attempt_started(const BrokerAttempt *a);
/* After the fd fired: the ready connection (the caller owns it from now
 * on), or NULL with the reason of the failure in reason ("" if none). */
amqp_connection_state_t broker_attempt_take(BrokerAttempt *a, char *reason, size_t size);
/* Drops the caller's reference; returns NULL. */
BrokerAttempt *broker_attempt_unref(BrokerAttempt *a);
/* Gives the attempt up: a blocked RPC returns at once (its socket is shut
 * down), a result not yet taken is destroyed, and the worker cleans up
 * after itself. Drops the caller's reference; returns NULL. */
BrokerAttempt *broker_attempt_abandon(BrokerAttempt *a);

/* Waits up to timeout for every worker of the process to finish (so that
 * a stop does not leave one behind), then returns anyway. */
void broker_attempts_wait(usec_t timeout);
