/* The Prometheus text rendering: see metrics.h and docs/metrics.md. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "macro.h"
#include "metrics.h"

#define P "dsm_agent_sync_"

const double metrics_round_buckets[METRICS_ROUND_BUCKETS] = {0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10};

static const char *const poll_names[METRICS_POLL_N] = {"ok", "not_modified", "error"};
static const char *const reject_names[METRICS_REJECT_N] = {
        "unauthorized", "rate_limited", "bad_request", "too_large", "not_found", "method_not_allowed",
};
static const char *const ack_names[METRICS_ACK_N] = {
        "confirmed", "nacked", "refused", "superseded", "gave_up",
};
static const char *const warning_names[METRICS_WARNING_N] = {
        "stale_primary",        "conflict",          "cluster_size", "flapping",
        "settings_not_written", "state_not_written", "no_primary",
};

void metrics_observe(MetricsHistogram *h, double seconds) {
        for (size_t i = 0; i < METRICS_ROUND_BUCKETS; i++)
                if (seconds <= metrics_round_buckets[i]) {
                        h->bucket[i]++;
                        break;
                }
        h->count++;
        h->sum += seconds;
}

MetricsNodePolls *metrics_node_polls(MetricsNodePolls *polls, size_t *n, size_t max, const char *id) {
        if (max == 0)
                return NULL;
        if (!id || !id[0])
                id = "unknown";
        for (size_t i = 0; i < *n; i++)
                if (strcmp(polls[i].id, id) == 0)
                        return &polls[i];
        /* The last free row is kept for "unknown". */
        if (*n + 1 >= max && strcmp(id, "unknown") != 0)
                return metrics_node_polls(polls, n, max, "unknown");
        polls[*n] = (MetricsNodePolls){};
        (void) strscpy(polls[*n].id, sizeof(polls[*n].id), id);
        return &polls[(*n)++];
}

int metrics_reject_of_status(unsigned status) {
        switch (status) {
        case 400:
                return METRICS_REJECT_BAD_REQUEST;
        case 401:
                return METRICS_REJECT_UNAUTHORIZED;
        case 404:
                return METRICS_REJECT_NOT_FOUND;
        case 405:
                return METRICS_REJECT_METHOD_NOT_ALLOWED;
        case 413:
                return METRICS_REJECT_TOO_LARGE;
        case 429:
                return METRICS_REJECT_RATE_LIMITED;
        default:
                return -1;
        }
}

/* A label value: backslash, double quote and line feed escaped (0.0.4). */
static void label_value(FILE *f, const char *s) {
        for (; *s; s++)
                if (*s == '\\' || *s == '"')
                        fprintf(f, "\\%c", *s);
                else if (*s == '\n')
                        fputs("\\n", f);
                else
                        fputc(*s, f);
}

static void head(FILE *f, const char *name, const char *type, const char *help) {
        fprintf(f, "# HELP " P "%s %s\n# TYPE " P "%s %s\n", name, help, name, type);
}

static void scalar(FILE *f, const char *name, const char *type, const char *help, uint64_t v) {
        head(f, name, type, help);
        fprintf(f, P "%s %llu\n", name, (unsigned long long) v);
}

/* One series per name of a bounded set, label `label`. */
static void by_label(FILE *f, const char *name, const char *type, const char *help, const char *label,
                     const char *const *names, const uint64_t *v, size_t n) {
        head(f, name, type, help);
        for (size_t i = 0; i < n; i++)
                fprintf(f, P "%s{%s=\"%s\"} %llu\n", name, label, names[i], (unsigned long long) v[i]);
}

static void polls(FILE *f, const MetricsSnapshot *s) {
        head(f, "polls_total", "counter", "Poll answers by Provider node and outcome.");
        for (size_t i = 0; i < s->n_polls; i++)
                for (size_t o = 0; o < METRICS_POLL_N; o++) {
                        fputs(P "polls_total{node=\"", f);
                        label_value(f, s->polls[i].id);
                        fprintf(f, "\",outcome=\"%s\"} %llu\n", poll_names[o],
                                (unsigned long long) s->polls[i].n[o]);
                }
}

static void rounds(FILE *f, const MetricsHistogram *h) {
        uint64_t cum = 0;

        head(f, "round_duration_seconds", "histogram", "Duration of complete poll rounds.");
        for (size_t i = 0; i < METRICS_ROUND_BUCKETS; i++) {
                cum += h->bucket[i];
                fprintf(f, P "round_duration_seconds_bucket{le=\"%g\"} %llu\n", metrics_round_buckets[i],
                        (unsigned long long) cum);
        }
        fprintf(f, P "round_duration_seconds_bucket{le=\"+Inf\"} %llu\n", (unsigned long long) h->count);
        fprintf(f, P "round_duration_seconds_sum %.6f\n", h->sum);
        fprintf(f, P "round_duration_seconds_count %llu\n", (unsigned long long) h->count);
}

static void pair(FILE *f, const char *name, const char *help, uint64_t ok, uint64_t failed) {
        static const char *const names[] = {"ok", "failed"};

        by_label(f, name, "counter", help, "outcome", names, (const uint64_t[]){ok, failed}, 2);
}

static void update_state(FILE *f, const MetricsSnapshot *s) {
        head(f, "update_state", "gauge", "The update gate's state (contract 8): 1 for the current one.");
        for (size_t i = 0; i < s->n_update_states; i++)
                fprintf(f, P "update_state{state=\"%s\"} %d\n", s->update_states[i], i == s->update_state);
}

static void seconds(FILE *f, const char *name, const char *help, uint64_t usec) {
        head(f, name, "gauge", help);
        fprintf(f, P "%s %llu.%06llu\n", name, (unsigned long long) (usec / 1000000),
                (unsigned long long) (usec % 1000000));
}

static void render(FILE *f, const MetricsSnapshot *s) {
        scalar(f, "committed_epoch", "gauge", "The committed epoch; 0 before the first commit.", s->epoch);
        head(f, "primary_info", "gauge", "The committed Primary (no series before the first commit).");
        if (s->primary_id && s->primary_id[0]) {
                fputs(P "primary_info{primary_id=\"", f);
                label_value(f, s->primary_id);
                fputs("\"} 1\n", f);
        }
        polls(f, s);
        rounds(f, &s->rounds);
        scalar(f, "commits_total", "counter", "Commits of a new (epoch, Primary) pair.", s->commits);
        scalar(f, "events_total", "counter", "Broker events received.", s->events);
        scalar(f, "notifies_total", "counter", "Valid notifies accepted.", s->notifies);
        by_label(f, "rejected_requests_total", "counter", "HTTP requests refused, by reason.", "reason",
                 reject_names, s->rejected, METRICS_REJECT_N);
        scalar(f, "broker_connected", "gauge", "1 while the broker connection is up.", s->broker_connected);
        scalar(f, "broker_reconnects_total", "counter", "Broker connections made after the first.",
               s->broker_reconnects);
        pair(f, "on_change_runs_total", "on_change runs by outcome.", s->on_change_ok, s->on_change_failed);
        by_label(f, "acks_total", "counter", "Convergence acknowledgements (fleet.agent.synced) by outcome.",
                 "outcome", ack_names, s->acks, METRICS_ACK_N);
        scalar(f, "ack_publishes_total", "counter", "Publishes of acknowledgements (resends included).",
               s->ack_publishes);
        scalar(f, "acknowledged_epoch", "gauge", "The epoch of the last confirmed acknowledgement; 0 none.",
               s->acknowledged_epoch);
        update_state(f, s);
        pair(f, "update_applies_total", "Update commands run, by outcome.", s->applies_ok,
             s->applies_failed);
        by_label(f, "warnings", "gauge", "Current warnings of the status document, by kind.", "kind",
                 warning_names, s->warnings, METRICS_WARNING_N);
        seconds(f, "last_commit_timestamp_seconds", "Unix time of the last commit; 0 never.",
                s->last_commit_usec);
        seconds(f, "last_good_poll_timestamp_seconds",
                "Unix time of the last round with a good answer; 0 never.", s->last_good_poll_usec);
}

char *metrics_render(const MetricsSnapshot *s) {
        char *buf = NULL;
        size_t len = 0;
        FILE *f = open_memstream(&buf, &len);

        if (!f)
                return NULL;
        render(f, s);
        if (fclose(f) != 0 || !buf) {
                free(buf);
                return NULL;
        }
        return buf;
}
