/* The manager owns the sd-event loop and everything in it: signals, the
 * watchdog, STATUS=, the round scheduler (one round in flight, one
 * pending: that is all the coalescing there is), and the wiring of the
 * poller, the rule, the persistent state, the settings writer, the broker
 * connection, the notify listener and the update gate. */
#pragma once

#include <stdbool.h>
#include <stdint.h>
#include <systemd/sd-event.h>

#include <jansson.h>

#include "ack.h"
#include "broker.h"
#include "config.h"
#include "control.h"
#include "gate.h"
#include "metrics.h"
#include "notify.h"
#include "poller.h"
#include "ratelimit.h"
#include "rule.h"
#include "settings.h"
#include "state.h"
#include "sync.h"
#include "updater.h"

#define MANAGER_MAX_WARNINGS 16
#define MANAGER_WARNING_MAX  256

/* The last error logged for a failing poll target. */
typedef struct ReportedError {
        char url[PROVIDER_URL_MAX + 1];
        char error[POLL_ERROR_MAX];
} ReportedError;

typedef struct Manager {
        sd_event *event;
        Config *config;
        bool once; /* --once: one round, then exit */
        int exit_code;

        sd_event_source *sigterm, *sigint, *sighup;
        sd_event_source *poll_timer; /* next scheduled round */
        sd_event_source *watchdog_timer;
        sd_event_source *once_timer; /* --once: waits for on_change */
        uint64_t once_deadline_usec;
        uint64_t watchdog_usec;

        Poller *poller;
        SettingsWriter *settings;
        Broker *broker;
        Ack *ack; /* NULL: no agent id (or --once) */
        NotifyServer *notify;
        ControlServer *control; /* the local control socket; NULL when off */
        Updater *updater;

        Sync sync;   /* the decisions: committed pair, rule verdict, update gate */
        int lock_fd; /* the single-instance lock next to the state file */

        /* Round scheduling. */
        bool round_pending; /* a round is owed as soon as the current one ends */
        bool hint_pending;  /* an event/notify round is owed when the current one ends */
        bool hint_deferred; /* the poll timer is armed for a hint round */
        /* The token bucket that spaces hint rounds in a storm. */
        RateLimit hint_bucket;
        bool in_round_done;              /* requests made while a round is judged wait for it */
        unsigned discovery_rounds;       /* immediate rounds in a row for newly found nodes */
        sd_event_source *round_deadline; /* a round that never ends is cut off */
        uint64_t fast_delay_usec;        /* current fast-poll delay, 0 when steady */
        bool broker_lost;                /* the connection failed (not: is being set up) */
        char broker_error[256];          /* why it failed, "" while up or never failed */

        /* What the rounds showed, for logs and the status document. */
        RuleStale logged_stale[16];                 /* ring: stale primaries already logged */
        ReportedError reported[POLLER_MAX_TARGETS]; /* poll targets failing, as last logged */
        size_t n_reported;
        size_t logged_stale_next, logged_stale_used;
        char warnings[MANAGER_MAX_WARNINGS][MANAGER_WARNING_MAX];
        size_t n_warnings;
        uint64_t last_poll_usec; /* CLOCK_REALTIME, 0 never */

        struct {
                uint64_t polls, events, notifies;
        } counters;
        /* For GET /metrics (agent/manager-metrics.c), kept as rounds end. */
        struct {
                MetricsNodePolls polls[POLLER_MAX_TARGETS + 1]; /* + "unknown" */
                size_t n_polls;
                MetricsHistogram rounds;
                uint64_t round_started_usec;          /* CLOCK_MONOTONIC */
                uint64_t last_good_poll_usec;         /* CLOCK_REALTIME, 0 never */
                uint64_t warnings[METRICS_WARNING_N]; /* of the latest round */
        } metrics;

        char status_text[512]; /* last STATUS= sent */
} Manager;

int manager_new(Config *config, bool once, Manager **ret); /* takes config */
Manager *manager_free(Manager *m);
/* Sends READY=1 and runs the loop until a stop signal (or the end of a
 * --once round). Returns the exit code. */
int manager_run(Manager *m);

/* Asks for a poll round now; coalesces with one in flight. `why` is logged. */
void manager_request_round(Manager *m, const char *why);
/* The same for a hint (event, notify, broker loss): coalesced, rate-limited
 * by a token bucket (4 at once, then 8 per second) so storms stay
 * cheap, and delayed by up to [provider] hint_spread when that is set. */
void manager_request_hint_round(Manager *m, const char *why);

/* ---- shared by the manager's files ---- */

/* The notify listener's and the control socket's callbacks (agent/manager.c). */
extern const NotifyCallbacks manager_notify_callbacks;
/* Starts a poll round now (agent/manager.c). */
void manager_start_round(Manager *m);
/* Polls the nodes the cluster's list names; true when one is new. */
bool manager_refresh_targets(Manager *m);
/* SIGHUP: reads and applies the configuration, or rejects it whole and
 * keeps the old one (agent/manager-reload.c). */
int manager_reload(Manager *m);

/* Logs a Provider node that starts or stops failing, not every failed poll
 * (agent/health.c). */
void manager_log_targets(Manager *m);
/* Forgets what was logged about targets that are no longer polled. */
void manager_forget_reports(Manager *m);
/* Logs stale primaries (once per node and epoch) and a new conflict. */
void manager_log_rule(Manager *m, const RuleResult *prev, const RuleResult *res);
/* STATUS= for systemd, sent when it changes (agent/health.c). */
void manager_send_status(Manager *m);
/* The warnings of the status document, from the latest round (agent/health.c). */
void manager_update_warnings(Manager *m);

/* Counts a complete round's answers and duration (agent/manager-metrics.c). */
void manager_count_round(Manager *m, const PollRound *round);
/* GET /metrics: the text of metrics.h, malloc'd (agent/manager-metrics.c). */
char *manager_metrics_text(Manager *m);

/* update.state of contract 8: the gate's verdict, refined by what the
 * updater is doing right now; *ret_reason (may be NULL) its reason, NULL
 * when none (agent/status.c). */
const char *manager_update_state(Manager *m, const char **ret_reason);
/* The status document of contract section 7 (agent/status.c). */
json_t *manager_status_json(Manager *m);
