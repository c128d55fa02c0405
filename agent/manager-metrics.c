/* GET /metrics from the manager's live state (docs/metrics.md): the
 * counters are kept where the work happens (a round's end here, commits in
 * sync.c, refusals in notify.c, runs in settings.c and updater.c, the
 * connections in broker.c); a scrape copies them into a MetricsSnapshot
 * and formats it (metrics.c), nothing more. */
#include <string.h>

#include "manager.h"

static const MetricsPoll poll_outcome[] = {
        [POLL_OK] = METRICS_POLL_OK,
        [POLL_NOT_MODIFIED] = METRICS_POLL_NOT_MODIFIED,
        [POLL_ERROR] = METRICS_POLL_ERROR,
};

void manager_count_round(Manager *m, const PollRound *round) {
        uint64_t now = now_usec(CLOCK_MONOTONIC);
        bool good = false;

        for (size_t i = 0; i < round->n_answers; i++) {
                const PollAnswer *a = &round->answers[i];
                MetricsNodePolls *row;

                if (a->outcome == POLL_PENDING) /* cut off by the round's deadline */
                        continue;
                /* An error is put down to the node the target last was. */
                row = metrics_node_polls(m->metrics.polls, &m->metrics.n_polls, ELEMENTSOF(m->metrics.polls),
                                         a->have_state ? a->state.node.id : NULL);
                row->n[poll_outcome[a->outcome]]++;
                good = good || a->ok;
        }
        if (good)
                m->metrics.last_good_poll_usec = now_usec(CLOCK_REALTIME);
        if (m->metrics.round_started_usec > 0 && now >= m->metrics.round_started_usec)
                metrics_observe(&m->metrics.rounds,
                                (double) (now - m->metrics.round_started_usec) / (double) USEC_PER_SEC);
}

/* update.state of contract 8, every value. */
static const char *const update_states[] = {
        "disabled", "none", "installed", "held", "waiting", "downloading", "applying", "failed",
};

static void snapshot(Manager *m, MetricsSnapshot *s) {
        const Committed *c = &m->sync.state.committed;

        *s = (MetricsSnapshot){
                .epoch = c->epoch,
                .primary_id = c->epoch > 0 ? c->primary.id : NULL,
                .polls = m->metrics.polls,
                .n_polls = m->metrics.n_polls,
                .rounds = m->metrics.rounds,
                .commits = m->sync.changes,
                .events = m->counters.events,
                .notifies = m->counters.notifies,
                .broker_connected = m->broker && broker_state(m->broker) == BROKER_CONNECTED,
                .broker_reconnects = broker_reconnects(m->broker),
                .last_commit_usec = m->sync.last_change_usec,
                .last_good_poll_usec = m->metrics.last_good_poll_usec,
        };
        notify_rejected_totals(s->rejected);
        settings_writer_runs(m->settings, &s->on_change_ok, &s->on_change_failed);
        for (size_t i = 0; i < METRICS_ACK_N; i++)
                s->acks[i] = ack_outcomes(m->ack, (AckOutcome) i);
        s->ack_publishes = ack_publishes(m->ack);
        s->acknowledged_epoch = ack_confirmed_epoch(m->ack);
        updater_applies(m->updater, &s->applies_ok, &s->applies_failed);
        const char *state = manager_update_state(m, NULL);

        s->n_update_states = ELEMENTSOF(update_states);
        s->update_state = SIZE_MAX; /* a state not listed: every series 0 */
        for (size_t i = 0; i < ELEMENTSOF(update_states); i++) {
                s->update_states[i] = update_states[i];
                if (strcmp(state, update_states[i]) == 0)
                        s->update_state = i;
        }
        memcpy(s->warnings, m->metrics.warnings, sizeof(s->warnings));
}

char *manager_metrics_text(Manager *m) {
        MetricsSnapshot s;

        snapshot(m, &s);
        return metrics_render(&s);
}
