/* GET /metrics (docs/metrics.md): the Prometheus text exposition format
 * 0.0.4, rendered from a plain-data snapshot. Pure: no I/O, no clock, so a
 * unit test checks the exact text. The daemon fills the snapshot from
 * counters it keeps anyway (agent/manager-metrics.c); a scrape costs the
 * formatting only. */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "provider.h"

#define METRICS_CONTENT_TYPE "text/plain; version=0.0.4; charset=utf-8"

/* Label values are bounded: one series per target node seen, plus
 * "unknown" for answers from a node never identified. */
#define METRICS_NODES_MAX  64
#define METRICS_STATES_MAX 8

typedef enum MetricsPoll {
        METRICS_POLL_OK,
        METRICS_POLL_NOT_MODIFIED,
        METRICS_POLL_ERROR,
        METRICS_POLL_N,
} MetricsPoll;

typedef enum MetricsReject {
        METRICS_REJECT_UNAUTHORIZED,
        METRICS_REJECT_RATE_LIMITED,
        METRICS_REJECT_BAD_REQUEST,
        METRICS_REJECT_TOO_LARGE,
        METRICS_REJECT_NOT_FOUND,
        METRICS_REJECT_METHOD_NOT_ALLOWED,
        METRICS_REJECT_N,
} MetricsReject;

typedef enum MetricsWarning {
        METRICS_WARNING_STALE_PRIMARY,
        METRICS_WARNING_CONFLICT,
        METRICS_WARNING_CLUSTER_SIZE,
        METRICS_WARNING_FLAPPING,
        METRICS_WARNING_SETTINGS_NOT_WRITTEN,
        METRICS_WARNING_STATE_NOT_WRITTEN,
        METRICS_WARNING_NO_PRIMARY,
        METRICS_WARNING_N,
} MetricsWarning;

/* Convergence acknowledgements by outcome (agent/ack.h, same order). */
typedef enum MetricsAck {
        METRICS_ACK_CONFIRMED,
        METRICS_ACK_NACKED,
        METRICS_ACK_REFUSED,
        METRICS_ACK_SUPERSEDED,
        METRICS_ACK_GAVE_UP,
        METRICS_ACK_N,
} MetricsAck;

/* The round duration histogram's upper bounds, seconds (+Inf implied). */
#define METRICS_ROUND_BUCKETS 8
extern const double metrics_round_buckets[METRICS_ROUND_BUCKETS];

typedef struct MetricsHistogram {
        uint64_t bucket[METRICS_ROUND_BUCKETS]; /* not cumulative: observations in (le[i-1], le[i]] */
        uint64_t count;                         /* all observations, +Inf included */
        double sum;                             /* seconds */
} MetricsHistogram;

typedef struct MetricsNodePolls {
        char id[PROVIDER_ID_MAX + 1]; /* the node's id, or "unknown" */
        uint64_t n[METRICS_POLL_N];
} MetricsNodePolls;

typedef struct MetricsSnapshot {
        uint64_t epoch;         /* committed; 0 none */
        const char *primary_id; /* committed; NULL or "": no info series */
        const MetricsNodePolls *polls;
        size_t n_polls;
        MetricsHistogram rounds;
        uint64_t commits, events, notifies;
        uint64_t rejected[METRICS_REJECT_N];
        bool broker_connected;
        uint64_t broker_reconnects;
        uint64_t on_change_ok, on_change_failed;
        uint64_t acks[METRICS_ACK_N];
        uint64_t ack_publishes;
        uint64_t acknowledged_epoch;                   /* of the last confirmed ack; 0 none */
        const char *update_states[METRICS_STATES_MAX]; /* every state of contract 8 */
        size_t n_update_states;
        size_t update_state; /* index of the current one */
        uint64_t applies_ok, applies_failed;
        uint64_t warnings[METRICS_WARNING_N];           /* current warnings by kind */
        uint64_t last_commit_usec, last_good_poll_usec; /* CLOCK_REALTIME, 0 never */
} MetricsSnapshot;

void metrics_observe(MetricsHistogram *h, double seconds);
/* Finds or adds the row of id in polls (n rows of max); a new id when the
 * table is full lands on "unknown", which always finds room. NULL only
 * when max is 0. */
MetricsNodePolls *metrics_node_polls(MetricsNodePolls *polls, size_t *n, size_t max, const char *id);
/* The reason a refusal with this HTTP status counts under; -1: none. */
int metrics_reject_of_status(unsigned status);
/* The whole answer as a malloc'd string; NULL on ENOMEM. */
char *metrics_render(const MetricsSnapshot *s);
