/* What the daemon says about its health: log lines when something starts
 * or stops (a Provider node failing, a stale primary, a conflict: once per
 * change, not on every poll), the STATUS= line that `systemctl status`
 * shows, and the warnings of the status document (contract section 7:
 * stale primaries, conflicts, cluster size, flapping, files not written).
 * Computed from the manager's state after each round; the status
 * document (status.c) only reads them. */
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <systemd/sd-daemon.h>

#include "log.h"
#include "macro.h"
#include "manager.h"

#define FLAP_WINDOW_USEC (10 * 60 * USEC_PER_SEC)
#define FLAP_LIMIT       3

void manager_send_status(Manager *m) {
        char text[1024];
        const Committed *c = &m->sync.state.committed;
        int werr = m->settings ? settings_writer_error(m->settings) : 0;
        const char *broker = m->broker ? broker_conn_state_to_string(broker_state(m->broker)) : "off";

        if (c->epoch == 0)
                snprintf(text, sizeof(text), "primary unknown, polling %zu nodes",
                         m->poller ? poller_n_targets(m->poller) : 0);
        else if (werr < 0)
                snprintf(text, sizeof(text), "primary %s epoch %" PRIu64 ", settings write failed: %s",
                         c->primary.id, c->epoch, strerror(-werr));
        else
                snprintf(text, sizeof(text), "primary %s epoch %" PRIu64 ", broker %s, update %s%s%s",
                         c->primary.id, c->epoch, broker, gate_state_to_string(m->sync.gate.state),
                         m->sync.gate.reason[0] ? ": " : "", m->sync.gate.reason);
        if (strcmp(text, m->status_text) == 0)
                return;
        strscpy(m->status_text, sizeof(m->status_text), text);
        (void) sd_notifyf(false, "STATUS=%s", text);
}

static void add_warning(Manager *m, MetricsWarning kind, const char *fmt, ...) _printf_(3, 4);
static void add_warning(Manager *m, MetricsWarning kind, const char *fmt, ...) {
        va_list ap;

        m->metrics.warnings[kind]++; /* counted past the document's cap too */
        if (m->n_warnings >= MANAGER_MAX_WARNINGS)
                return;
        va_start(ap, fmt);
        vsnprintf(m->warnings[m->n_warnings++], MANAGER_WARNING_MAX, fmt, ap);
        va_end(ap);
}

static unsigned recent_changes(Manager *m, uint64_t now) {
        unsigned n = 0;
        for (size_t i = 0; i < m->sync.n_change_times; i++)
                if (now - m->sync.change_times[i] <= FLAP_WINDOW_USEC)
                        n++;
        return n;
}

void manager_update_warnings(Manager *m) {
        const RuleResult *r = &m->sync.last_rule;
        unsigned flaps = recent_changes(m, now_usec(CLOCK_MONOTONIC));
        int werr = m->settings ? settings_writer_error(m->settings) : 0;

        m->n_warnings = 0;
        memset(m->metrics.warnings, 0, sizeof(m->metrics.warnings));
        for (size_t i = 0; i < r->n_stale; i++)
                add_warning(m, METRICS_WARNING_STALE_PRIMARY, "stale primary %s at epoch %" PRIu64,
                            r->stale[i].node_id, r->stale[i].epoch);
        if (r->conflict)
                add_warning(m, METRICS_WARNING_CONFLICT,
                            "primary conflict: %s and %s both claim epoch %" PRIu64, r->conflict_a,
                            r->conflict_b, r->conflict_epoch);
        if (m->sync.state.committed.epoch > 0 && (m->sync.state.n_nodes < 3 || m->sync.state.n_nodes > 4))
                add_warning(m, METRICS_WARNING_CLUSTER_SIZE,
                            "cluster size %zu: a Provider HA cluster has 3 or 4 nodes",
                            m->sync.state.n_nodes);
        if (flaps > FLAP_LIMIT)
                add_warning(m, METRICS_WARNING_FLAPPING, "flapping: %u primary changes within 10 minutes",
                            flaps);
        if (werr < 0)
                add_warning(m, METRICS_WARNING_SETTINGS_NOT_WRITTEN, "settings file %s not written: %s",
                            m->config->settings_file, strerror(-werr));
        if (m->sync.state_save_failed)
                add_warning(m, METRICS_WARNING_STATE_NOT_WRITTEN,
                            "state file %s not written: commits are held", m->config->state_file);
        if (m->sync.state.committed.epoch == 0)
                add_warning(m, METRICS_WARNING_NO_PRIMARY, "no primary committed yet");
}

/* ---- the errors of poll targets, as logged ---- */

/* The error last logged for url ("" none): kept only for failing targets,
 * and only while they are targets. */
static ReportedError *reported_find(Manager *m, const char *url) {
        for (size_t i = 0; i < m->n_reported; i++)
                if (strcmp(m->reported[i].url, url) == 0)
                        return &m->reported[i];
        return NULL;
}

static void reported_set(Manager *m, const char *url, const char *error) {
        ReportedError *e = reported_find(m, url);

        if (!e && error[0] && m->n_reported < ELEMENTSOF(m->reported)) {
                e = &m->reported[m->n_reported++];
                strscpy(e->url, sizeof(e->url), url);
        }
        if (!e)
                return;
        if (error[0])
                strscpy(e->error, sizeof(e->error), error);
        else
                *e = m->reported[--m->n_reported];
}

/* A target that is dropped and comes back starts with nothing logged. */
void manager_forget_reports(Manager *m) {
        PollRound round;

        poller_get_round(m->poller, &round);
        for (size_t i = m->n_reported; i-- > 0;) {
                bool target = false;
                for (size_t j = 0; !target && j < round.n_answers; j++)
                        target = strcmp(round.answers[j].url, m->reported[i].url) == 0;
                if (!target)
                        m->reported[i] = m->reported[--m->n_reported];
        }
}

/* ---- after a round: logs ---- */

/* Stale primaries are logged once per node and epoch: a ring of the last
 * few is enough, since a stale node keeps its epoch while it is stale. */
static bool stale_logged(Manager *m, const RuleStale *s) {
        for (size_t i = 0; i < m->logged_stale_used; i++)
                if (m->logged_stale[i].epoch == s->epoch &&
                    strcmp(m->logged_stale[i].node_id, s->node_id) == 0)
                        return true;
        m->logged_stale[m->logged_stale_next] = *s;
        m->logged_stale_next = (m->logged_stale_next + 1) % ELEMENTSOF(m->logged_stale);
        if (m->logged_stale_used < ELEMENTSOF(m->logged_stale))
                m->logged_stale_used++;
        return false;
}

void manager_log_rule(Manager *m, const RuleResult *prev, const RuleResult *res) {
        for (size_t i = 0; i < res->n_stale; i++) {
                const RuleStale *s = &res->stale[i];
                if (stale_logged(m, s))
                        continue;
                log_struct(LOG_WARNING, 0, MID_STALE_PRIMARY,
                           &(LogFields){.epoch = s->epoch, .node_id = s->node_id, .reason = "stale_primary"},
                           "Ignoring stale primary %s: it claims epoch %" PRIu64 ", committed is %" PRIu64
                           "; Provider operators should demote or resynchronize it",
                           s->node_id, s->epoch,
                           res->verdict == RULE_COMMIT ? res->next.epoch : m->sync.state.committed.epoch);
        }
        if (res->conflict && (!prev->conflict || prev->conflict_epoch != res->conflict_epoch ||
                              strcmp(prev->conflict_a, res->conflict_a) != 0 ||
                              strcmp(prev->conflict_b, res->conflict_b) != 0))
                log_struct(LOG_ERR, 0, MID_PRIMARY_CONFLICT,
                           &(LogFields){.epoch = res->conflict_epoch, .reason = "primary_conflict"},
                           "Primary conflict: %s and %s both claim primary at epoch %" PRIu64
                           "; nothing committed",
                           res->conflict_a, res->conflict_b, res->conflict_epoch);
}

/* Logs a node that starts or stops failing, not every failed poll. */
void manager_log_targets(Manager *m) {
        PollRound round;

        poller_get_round(m->poller, &round);
        for (size_t i = 0; i < round.n_answers; i++) {
                const PollAnswer *a = &round.answers[i];
                const ReportedError *e = reported_find(m, a->url);
                if (strcmp(a->error, e ? e->error : "") == 0)
                        continue;
                if (a->error[0])
                        log_struct(LOG_WARNING, 0, NULL,
                                   &(LogFields){.reason = a->error,
                                                .node_id = a->have_state ? a->state.node.id : NULL},
                                   "Provider %s%s failed: %s", a->url,
                                   a->via_load_balancer ? " (load balancer)" : "", a->error);
                else
                        log_struct(LOG_NOTICE, 0, NULL,
                                   &(LogFields){.node_id = a->have_state ? a->state.node.id : NULL},
                                   "Provider %s answers again", a->url);
                reported_set(m, a->url, a->error);
        }
}
