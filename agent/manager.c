/* The manager: one sd-event loop and the round scheduler.
 *
 * Every input (the poll timer, an AMQP event, a notify, the loss of the
 * broker, SIGHUP) only asks for a round. If one is in flight, the request
 * marks one more as pending; that is the whole of coalescing. When a round
 * ends, its answers go through the rule (pure), a commit goes to the state
 * file, then the settings file, then the broker connection moves; the
 * update gate (pure) looks at the same answers. */
#include "manager.h"

#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <malloc.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <systemd/sd-daemon.h>
#include <time.h>

#include "atomic_file.h"
#include "lockfile.h"
#include "log.h"
#include "macro.h"

#define FLAP_WINDOW_USEC     (10 * 60 * USEC_PER_SEC)
#define FLAP_LIMIT           3
#define MAX_LOGGED_STALE     16
#define MAX_DISCOVERY_ROUNDS 3
#define HINT_BURST           4 /* hint rounds that may start at once */
#define HINT_RATE            8 /* hint rounds per second after the burst */

/* A uniform double in [0, 1) for jitter and the update delay. Quality
 * matters little; spreading a fleet out is all it does. */
static double random_unit(void) {
        static uint64_t s;
        if (s == 0 && getrandom(&s, sizeof(s), GRND_NONBLOCK) != sizeof(s))
                s = now_usec(CLOCK_MONOTONIC) ^ (uint64_t) getpid() << 32;
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        return (double) (s >> 11) / (double) (1ULL << 53);
}

static uint64_t jittered(uint64_t usec, double jitter) {
        double f = 1.0 + jitter * (2.0 * random_unit() - 1.0);
        return (uint64_t) ((double) usec * f);
}

/* ---- STATUS= and warnings ---- */

static void manager_send_status(Manager *m) {
        char text[1024];
        const Committed *c = &m->state.committed;
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
                         c->primary.id, c->epoch, broker, gate_state_to_string(m->gate.state),
                         m->gate.reason[0] ? ": " : "", m->gate.reason);
        if (strcmp(text, m->status_text) == 0)
                return;
        strscpy(m->status_text, sizeof(m->status_text), text);
        (void) sd_notifyf(false, "STATUS=%s", text);
}

static void add_warning(Manager *m, const char *fmt, ...) _printf_(2, 3);
static void add_warning(Manager *m, const char *fmt, ...) {
        va_list ap;

        if (m->n_warnings >= MANAGER_MAX_WARNINGS)
                return;
        va_start(ap, fmt);
        vsnprintf(m->warnings[m->n_warnings++], MANAGER_WARNING_MAX, fmt, ap);
        va_end(ap);
}

static unsigned recent_changes(Manager *m, uint64_t now) {
        unsigned n = 0;
        for (size_t i = 0; i < m->n_change_times; i++)
                if (now - m->change_times[i] <= FLAP_WINDOW_USEC)
                        n++;
        return n;
}

static void manager_update_warnings(Manager *m) {
        const RuleResult *r = &m->last_rule;
        unsigned flaps = recent_changes(m, now_usec(CLOCK_MONOTONIC));
        int werr = m->settings ? settings_writer_error(m->settings) : 0;

        m->n_warnings = 0;
        for (size_t i = 0; i < r->n_stale; i++)
                add_warning(m, "stale primary %s at epoch %" PRIu64, r->stale[i].node_id, r->stale[i].epoch);
        if (r->conflict)
                add_warning(m, "primary conflict: %s and %s both claim epoch %" PRIu64, r->conflict_a,
                            r->conflict_b, r->conflict_epoch);
        if (m->state.committed.epoch > 0 && (m->state.n_nodes < 3 || m->state.n_nodes > 4))
                add_warning(m, "cluster size %zu: a Provider HA cluster has 3 or 4 nodes", m->state.n_nodes);
        if (flaps > FLAP_LIMIT)
                add_warning(m, "flapping: %u primary changes within 10 minutes", flaps);
        if (werr < 0)
                add_warning(m, "settings file %s not written: %s", m->config->settings_file,
                            strerror(-werr));
        if (m->state_save_failed)
                add_warning(m, "state file %s not written: commits are held", m->config->state_file);
        if (m->state.committed.epoch == 0)
                add_warning(m, "no primary committed yet");
}

/* ---- the round scheduler ---- */

static void on_round_done(Poller *p, void *userdata);
static const PollerCallbacks poller_callbacks = {.done = on_round_done};

static int on_poll_timer(sd_event_source *s, uint64_t usec, void *userdata) {
        Manager *m = userdata;

        /* The deferred hint round is this one, whatever armed the timer. */
        if (m->hint_deferred)
                ratelimit_charge(&m->hint_bucket, now_usec(CLOCK_MONOTONIC));
        manager_request_round(m, NULL);
        return 0;
}

static bool manager_steady(Manager *m) {
        if (m->state.committed.epoch == 0)
                return false;
        return !m->broker || broker_state(m->broker) == BROKER_CONNECTED;
}

/* Arms the timer for the next round: steady, or the fast-poll backoff
 * while the Primary is unknown or its broker is lost (contract 4). */
static void manager_schedule_next(Manager *m) {
        const Config *c = m->config;
        uint64_t delay;

        if (manager_steady(m)) {
                m->fast_delay_usec = 0;
                delay = c->poll_interval;
        } else {
                if (m->fast_delay_usec == 0)
                        m->fast_delay_usec = c->fast_poll_interval;
                delay = m->fast_delay_usec;
                m->fast_delay_usec = m->fast_delay_usec * 2 > c->poll_interval ? c->poll_interval
                                                                               : m->fast_delay_usec * 2;
        }
        delay = jittered(delay, c->poll_jitter);
        (void) sd_event_source_set_time(m->poll_timer, now_usec(CLOCK_MONOTONIC) + delay);
        (void) sd_event_source_set_enabled(m->poll_timer, SD_EVENT_ONESHOT);
}

static void manager_start_round(Manager *m) {
        int r;

        (void) sd_event_source_set_enabled(m->poll_timer, SD_EVENT_OFF);
        m->round_pending = false;
        m->hint_pending = false;
        m->hint_deferred = false;
        r = poller_start_round(m->poller, &poller_callbacks, m);
        if (r < 0) {
                log_warning_errno(r, "Cannot start a poll round");
                manager_schedule_next(m);
                return;
        }
        /* curl bounds every request by request_timeout; this bounds the
         * round itself, should a transfer ever fail to finish. */
        (void) sd_event_source_set_time(
                m->round_deadline, now_usec(CLOCK_MONOTONIC) + m->config->request_timeout + USEC_PER_SEC);
        (void) sd_event_source_set_enabled(m->round_deadline, SD_EVENT_ONESHOT);
}

static int on_round_deadline(sd_event_source *s, uint64_t usec, void *userdata) {
        Manager *m = userdata;

        if (!poller_in_flight(m->poller))
                return 0;
        log_warning("Poll round did not finish within request_timeout, cutting it off");
        poller_abort(m->poller);
        on_round_done(m->poller, m);
        return 0;
}

/* Arms the poll timer for a hint round at `when` unless it already fires
 * sooner. */
static void manager_defer_hint_round(Manager *m, uint64_t when) {
        uint64_t armed = 0;
        int enabled = SD_EVENT_OFF;

        (void) sd_event_source_get_enabled(m->poll_timer, &enabled);
        (void) sd_event_source_get_time(m->poll_timer, &armed);
        m->hint_deferred = true;
        if (enabled != SD_EVENT_OFF && armed <= when)
                return;
        (void) sd_event_source_set_time(m->poll_timer, when);
        (void) sd_event_source_set_enabled(m->poll_timer, SD_EVENT_ONESHOT);
}

/* Hints (events, notifies, the loss of the broker) may come in storms. A
 * token bucket (HINT_BURST rounds at once, HINT_RATE per second after
 * that) lets a lone hint, or a few, start their round at once while a
 * storm of any size costs a handful of rounds.
 *
 * Starts a hint round now if a token is there and hint_spread allows,
 * else defers it. spread: draw the fleet-wide spread (a fresh trigger). */
static void manager_start_hint_round(Manager *m, bool spread) {
        uint64_t now = now_usec(CLOCK_MONOTONIC), when = ratelimit_ready_at(&m->hint_bucket, now);

        if (spread && m->config->hint_spread > 0) {
                /* hint_spread: a fleet-wide trigger spreads its fleet-wide poll. */
                uint64_t drawn = now + (uint64_t) (random_unit() * (double) m->config->hint_spread);
                if (drawn > when)
                        when = drawn;
        }
        if (when > now) {
                manager_defer_hint_round(m, when);
                return;
        }
        (void) ratelimit_take(&m->hint_bucket, now);
        manager_start_round(m);
}

static void manager_request(Manager *m, const char *why, bool hint) {
        if (why)
                log_debug("Poll round requested: %s", why);
        /* While a round's answers are being judged (commit, broker move,
         * gate), a new round would clobber them: it waits its turn. */
        if (poller_in_flight(m->poller) || m->in_round_done) {
                if (hint)
                        m->hint_pending = true;
                else
                        m->round_pending = true;
                return;
        }
        if (hint && !m->hint_deferred)
                manager_start_hint_round(m, true);
        else if (!hint)
                manager_start_round(m);
}

void manager_request_round(Manager *m, const char *why) {
        manager_request(m, why, false);
}

void manager_request_hint_round(Manager *m, const char *why) {
        manager_request(m, why, true);
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
static void manager_forget_reports(Manager *m) {
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

/* ---- after a round: discovery ---- */

static bool url_listed(const char *const *list, size_t n, const char *url) {
        for (size_t i = 0; i < n; i++)
                if (strcmp(list[i], url) == 0)
                        return true;
        return false;
}

/* A discovered URL receives the Provider token: never one with userinfo,
 * and plain http only when the configuration itself uses plain http. */
static bool discovered_url_acceptable(const Config *c, const char *url) {
        const char *host = strstr(url, "://");
        bool config_plain = c->load_balancer && strncmp(c->load_balancer, "http://", 7) == 0;

        if (!host || strchr(host, '@'))
                return false;
        for (size_t i = 0; i < c->n_endpoints; i++)
                if (strncmp(c->endpoints[i], "http://", 7) == 0)
                        config_plain = true;
        return config_plain || strncmp(url, "https://", 8) == 0;
}

static void add_nodes(Manager *m, const char **list, size_t *n, size_t max, const NodeRef *nodes,
                      size_t n_nodes) {
        for (size_t i = 0; i < n_nodes && *n < max; i++)
                if (!url_listed(list, *n, nodes[i].api_url) &&
                    discovered_url_acceptable(m->config, nodes[i].api_url))
                        list[(*n)++] = nodes[i].api_url;
}

/* The nodes to poll besides the configured ones: the committed Primary's
 * latest `nodes`, what the load balancer reports, and, while nothing is
 * committed, what any node reports. Returns true when a target is new. */
static bool manager_refresh_targets(Manager *m) {
        const char *extra[4 * PROVIDER_NODES_MAX];
        size_t n = 0;

        PollRound round;
        int r;

        poller_get_round(m->poller, &round);
        add_nodes(m, extra, &n, ELEMENTSOF(extra), m->state.nodes, m->state.n_nodes);
        for (size_t i = 0; i < round.n_answers; i++) {
                const PollAnswer *a = &round.answers[i];
                if (!a->ok || (!a->via_load_balancer && m->state.committed.epoch > 0))
                        continue;
                add_nodes(m, extra, &n, ELEMENTSOF(extra), a->state.nodes, a->state.n_nodes);
        }
        /* New means: not polled before and actually taken (under the cap). */
        r = poller_set_targets(m->poller, extra, n);
        manager_forget_reports(m);
        return r > 0;
}

/* ---- after a round: the rule ---- */

static const ProviderState *answer_of(Manager *m, const char *node_id, bool want_primary) {
        PollRound round;

        poller_get_round(m->poller, &round);
        for (size_t i = 0; i < round.n_answers; i++) {
                const PollAnswer *a = &round.answers[i];
                if (!a->ok || a->via_load_balancer || strcmp(a->state.node.id, node_id) != 0)
                        continue;
                if (want_primary && a->state.role != NODE_ROLE_PRIMARY)
                        continue;
                return &a->state;
        }
        return NULL;
}

/* The cluster's node list: from the committed Primary's own answer when it
 * gave one, else from the largest list of a node that follows it. */
static bool manager_learn_nodes(Manager *m) {
        const Committed *c = &m->state.committed;
        const ProviderState *best = answer_of(m, c->primary.id, true);
        PollRound round;

        if (best && best->epoch != c->epoch)
                best = NULL;
        poller_get_round(m->poller, &round);
        for (size_t i = 0; !best && i < round.n_answers; i++) {
                const PollAnswer *a = &round.answers[i];
                if (a->ok && !a->via_load_balancer && a->state.epoch == c->epoch &&
                    strcmp(a->state.primary.id, c->primary.id) == 0 &&
                    (!best || a->state.n_nodes > best->n_nodes))
                        best = &a->state;
        }
        if (!best || best->n_nodes == 0)
                return false;
        if (best->n_nodes == m->state.n_nodes &&
            memcmp(best->nodes, m->state.nodes, best->n_nodes * sizeof(NodeRef)) == 0)
                return false;
        memcpy(m->state.nodes, best->nodes, best->n_nodes * sizeof(NodeRef));
        m->state.n_nodes = best->n_nodes;
        return true;
}

static int manager_save_state(Manager *m) {
        int r = state_save(m->config->state_file, &m->state);
        if (r < 0)
                return log_error_errno(r, "Cannot write state file %s", m->config->state_file);
        return 0;
}

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

static void manager_log_rule(Manager *m, const RuleResult *res) {
        const RuleResult *prev = &m->last_rule;

        for (size_t i = 0; i < res->n_stale; i++) {
                const RuleStale *s = &res->stale[i];
                if (stale_logged(m, s))
                        continue;
                log_struct(LOG_WARNING, 0, MID_STALE_PRIMARY,
                           &(LogFields){.epoch = s->epoch, .node_id = s->node_id, .reason = "stale_primary"},
                           "Ignoring stale primary %s: it claims epoch %" PRIu64 ", committed is %" PRIu64,
                           s->node_id, s->epoch,
                           res->verdict == RULE_COMMIT ? res->next.epoch : m->state.committed.epoch);
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

static void manager_commit(Manager *m, const RuleResult *res) {
        Committed old = m->state.committed;
        const Committed *c = &res->next;
        uint64_t now = now_usec(CLOCK_MONOTONIC);

        PersistentState prev = m->state;

        m->state.committed = *c;
        (void) manager_learn_nodes(m);
        /* The epoch fence must survive a restart before anything acts on
         * the new pair; without the state file nothing moves (retried next
         * round). */
        if (manager_save_state(m) < 0) {
                m->state = prev;
                m->state_save_failed = true;
                return;
        }
        m->state_save_failed = false;

        log_struct(LOG_NOTICE, 0, MID_PRIMARY_COMMITTED,
                   &(LogFields){.epoch = c->epoch,
                                .primary_id = c->primary.id,
                                .reason = res->broker_only ? "broker_changed"
                                          : res->confirmation == RULE_CONFIRMED_BY_PRIMARY
                                                  ? "confirmed_by_primary"
                                                  : "confirmed_by_majority"},
                   "Primary %s committed at epoch %" PRIu64 " (was %s at %" PRIu64
                   "), broker %s:%u vhost %s%s",
                   c->primary.id, c->epoch, old.epoch ? old.primary.id : "none", old.epoch, c->broker.host,
                   c->broker.port, c->broker.vhost, c->broker.tls ? " tls" : "");

        m->counters.changes++;
        m->last_change_usec = now_usec(CLOCK_REALTIME);
        if (old.epoch > 0 && strcmp(old.primary.id, c->primary.id) != 0) {
                if (m->n_change_times == MANAGER_MAX_CHANGE_TIMES) {
                        memmove(m->change_times, m->change_times + 1,
                                (MANAGER_MAX_CHANGE_TIMES - 1) * sizeof(m->change_times[0]));
                        m->n_change_times--;
                }
                m->change_times[m->n_change_times++] = now;
        }

        if (m->settings)
                (void) settings_writer_apply(m->settings, c);
        if (m->broker)
                (void) broker_set_target(m->broker, &c->broker);
}

/* Logs a node that starts or stops failing, not every failed poll. */
static void manager_log_targets(Manager *m) {
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

/* ---- after a round: the update gate ---- */

static const PollAnswer *direct_answer(Manager *m, const NodeRef *node) {
        PollRound round;

        poller_get_round(m->poller, &round);
        for (size_t i = 0; i < round.n_answers; i++) {
                const PollAnswer *a = &round.answers[i];
                if (strcmp(a->url, node->api_url) != 0)
                        continue;
                if (a->via_load_balancer || !a->ok || strcmp(a->state.node.id, node->id) != 0)
                        return NULL;
                return a;
        }
        return NULL;
}

/* Fills m->gate_nodes from this round and counts the consecutive rounds in
 * which every node answered directly with the offered version. Counting
 * starts with the first round that sees the offer (contract 8), and rounds
 * closer together than half a poll interval (an event burst) count once. */
static void manager_count_agreement(Manager *m, const AgentUpdate *offer) {
        uint64_t now = now_usec(CLOCK_MONOTONIC);
        bool agree = offer && m->state.n_nodes > 0;
        GateNode *nodes = m->gate_nodes;

        memset(m->gate_nodes, 0, sizeof(m->gate_nodes));
        m->n_gate_nodes = m->state.n_nodes;
        for (size_t i = 0; i < m->state.n_nodes; i++) {
                const PollAnswer *t = direct_answer(m, &m->state.nodes[i]);
                strscpy(nodes[i].id, sizeof(nodes[i].id), m->state.nodes[i].id);
                nodes[i].answered_direct = t != NULL;
                if (t)
                        strscpy(nodes[i].version, sizeof(nodes[i].version), t->state.version);
                if (!t || !offer || strcmp(nodes[i].version, offer->version) != 0)
                        agree = false;
        }
        if (!agree) {
                m->agreeing_rounds = 0;
                m->agreeing_version[0] = 0;
                return;
        }
        if (strcmp(m->agreeing_version, offer->version) != 0) {
                strscpy(m->agreeing_version, sizeof(m->agreeing_version), offer->version);
                m->agreeing_rounds = 0;
        }
        if (m->agreeing_rounds == 0 || now - m->agreement_counted_usec >= m->config->poll_interval / 2) {
                m->agreeing_rounds++;
                m->agreement_counted_usec = now;
        }
}

/* The random delay is drawn once per offered version and kept across restarts. */
static void manager_draw_delay(Manager *m, const AgentUpdate *offer) {
        UpdateRecord *u = &m->state.update;

        if (!offer || !m->config->update_enabled || strcmp(u->delay_version, offer->version) == 0)
                return;
        strscpy(u->delay_version, sizeof(u->delay_version), offer->version);
        u->delay_not_before_usec =
                now_usec(CLOCK_REALTIME) + (uint64_t) (random_unit() * (double) m->config->max_delay);
        (void) manager_save_state(m);
}

/* "delay: 143s" counts down every round; only a change of state or of the
 * kind of reason is news worth a log line. */
static bool gate_result_same(const GateResult *a, const GateResult *b) {
        size_t n = strcspn(a->reason, ":");

        if (a->state != b->state)
                return false;
        if (a->state == GATE_WAITING)
                return n == strcspn(b->reason, ":") && strncmp(a->reason, b->reason, n) == 0;
        return strcmp(a->reason, b->reason) == 0;
}

static const AgentUpdate *manager_gate_offer(Manager *m) {
        return m->gate_offer.present ? &m->gate_offer : NULL;
}

static void manager_start_update(Manager *m, const AgentUpdate *offer) {
        UpdaterPhase phase = updater_phase(m->updater);
        int r;

        if (m->once || phase == UPDATER_DOWNLOADING || phase == UPDATER_APPLYING)
                return;
        r = updater_start(m->updater, offer, m->state.committed.primary.api_url);
        /* A refused offer is refused again every round: say it once per version. */
        if (r < 0 && r != -EAGAIN && r != -EBUSY && strcmp(m->refused_update_version, offer->version) != 0) {
                log_struct(LOG_WARNING, r, MID_UPDATE_FAILED,
                           &(LogFields){.version = offer->version, .reason = "refused"},
                           "Cannot start the agent update %s", offer->version);
                strscpy(m->refused_update_version, sizeof(m->refused_update_version), offer->version);
        }
}

/* The gate as of now: the latest round's answers, agreement and offer,
 * with the clock, the configuration and the settings writer of this
 * moment (a SIGHUP or an on_change since the round counts). */
static void manager_compute_gate(Manager *m, GateResult *ret) {
        const Config *c = m->config;
        GateInput in = {
                .enabled = c->update_enabled,
                .offer = manager_gate_offer(m),
                .installed = m->installed_version,
                .applied = m->state.update.applied_version,
                .nodes = m->gate_nodes,
                .n_nodes = m->n_gate_nodes,
                .agreeing_rounds = m->agreeing_rounds,
                .stable_rounds = c->stable_rounds,
                .settings_busy = m->settings && settings_writer_busy(m->settings),
                .now_usec = now_usec(CLOCK_REALTIME),
                .window_set = c->window_set,
                .window_start_min = c->window_start_min,
                .window_end_min = c->window_end_min,
                .delay_not_before_usec = m->state.update.delay_not_before_usec,
        };
        gate_evaluate(&in, ret);
}

/* Acts on a verdict: a held or waiting one is logged when it is news; an
 * open one runs the verified package of this very offer, or starts (or
 * replaces) the download. A closed gate runs nothing. */
static void manager_act_on_gate(Manager *m, const GateResult *res) {
        const AgentUpdate *offer = manager_gate_offer(m);

        if ((res->state == GATE_HELD || res->state == GATE_WAITING) && !gate_result_same(&m->gate, res))
                log_struct(LOG_INFO, 0, MID_UPDATE_HELD,
                           &(LogFields){.version = offer ? offer->version : NULL, .reason = res->reason},
                           "Agent update %s %s: %s", offer ? offer->version : "",
                           gate_state_to_string(res->state), res->reason);
        m->gate = *res;

        if (res->state != GATE_OPEN || !m->updater)
                return;
        /* -ESTALE: the kept package is of another offer; this one replaces it. */
        if (updater_phase(m->updater) == UPDATER_READY && updater_apply(m->updater, offer) == 0)
                return;
        manager_start_update(m, offer);
}

static void manager_evaluate_gate(Manager *m) {
        const ProviderState *primary = answer_of(m, m->state.committed.primary.id, true);
        GateResult res;

        /* The offer is the committed Primary's, at the committed epoch. */
        m->gate_offer = (AgentUpdate){};
        if (primary && primary->epoch == m->state.committed.epoch && primary->update.present)
                m->gate_offer = primary->update;
        manager_count_agreement(m, manager_gate_offer(m));
        (void) updater_read_installed(m->config, m->installed_version, sizeof(m->installed_version));
        manager_draw_delay(m, manager_gate_offer(m));

        manager_compute_gate(m, &res);
        manager_act_on_gate(m, &res);
}

/* ---- the round's end ---- */

static void manager_print_once_summary(Manager *m) {
        const Committed *c = &m->state.committed;

        if (c->epoch == 0) {
                printf("no primary confirmed: %zu nodes polled\n", poller_n_targets(m->poller));
                return;
        }
        printf("primary %s epoch %" PRIu64 " broker %s:%u vhost %s tls %s settings %s update %s%s%s\n",
               c->primary.id, c->epoch, c->broker.host, c->broker.port, c->broker.vhost,
               c->broker.tls ? "true" : "false",
               settings_writer_error(m->settings) < 0 ? "write-failed" : "ok",
               gate_state_to_string(m->gate.state), m->gate.reason[0] ? ": " : "", m->gate.reason);
}

/* --once ends when the round is done and a triggered on_change has
 * finished (bounded by on_change_timeout): the caller may rely on the
 * Agent having been told. */
static int on_once_check(sd_event_source *s, uint64_t usec, void *userdata) {
        Manager *m = userdata;

        if (settings_writer_busy(m->settings) && now_usec(CLOCK_MONOTONIC) < m->once_deadline_usec) {
                (void) sd_event_source_set_time(s, usec + 20 * USEC_PER_MSEC);
                return sd_event_source_set_enabled(s, SD_EVENT_ONESHOT);
        }
        manager_print_once_summary(m);
        m->exit_code = m->state.committed.epoch > 0 && settings_writer_error(m->settings) == 0 ? 0 : 2;
        return sd_event_exit(m->event, m->exit_code);
}

static void manager_finish_once(Manager *m) {
        uint64_t now = now_usec(CLOCK_MONOTONIC);

        m->once_deadline_usec = now + m->config->on_change_timeout + USEC_PER_SEC;
        if (sd_event_add_time(m->event, &m->once_timer, CLOCK_MONOTONIC, now, USEC_PER_MSEC, on_once_check,
                              m) < 0)
                (void) sd_event_exit(m->event, 2);
}

static void on_round_done(Poller *p, void *userdata) {
        Manager *m = userdata;
        RuleAnswer answers[64];
        size_t n = 0;
        RuleResult res;
        PollRound round;

        (void) sd_event_source_set_enabled(m->round_deadline, SD_EVENT_OFF);
        m->in_round_done = true;
        m->counters.polls++;
        m->last_poll_usec = now_usec(CLOCK_REALTIME);
        manager_log_targets(m);

        poller_get_round(p, &round);
        for (size_t i = 0; i < round.n_answers && n < ELEMENTSOF(answers); i++) {
                const PollAnswer *a = &round.answers[i];
                answers[n++] = (RuleAnswer){
                        .via_load_balancer = a->via_load_balancer, .ok = a->ok, .state = &a->state};
        }
        rule_evaluate(&(RuleInput){.current = &m->state.committed,
                                   .known = m->state.nodes,
                                   .n_known = m->state.n_nodes,
                                   .answers = answers,
                                   .n_answers = n},
                      &res);
        manager_log_rule(m, &res);
        if (res.verdict == RULE_COMMIT)
                manager_commit(m, &res);
        else if (m->state.committed.epoch > 0 && manager_learn_nodes(m))
                (void) manager_save_state(m);
        m->last_rule = res;

        if (m->state.committed.epoch > 0)
                manager_evaluate_gate(m);
        manager_update_warnings(m);
        manager_send_status(m);

        /* Newly discovered nodes are asked at once, a bounded number of
         * times in a row, so a load-balancer-only start converges in one go. */
        if (manager_refresh_targets(m) && m->discovery_rounds < MAX_DISCOVERY_ROUNDS) {
                m->discovery_rounds++;
                m->round_pending = true;
        } else
                m->discovery_rounds = 0;

        m->in_round_done = false;
        /* A round's transient buffers (bodies, parsed documents) leave
         * free pages inside the heap; give them back while idle. */
        (void) malloc_trim(0);
        if (m->once && !m->round_pending && !m->hint_pending) {
                manager_finish_once(m);
                return;
        }
        if (m->round_pending)
                manager_start_round(m);
        else {
                manager_schedule_next(m);
                if (m->hint_pending) {
                        m->hint_pending = false;
                        manager_start_hint_round(m, false);
                }
        }
}

/* ---- inputs ---- */

static void on_broker_event(Broker *b, const char *routing_key, const void *body, size_t len,
                            void *userdata) {
        Manager *m = userdata;

        m->counters.events++;
        manager_request_hint_round(m, routing_key);
}

static void on_broker_state(Broker *b, BrokerConnState state, const char *reason, void *userdata) {
        Manager *m = userdata;

        if (state == BROKER_DOWN) {
                /* Lost: poll at once (spread by hint_spread when set), then
                 * the fast-poll backoff (contract 4). */
                m->fast_delay_usec = 0;
                manager_request_hint_round(m, "broker lost");
        } else if (state == BROKER_CONNECTED && !poller_in_flight(m->poller) && !m->hint_deferred) {
                /* Back to the steady interval, counted from now. */
                m->fast_delay_usec = 0;
                manager_schedule_next(m);
        }
        manager_send_status(m);
}

static void on_notify(NotifyServer *s, const char *peer, const char *summary, void *userdata) {
        Manager *m = userdata;

        m->counters.notifies++;
        manager_request_hint_round(m, "notify");
}

static json_t *on_status(NotifyServer *s, void *userdata) {
        return manager_status_json(userdata);
}

static void on_updater_changed(Updater *u, void *userdata) {
        Manager *m = userdata;

        (void) manager_save_state(m);
        (void) updater_read_installed(m->config, m->installed_version, sizeof(m->installed_version));
        manager_send_status(m);
}

/* A package is verified, maybe long after the round that opened the gate:
 * the gate is judged again now (contract 8: every condition holds when the
 * command starts). Closed, the package stays kept, and the round that
 * finds the gate open again applies it. */
static void on_updater_ready(Updater *u, const AgentUpdate *offer, void *userdata) {
        Manager *m = userdata;
        GateResult res;

        (void) updater_read_installed(m->config, m->installed_version, sizeof(m->installed_version));
        manager_compute_gate(m, &res);
        if (res.state != GATE_OPEN)
                log_info("Agent update %s verified and kept, not applied now: update %s%s%s", offer->version,
                         gate_state_to_string(res.state), res.reason[0] ? ": " : "", res.reason);
        manager_act_on_gate(m, &res);
        manager_send_status(m);
}

static const UpdaterCallbacks updater_callbacks = {.changed = on_updater_changed, .ready = on_updater_ready};

/* ---- signals and the watchdog ---- */

static int on_stop_signal(sd_event_source *s, const struct signalfd_siginfo *si, void *userdata) {
        Manager *m = userdata;

        log_info("Received %s, stopping", strsignal((int) si->ssi_signo));
        if (m->once)
                m->exit_code = 2; /* interrupted: no round was judged */
        (void) sd_notify(false, "STOPPING=1");
        return sd_event_exit(m->event, 0);
}

static const NotifyCallbacks notify_callbacks = {.notify = on_notify, .status = on_status};

/* Makes the listener match new_cfg. When its socket must change, the new
 * one is opened first (a different address) so a bad new address leaves
 * the old listener in place; on the same address the old one must go
 * first, and comes back with old_cfg if the new one fails. */
static int manager_reload_notify(Manager *m, const Config *old_cfg, const Config *new_cfg) {
        NotifyServer *fresh = NULL;
        bool same_addr = old_cfg->notify_enabled && new_cfg->notify_enabled &&
                         streq_ptr(old_cfg->notify_listen, new_cfg->notify_listen);
        int r;

        if (m->notify && !notify_server_needs_restart(old_cfg, new_cfg))
                return notify_server_reconfigure(m->notify, new_cfg);
        if (!new_cfg->notify_enabled) {
                m->notify = notify_server_free(m->notify);
                return 0;
        }
        if (same_addr)
                m->notify = notify_server_free(m->notify);
        r = notify_server_new(m->event, new_cfg, &notify_callbacks, m, &fresh);
        if (r < 0) {
                if (same_addr && !m->notify)
                        (void) notify_server_new(m->event, old_cfg, &notify_callbacks, m, &m->notify);
                return r;
        }
        notify_server_free(m->notify);
        m->notify = fresh;
        return 0;
}

static int manager_reload(Manager *m) {
        char err[CONFIG_ERROR_MAX];
        Config *new_cfg = NULL, *old_cfg = m->config;
        ControlServer *control = NULL;
        bool state_moved = false, control_moved = false;
        int r, new_lock = -1;

        (void) sd_notify(false, "RELOADING=1");
        r = config_load(old_cfg->path, &new_cfg, err, sizeof(err));
        if (r >= 0 && strcmp(old_cfg->state_file, new_cfg->state_file) != 0) {
                /* A moved state file is locked before anything uses it. */
                char path[PATH_MAX];
                pid_t holder = 0;

                state_moved = true;
                r = new_lock = lockfile_acquire(new_cfg->state_file, path, sizeof(path), &holder);
                if (r < 0 && holder > 0)
                        snprintf(err, sizeof(err),
                                 "%s: [daemon] state_file %s is in use: lock %.200s is held by PID %ld",
                                 new_cfg->path, new_cfg->state_file, path, (long) holder);
                else if (r < 0)
                        snprintf(err, sizeof(err),
                                 "%s: [daemon] state_file %s cannot be locked (%.200s): %s", new_cfg->path,
                                 new_cfg->state_file, path, strerror(-r));
        }
        /* A new control socket has another path: opened before the old one goes. */
        if (r >= 0 && control_server_needs_restart(m->control, old_cfg, new_cfg)) {
                control_moved = true;
                r = control_server_new(m->event, new_cfg, &notify_callbacks, m, &control);
                if (r < 0)
                        snprintf(err, sizeof(err), "%s: [daemon] control_socket %s cannot be opened: %s",
                                 new_cfg->path, new_cfg->control_socket, strerror(-r));
        }
        if (r >= 0) {
                r = manager_reload_notify(m, old_cfg, new_cfg);
                if (r < 0)
                        snprintf(err, sizeof(err), "%s: [notify] listen %s cannot be opened: %s",
                                 new_cfg->path, new_cfg->notify_listen, strerror(-r));
        }
        if (r < 0) {
                /* Rejected whole: the old configuration stays in force. */
                log_struct(LOG_ERR, 0, MID_CONFIG_REJECTED, &(LogFields){.reason = err},
                           "Configuration rejected, keeping the old one: %s", err);
                config_free(new_cfg);
                control_server_free(control);
                if (new_lock >= 0)
                        close(new_lock);
                (void) sd_notify(false, "READY=1");
                return r;
        }
        if (state_moved) {
                close(m->lock_fd);
                m->lock_fd = new_lock;
        }
        if (control_moved) {
                control_server_free(m->control);
                m->control = control;
        }

        m->config = new_cfg;
        log_setup(new_cfg->log_target, new_cfg->log_level);
        /* The backoff was computed from the old intervals. */
        m->fast_delay_usec = 0;

        /* A round in flight is dropped and restarted below with the new
         * targets and token. */
        poller_abort(m->poller);
        (void) sd_event_source_set_enabled(m->round_deadline, SD_EVENT_OFF);
        (void) poller_reconfigure(m->poller, new_cfg);
        (void) manager_refresh_targets(m);
        (void) settings_writer_reconfigure(m->settings, new_cfg);
        if (m->broker)
                (void) broker_reconfigure(m->broker, new_cfg);
        if (m->updater)
                (void) updater_reconfigure(m->updater, new_cfg);
        if (state_moved)
                (void) manager_save_state(m);
        config_free(old_cfg);

        log_info("Configuration reloaded from %s", new_cfg->path);
        (void) sd_notify(false, "READY=1");
        manager_send_status(m);
        manager_start_round(m);
        return 0;
}

static int on_sighup(sd_event_source *s, const struct signalfd_siginfo *si, void *userdata) {
        (void) manager_reload(userdata);
        return 0;
}

static int on_watchdog(sd_event_source *s, uint64_t usec, void *userdata) {
        Manager *m = userdata;

        (void) sd_notify(false, "WATCHDOG=1");
        (void) sd_event_source_set_time(s, usec + m->watchdog_usec / 2);
        return 0;
}

static int manager_setup_watchdog(Manager *m) {
        uint64_t usec = 0;
        int r = sd_watchdog_enabled(false, &usec);

        if (r <= 0 || usec == 0)
                return 0;
        m->watchdog_usec = usec;
        r = sd_event_add_time(m->event, &m->watchdog_timer, CLOCK_MONOTONIC,
                              now_usec(CLOCK_MONOTONIC) + usec / 2, usec / 20, on_watchdog, m);
        if (r < 0)
                return r;
        return sd_event_source_set_enabled(m->watchdog_timer, SD_EVENT_ON);
}

/* ---- lifetime ---- */

/* One daemon per state file: a second one (or --once beside a daemon)
 * could write an older epoch over a newer one. */
static int manager_lock_state(Manager *m, const char *state_file, int *ret_fd) {
        char path[PATH_MAX];
        pid_t holder = 0;
        int fd = lockfile_acquire(state_file, path, sizeof(path), &holder);

        if (fd == -EWOULDBLOCK && holder > 0)
                return log_error_errno(fd, "State file %s is in use: lock %.200s is held by PID %ld",
                                       state_file, path, (long) holder);
        if (fd == -EWOULDBLOCK)
                return log_error_errno(fd, "State file %s is in use: lock %s is held by another process",
                                       state_file, path);
        if (fd < 0)
                return log_error_errno(fd, "Cannot take the lock %s", path);
        *ret_fd = fd;
        return 0;
}

static int manager_load_state(Manager *m) {
        char err[256];
        int r;

        /* Leftovers of a crash in the middle of a state write. */
        (void) atomic_file_sweep(m->config->state_file);
        r = state_load(m->config->state_file, &m->state, err, sizeof(err));

        if (r < 0)
                return log_error_errno(r,
                                       "Cannot use state file %s (%s); refusing to start rather than "
                                       "forget the committed epoch. Inspect or remove it",
                                       m->config->state_file, err[0] ? err : "unreadable");
        if (m->state.committed.epoch > 0)
                log_info("Restored primary %s at epoch %" PRIu64 " from %s", m->state.committed.primary.id,
                         m->state.committed.epoch, m->config->state_file);
        return 0;
}

static int manager_add_signals(Manager *m) {
        sigset_t mask;
        int r;

        /* SIGPIPE: a peer closing a socket is an error return, not death. */
        signal(SIGPIPE, SIG_IGN);
        sigemptyset(&mask);
        sigaddset(&mask, SIGTERM);
        sigaddset(&mask, SIGINT);
        sigaddset(&mask, SIGHUP);
        sigaddset(&mask, SIGCHLD);
        if (sigprocmask(SIG_BLOCK, &mask, NULL) < 0)
                return negative_errno();

        r = sd_event_add_signal(m->event, &m->sigterm, SIGTERM, on_stop_signal, m);
        if (r >= 0)
                r = sd_event_add_signal(m->event, &m->sigint, SIGINT, on_stop_signal, m);
        if (r >= 0 && !m->once)
                r = sd_event_add_signal(m->event, &m->sighup, SIGHUP, on_sighup, m);
        return r;
}

static int manager_add_modules(Manager *m) {
        int r;

        r = poller_new(m->event, m->config, &m->poller);
        if (r < 0)
                return log_error_errno(r, "Cannot set up the poller");
        r = settings_writer_new(m->event, m->config, &m->settings);
        if (r < 0)
                return log_error_errno(r, "Cannot set up the settings writer");
        if (m->once)
                return 0;

        r = broker_new(m->event, m->config,
                       &(BrokerCallbacks){.event = on_broker_event, .state_changed = on_broker_state}, m,
                       &m->broker);
        if (r < 0)
                return log_error_errno(r, "Cannot set up the broker connection");
        if (m->config->notify_enabled) {
                r = notify_server_new(m->event, m->config,
                                      &(NotifyCallbacks){.notify = on_notify, .status = on_status}, m,
                                      &m->notify);
                if (r < 0)
                        return log_error_errno(r, "Cannot open the notify listener %s",
                                               m->config->notify_listen);
        }
        /* Before READY=1 (manager_run): dsm-agent-syncctl may ask at once. */
        r = control_server_new(m->event, m->config, &notify_callbacks, m, &m->control);
        if (r < 0)
                return log_error_errno(r, "Cannot open the control socket %s", m->config->control_socket);
        (void) updater_sweep(m->config);
        r = updater_new(m->event, m->config, &m->state.update, &updater_callbacks, m, &m->updater);
        if (r < 0)
                return log_error_errno(r, "Cannot set up the updater");
        return 0;
}

int manager_new(Config *config, bool once, Manager **ret) {
        Manager *m;
        int r;

        m = calloc(1, sizeof(*m));
        if (!m) {
                config_free(config);
                return -ENOMEM;
        }
        m->config = config;
        m->once = once;
        m->lock_fd = -1;
        m->gate.state = config->update_enabled ? GATE_NONE : GATE_DISABLED;
        m->hint_bucket = ratelimit_init(HINT_BURST, HINT_RATE, 0);

        r = sd_event_default(&m->event);
        if (r < 0)
                goto fail;
        r = manager_add_signals(m);
        if (r < 0)
                goto fail;
        r = manager_lock_state(m, config->state_file, &m->lock_fd);
        if (r < 0)
                goto fail;
        r = manager_load_state(m);
        if (r < 0)
                goto fail;
        r = manager_add_modules(m);
        if (r < 0)
                goto fail;
        r = sd_event_add_time(m->event, &m->poll_timer, CLOCK_MONOTONIC, USEC_INFINITY, USEC_PER_MSEC,
                              on_poll_timer, m);
        if (r < 0)
                goto fail;
        (void) sd_event_source_set_enabled(m->poll_timer, SD_EVENT_OFF);
        r = sd_event_add_time(m->event, &m->round_deadline, CLOCK_MONOTONIC, USEC_INFINITY, USEC_PER_MSEC,
                              on_round_deadline, m);
        if (r < 0)
                goto fail;
        (void) sd_event_source_set_enabled(m->round_deadline, SD_EVENT_OFF);
        if (!once) {
                r = manager_setup_watchdog(m);
                if (r < 0)
                        goto fail;
        }
        (void) manager_refresh_targets(m);
        *ret = m;
        return 0;
fail:
        manager_free(m);
        return r;
}

Manager *manager_free(Manager *m) {
        if (!m)
                return NULL;
        sd_event_source_disable_unref(m->sigterm);
        sd_event_source_disable_unref(m->sigint);
        sd_event_source_disable_unref(m->sighup);
        sd_event_source_disable_unref(m->poll_timer);
        sd_event_source_disable_unref(m->watchdog_timer);
        sd_event_source_disable_unref(m->once_timer);
        sd_event_source_disable_unref(m->round_deadline);
        updater_free(m->updater);
        notify_server_free(m->notify);
        control_server_free(m->control);
        broker_free(m->broker);
        settings_writer_free(m->settings);
        poller_free(m->poller);
        sd_event_unref(m->event);
        config_free(m->config);
        if (m->lock_fd >= 0)
                close(m->lock_fd);
        free(m);
        return NULL;
}

int manager_run(Manager *m) {
        const Committed *c = &m->state.committed;
        int r;

        /* A committed pair survives restarts: make the file and the broker
         * connection match it before the first round answers. */
        if (c->epoch > 0) {
                (void) settings_writer_apply(m->settings, c);
                if (m->broker)
                        (void) broker_set_target(m->broker, &c->broker);
        }
        manager_start_round(m);
        if (!m->once) {
                (void) sd_notify(false, "READY=1");
                manager_send_status(m);
        }
        r = sd_event_loop(m->event);
        if (r < 0)
                return log_error_errno(r, "Event loop failed");
        return m->once ? m->exit_code : 0;
}
