/* The synchronization core (see sync.h): the rule's verdict acted on in the
 * one order that survives a crash at any instant, and the update gate
 * evaluated at every moment it matters. Plain data in; the clock and every
 * effect through SyncIO. */
#include "sync.h"

#include <errno.h>
#include <inttypes.h>
#include <string.h>

#include "log.h"
#include "macro.h"
#include "util.h"

static uint64_t sync_now(const Sync *s, clockid_t clock) {
        return s->io.now(s->io.userdata, clock);
}

void sync_init(Sync *s, const Config *cfg, const SyncIO *io, const PersistentState *loaded, bool once) {
        *s = (Sync){.config = cfg, .io = *io, .once = once};
        if (loaded)
                s->state = *loaded;
        s->gate.state = cfg->update_enabled ? GATE_NONE : GATE_DISABLED;
}

void sync_reconfigure(Sync *s, const Config *cfg) {
        s->config = cfg;
}

int sync_save_state(Sync *s) {
        int r = s->io.state_save(s->io.userdata, &s->state);

        if (r < 0)
                return log_error_errno(r, "Cannot write state file %s", s->config->state_file);
        return 0;
}

/* ---- the round's answers ---- */

static bool answer_counts(const PollAnswer *a) {
        return a->ok && !a->via_load_balancer;
}

/* The committed Primary's own answer at the committed epoch, or NULL. */
static const ProviderState *primary_answer(const Sync *s, const PollRound *round) {
        const Committed *c = &s->state.committed;

        for (size_t i = 0; i < round->n_answers; i++) {
                const PollAnswer *a = &round->answers[i];
                if (answer_counts(a) && strcmp(a->state.node.id, c->primary.id) == 0 &&
                    a->state.role == NODE_ROLE_PRIMARY && a->state.epoch == c->epoch)
                        return &a->state;
        }
        return NULL;
}

static bool known_node(const PersistentState *st, const char *id) {
        for (size_t i = 0; i < st->n_nodes; i++)
                if (strcmp(st->nodes[i].id, id) == 0)
                        return true;
        return false;
}

/* Adds the nodes of list that are not known yet; true when any was. */
static bool add_unknown_nodes(PersistentState *st, const ProviderState *list) {
        bool added = false;

        for (size_t i = 0; i < list->n_nodes && st->n_nodes < PROVIDER_NODES_MAX; i++)
                if (!known_node(st, list->nodes[i].id)) {
                        st->nodes[st->n_nodes++] = list->nodes[i];
                        added = true;
                }
        return added;
}

/* The cluster's node list: the committed Primary's own answer replaces it
 * (a node may leave the cluster only by the Primary's word); a node that
 * follows it may only add nodes to it. Rule 6 counts majorities in this
 * list, so a follower that lists itself alone must not shrink it (found by
 * the simulation, seed 828: a known cluster of four cut to one, and the
 * next promotion never seen). Returns true when it changed. */
static bool sync_learn_nodes(Sync *s, const PollRound *round) {
        const Committed *c = &s->state.committed;
        const ProviderState *own = primary_answer(s, round);
        bool changed = false;

        if (own) {
                if (own->n_nodes == 0 ||
                    (own->n_nodes == s->state.n_nodes &&
                     memcmp(own->nodes, s->state.nodes, own->n_nodes * sizeof(NodeRef)) == 0))
                        return false;
                memcpy(s->state.nodes, own->nodes, own->n_nodes * sizeof(NodeRef));
                s->state.n_nodes = own->n_nodes;
                return true;
        }
        for (size_t i = 0; i < round->n_answers; i++) {
                const PollAnswer *a = &round->answers[i];
                if (answer_counts(a) && a->state.epoch == c->epoch &&
                    strcmp(a->state.primary.id, c->primary.id) == 0)
                        changed |= add_unknown_nodes(&s->state, &a->state);
        }
        return changed;
}

static void sync_rule(const Sync *s, const PollRound *round, bool partial, RuleResult *ret) {
        RuleAnswer answers[64];
        size_t n = 0;

        for (size_t i = 0; i < round->n_answers && n < ELEMENTSOF(answers); i++) {
                const PollAnswer *a = &round->answers[i];
                answers[n++] = (RuleAnswer){
                        .via_load_balancer = a->via_load_balancer, .ok = a->ok, .state = &a->state};
        }
        rule_evaluate(&(RuleInput){.current = &s->state.committed,
                                   .known = s->state.nodes,
                                   .n_known = s->state.n_nodes,
                                   .answers = answers,
                                   .n_answers = n,
                                   .partial = partial},
                      ret);
}

static void note_change(Sync *s, const Committed *old, const Committed *c) {
        uint64_t now = sync_now(s, CLOCK_MONOTONIC);

        s->changes++;
        s->last_change_usec = sync_now(s, CLOCK_REALTIME);
        if (old->epoch == 0 || strcmp(old->primary.id, c->primary.id) == 0)
                return;
        if (s->n_change_times == SYNC_MAX_CHANGE_TIMES) {
                memmove(s->change_times, s->change_times + 1,
                        (SYNC_MAX_CHANGE_TIMES - 1) * sizeof(s->change_times[0]));
                s->n_change_times--;
        }
        s->change_times[s->n_change_times++] = now;
}

/* The order is the point: the epoch fence is durable before anything acts
 * on the new pair, so a crash at any instant restarts at this epoch or the
 * old one with the old file, never with a file ahead of the fence. Without
 * the state file nothing moves (retried next round). */
static void sync_commit(Sync *s, const PollRound *round, const RuleResult *res) {
        const Committed *c = &res->next;
        Committed old = s->state.committed;
        PersistentState prev = s->state;

        s->state.committed = *c;
        (void) sync_learn_nodes(s, round);
        if (sync_save_state(s) < 0) {
                s->state = prev;
                s->state_save_failed = true;
                return;
        }
        s->state_save_failed = false;

        log_struct(LOG_NOTICE, 0, MID_PRIMARY_COMMITTED,
                   &(LogFields){.epoch = c->epoch,
                                .primary_id = c->primary.id,
                                .reason = res->broker_only ? "broker_changed"
                                          : res->confirmation == RULE_CONFIRMED_BY_PRIMARY
                                                  ? "confirmed_by_primary"
                                                  : "confirmed_by_majority"},
                   "Primary %s committed at epoch %" PRIu64 " (was %s at %" PRIu64
                   "), broker %s:%u vhost %s%s%s",
                   c->primary.id, c->epoch, old.epoch ? old.primary.id : "none", old.epoch, c->broker.host,
                   c->broker.port, c->broker.vhost, c->broker.tls ? " tls" : "",
                   res->early ? " (before the round ended)" : "");
        note_change(s, &old, c);
        if (!res->broker_only) {
                /* The offer and the agreement were the old Primary's: the
                 * gate waits for a whole round of the new one (found by the
                 * simulation, seed 1244: a download that ended between an
                 * early commit and the round's end ran the command on the
                 * old Primary's round). */
                s->have_offer = false;
                s->agreeing_rounds = 0;
                s->agreeing_version[0] = 0;
                s->n_nodes = 0;
        }
        s->io.settings_apply(s->io.userdata, c);
        s->io.broker_move(s->io.userdata, &c->broker);
}

bool sync_round_progress(Sync *s, const PollRound *round) {
        RuleResult res;

        sync_rule(s, round, true, &res);
        if (res.verdict != RULE_COMMIT)
                return false;
        sync_commit(s, round, &res);
        return !s->state_save_failed;
}

/* ---- the update gate ---- */

/* Fills s->nodes from this round and counts the consecutive rounds in which
 * every node answered directly with the offered version. Counting starts
 * with the first round that sees the offer (contract 8); rounds closer
 * together than half a poll interval (an event burst) count once. */
static void sync_count_agreement(Sync *s, const PollRound *round) {
        const AgentUpdate *offer = s->have_offer ? &s->offer : NULL;
        uint64_t now = sync_now(s, CLOCK_MONOTONIC);
        bool agree = offer && s->state.n_nodes > 0;

        s->n_nodes = s->state.n_nodes;
        for (size_t i = 0; i < s->state.n_nodes; i++) {
                const NodeRef *node = &s->state.nodes[i];
                const PollAnswer *hit = NULL;
                GateNode *g = &s->nodes[i];

                for (size_t j = 0; j < round->n_answers && !hit; j++) {
                        const PollAnswer *a = &round->answers[j];
                        if (answer_counts(a) && strcmp(a->url, node->api_url) == 0 &&
                            strcmp(a->state.node.id, node->id) == 0)
                                hit = a;
                }
                *g = (GateNode){.answered_direct = hit != NULL};
                strscpy(g->id, sizeof(g->id), node->id);
                if (hit)
                        strscpy(g->version, sizeof(g->version), hit->state.version);
                if (!hit || !offer || strcmp(g->version, offer->version) != 0)
                        agree = false;
        }
        if (!agree) {
                s->agreeing_rounds = 0;
                s->agreeing_version[0] = 0;
                return;
        }
        if (strcmp(s->agreeing_version, offer->version) != 0) {
                strscpy(s->agreeing_version, sizeof(s->agreeing_version), offer->version);
                s->agreeing_rounds = 0;
        }
        if (s->agreeing_rounds == 0 || now - s->agreement_counted_usec >= s->config->poll_interval / 2) {
                s->agreeing_rounds++;
                s->agreement_counted_usec = now;
        }
}

/* The random delay is drawn once per offered version and kept across restarts. */
static void sync_draw_delay(Sync *s) {
        UpdateRecord *u = &s->state.update;

        if (!s->have_offer || !s->config->update_enabled || strcmp(u->delay_version, s->offer.version) == 0)
                return;
        strscpy(u->delay_version, sizeof(u->delay_version), s->offer.version);
        u->delay_not_before_usec =
                sync_now(s, CLOCK_REALTIME) + (uint64_t) (random_unit() * (double) s->config->max_delay);
        (void) sync_save_state(s);
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

/* The gate now: the latest round's answers, with the clock, the config and
 * the settings writer as they are at this moment. */
static void sync_gate_now(Sync *s) {
        const Config *c = s->config;
        GateResult res;

        s->io.read_installed(s->io.userdata, s->installed_version, sizeof(s->installed_version));
        GateInput in = {
                .enabled = c->update_enabled,
                .offer = s->have_offer ? &s->offer : NULL,
                .installed = s->installed_version,
                .applied = s->state.update.applied_version,
                .nodes = s->nodes,
                .n_nodes = s->n_nodes,
                .agreeing_rounds = s->agreeing_rounds,
                .stable_rounds = c->stable_rounds,
                .settings_busy = s->io.settings_busy(s->io.userdata),
                .now_usec = sync_now(s, CLOCK_REALTIME),
                .window_set = c->window_set,
                .window_start_min = c->window_start_min,
                .window_end_min = c->window_end_min,
                .delay_not_before_usec = s->state.update.delay_not_before_usec,
        };
        gate_evaluate(&in, &res);
        if ((res.state == GATE_HELD || res.state == GATE_WAITING) && !gate_result_same(&s->gate, &res))
                log_struct(LOG_INFO, 0, MID_UPDATE_HELD,
                           &(LogFields){.version = s->have_offer ? s->offer.version : NULL,
                                        .reason = res.reason},
                           "Agent update %s %s: %s%s", s->have_offer ? s->offer.version : "",
                           gate_state_to_string(res.state), res.reason,
                           strncmp(res.reason, "version_skew:", 13) == 0
                                   ? " (applied once every Provider node runs the same version: finish the "
                                     "Provider update)"
                                   : "");
        s->gate = res;
}

/* Open gate: apply a verified package of this offer, or start fetching it. */
static void sync_act_on_gate(Sync *s) {
        UpdaterPhase phase;
        int r;

        if (s->once || s->gate.state != GATE_OPEN || !s->have_offer)
                return;
        phase = s->io.update_phase(s->io.userdata);
        if (phase == UPDATER_READY) {
                r = s->io.update_apply(s->io.userdata, &s->offer);
                if (r != -ESTALE)
                        return;
                /* The verified package is of another offer: fetch this one. */
        } else if (phase == UPDATER_DOWNLOADING || phase == UPDATER_APPLYING)
                return;
        r = s->io.update_fetch(s->io.userdata, &s->offer, s->state.committed.primary.api_url);
        /* A refused offer is refused again every round: say it once per version. */
        if (r < 0 && r != -EAGAIN && r != -EBUSY &&
            strcmp(s->refused_update_version, s->offer.version) != 0) {
                log_struct(LOG_WARNING, r, MID_UPDATE_FAILED,
                           &(LogFields){.version = s->offer.version, .reason = "refused"},
                           "Cannot start the agent update %s", s->offer.version);
                strscpy(s->refused_update_version, sizeof(s->refused_update_version), s->offer.version);
        }
}

static void sync_evaluate_gate(Sync *s, const PollRound *round) {
        const ProviderState *primary = primary_answer(s, round);

        /* The offer is the committed Primary's, at the committed epoch,
         * computed once per round; the status document reads it. */
        s->have_offer = primary && primary->update.present;
        if (s->have_offer)
                s->offer = primary->update;
        sync_count_agreement(s, round);
        sync_draw_delay(s);
        sync_gate_now(s);
        sync_act_on_gate(s);
}

void sync_round_done(Sync *s, const PollRound *round, RuleResult *ret_rule) {
        RuleResult res;

        sync_rule(s, round, false, &res);
        if (res.verdict == RULE_COMMIT)
                sync_commit(s, round, &res);
        else if (s->state.committed.epoch > 0) {
                PersistentState prev = s->state;
                /* Memory never runs ahead of the file: a failed save undoes it. */
                if (sync_learn_nodes(s, round) && sync_save_state(s) < 0)
                        s->state = prev;
        }
        s->last_rule = res;
        if (s->state.committed.epoch > 0)
                sync_evaluate_gate(s, round);
        if (ret_rule)
                *ret_rule = res;
}

void sync_update_ready(Sync *s, const AgentUpdate *verified) {
        /* Contract 8: every condition holds at the moment the command
         * starts, not only when the download began. Closed, the package
         * stays kept, and the round that finds the gate open applies it. */
        sync_gate_now(s);
        if (s->gate.state != GATE_OPEN)
                log_info("Agent update %s verified and kept, not applied now: update %s%s%s",
                         verified->version, gate_state_to_string(s->gate.state),
                         s->gate.reason[0] ? ": " : "", s->gate.reason);
        sync_act_on_gate(s);
}

void sync_update_changed(Sync *s) {
        (void) sync_save_state(s);
        s->io.read_installed(s->io.userdata, s->installed_version, sizeof(s->installed_version));
}
