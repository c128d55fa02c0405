/* The status document of contract section 7, built from the Manager's live
 * state. Read-only: it never changes the manager, and every sub-object may
 * be absent (a daemon in --once mode has no listener, a daemon without a
 * committed Primary has no broker target). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "manager.h"
#include "version.h"

/* "2026-11-25T16:30:00Z", or JSON null for 0 ("never"). */
static json_t *rfc3339_or_null(uint64_t usec) {
        char buf[32];
        struct tm tm;
        time_t t;

        if (usec == 0)
                return json_null();
        t = (time_t) (usec / USEC_PER_SEC);
        if (!gmtime_r(&t, &tm) || strftime(buf, sizeof(buf), "%Y-%m-%dT%H:%M:%SZ", &tm) == 0)
                return json_null();
        return json_string(buf);
}

/* jansson refuses strings that are not valid UTF-8, and json_pack then
 * drops the whole enclosing object. Text from files, configuration and
 * truncation may be anything, so such a string is shown with '?' for every
 * non-ASCII byte rather than lost. */
static json_t *text(const char *s) {
        json_t *j = json_string(s);
        char *copy;

        if (j)
                return j;
        copy = strdup(s);
        if (!copy)
                return NULL;
        for (char *p = copy; *p; p++)
                if ((unsigned char) *p >= 0x80)
                        *p = '?';
        j = json_string(copy);
        free(copy);
        return j;
}

static json_t *string_or_null(const char *s) {
        return s && s[0] ? text(s) : json_null();
}

static json_t *broker_json(const BrokerInfo *b) {
        return json_pack("{s:s, s:i, s:s, s:b}", "host", b->host, "port", (int) b->port, "vhost", b->vhost,
                         "tls", b->tls);
}

static json_t *primary_json(const Committed *c) {
        if (c->epoch == 0)
                return json_null();
        return json_pack("{s:s, s:s, s:o}", "id", c->primary.id, "api_url", c->primary.api_url, "broker",
                         broker_json(&c->broker));
}

/* The node id of a target: from its own answer, else from the cluster
 * list persisted with the committed Primary. */
static const char *target_id(const Manager *m, const PollAnswer *t) {
        if (t->have_state)
                return t->state.node.id;
        for (size_t i = 0; i < m->sync.state.n_nodes; i++)
                if (strcmp(m->sync.state.nodes[i].api_url, t->url) == 0)
                        return m->sync.state.nodes[i].id;
        return NULL;
}

static json_t *node_json(const Manager *m, const PollAnswer *t) {
        const ProviderState *st = t->have_state ? &t->state : NULL;

        return json_pack("{s:o, s:s, s:o, s:o, s:o, s:o, s:o}", "id", string_or_null(target_id(m, t)),
                         "api_url", t->url, "role",
                         st ? json_string(st->role == NODE_ROLE_PRIMARY ? "primary" : "standby")
                            : json_null(),
                         "version", st ? text(st->version) : json_null(), "epoch",
                         st ? json_integer((json_int_t) st->epoch) : json_null(), "last_seen",
                         rfc3339_or_null(t->last_seen_usec), "error", string_or_null(t->error));
}

/* The poller's latest round; none without a poller. */
static PollRound round_of(const Manager *m) {
        PollRound round = {};

        if (m->poller)
                poller_get_round(m->poller, &round);
        return round;
}

/* Every node asked at its own address. The load balancer answers for an
 * arbitrary node, so it is never shown as one. */
static json_t *nodes_json(Manager *m) {
        json_t *a = json_array();
        PollRound round = round_of(m);

        for (size_t i = 0; a && i < round.n_answers; i++) {
                const PollAnswer *t = &round.answers[i];

                if (t->via_load_balancer)
                        continue;
                if (json_array_append_new(a, node_json(m, t)) < 0) {
                        json_decref(a);
                        return NULL;
                }
        }
        return a;
}

static json_t *warnings_json(const Manager *m) {
        json_t *a = json_array();

        for (size_t i = 0; a && i < m->n_warnings && i < MANAGER_MAX_WARNINGS; i++)
                if (json_array_append_new(a, text(m->warnings[i])) < 0) {
                        json_decref(a);
                        return NULL;
                }
        return a;
}

/* The offer of the latest round, as the sync core computed it for the
 * gate (one computation: the status never disagrees with the gate). */
static const char *offered_version(const Manager *m) {
        return m->sync.have_offer ? m->sync.offer.version : NULL;
}

const char *manager_update_state(Manager *m, const char **ret_reason) {
        const char *state = gate_state_to_string(m->sync.gate.state);
        const char *reason = m->sync.gate.reason;

        if (m->updater) {
                switch (updater_phase(m->updater)) {
                case UPDATER_DOWNLOADING:
                        state = "downloading";
                        reason = NULL;
                        break;
                case UPDATER_APPLYING:
                        state = "applying";
                        reason = NULL;
                        break;
                case UPDATER_FAILED:
                        state = "failed";
                        reason = updater_last_error(m->updater);
                        break;
                case UPDATER_READY:
                        /* Verified and kept while the gate is closed: the
                         * gate's verdict (held or waiting, and why) is what
                         * it waits for. */
                        break;
                default:
                        /* Open but idle: either about to start, or a failed
                         * apply backing off (also right after a restart). */
                        if (m->sync.gate.state == GATE_OPEN && m->sync.state.update.failures > 0 &&
                            streq_ptr(m->sync.state.update.failed_version, offered_version(m))) {
                                state = "failed";
                                reason = "retry_pending";
                        } else if (m->sync.gate.state == GATE_OPEN) {
                                state = "waiting";
                                reason = "starting";
                        }
                        break;
                }
        }
        if (ret_reason)
                *ret_reason = reason;
        return state ? state : "none";
}

static json_t *update_json(Manager *m) {
        const char *reason, *state = manager_update_state(m, &reason);

        return json_pack("{s:s, s:o, s:o, s:o}", "state", state, "reason", string_or_null(reason), "target",
                         string_or_null(offered_version(m)), "installed",
                         string_or_null(m->sync.installed_version));
}

static const char *broker_connection(const Manager *m) {
        if (!m->broker)
                return "down";
        return broker_conn_state_to_string(broker_state(m->broker));
}

json_t *manager_status_json(Manager *m) {
        if (!m)
                return NULL;
        /* json_pack steals the "o" references, also on failure. */
        return json_pack(
                "{s:s, s:I, s:o, s:s, s:o, s:o, s:o, s:o*, s:o*, s:o*, s:{s:I, s:I, s:I, s:I}}",
                "daemon_version", DAEMON_VERSION, "epoch", (json_int_t) m->sync.state.committed.epoch,
                "primary", primary_json(&m->sync.state.committed), "broker_connection", broker_connection(m),
                "broker_error", string_or_null(m->broker_error[0] ? m->broker_error : NULL), "last_poll",
                rfc3339_or_null(m->last_poll_usec), "last_change", rfc3339_or_null(m->sync.last_change_usec),
                "nodes", nodes_json(m), "warnings", warnings_json(m), "update", update_json(m), "counters",
                "polls", (json_int_t) m->counters.polls, "events", (json_int_t) m->counters.events,
                "notifies", (json_int_t) m->counters.notifies, "changes", (json_int_t) m->sync.changes);
}
