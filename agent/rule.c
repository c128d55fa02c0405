/* The Primary-following rule of contract section 3.
 *
 * Pure: one poll round's answers and the committed pair in, a verdict out.
 * A round holds a handful of answers (the cluster has at most 4 nodes, the
 * seed list a few more), so everything is done by rescanning the answers
 * instead of building indexes: no allocation, no limits to overflow, and
 * each question ("is this the node's newest answer?", "who is in P's
 * cluster?") stays a small function. */

#include <string.h>

#include "macro.h"
#include "rule.h"

#ifndef streq
#define streq(a, b) (strcmp((a), (b)) == 0)
#endif

/* One candidate pair (E', P') and what the round says about it. */
typedef struct Candidate {
        uint64_t epoch;
        const char *primary_id;
        bool by_primary;
        unsigned supporters, cluster_size;
        unsigned source_agree;       /* supporters reporting exactly source's broker and api_url */
        const ProviderState *source; /* where next's api_url and broker come from */
} Candidate;

static bool answer_counts(const RuleAnswer *a) {
        /* The load balancer answers from any node: discovery only. */
        return a->ok && !a->via_load_balancer && a->state;
}

/* The answer of a node that counts, or NULL. A node asked at two URLs counts
 * once: its answer with the highest epoch wins (the first one on a tie), so
 * that a lagging copy cannot vote twice or outvote the fresh one. */
static const ProviderState *canonical(const RuleAnswer *answers, size_t n, size_t i) {
        const ProviderState *s;

        if (!answer_counts(&answers[i]))
                return NULL;
        s = answers[i].state;
        for (size_t j = 0; j < n; j++) {
                const ProviderState *o;

                if (j == i || !answer_counts(&answers[j]))
                        continue;
                o = answers[j].state;
                if (!streq(o->node.id, s->node.id))
                        continue;
                if (o->epoch > s->epoch || (o->epoch == s->epoch && j < i))
                        return NULL;
        }
        return s;
}

static bool reports(const ProviderState *s, uint64_t epoch, const char *primary_id) {
        return s->epoch == epoch && streq(s->primary.id, primary_id);
}

static bool claims_primary_at(const ProviderState *s, uint64_t epoch) {
        return s->role == NODE_ROLE_PRIMARY && s->epoch == epoch;
}

/* The ids a node names as its cluster: itself first, then its nodes list.
 * Position 0 is node.id, position k+1 is nodes[k]. */
static const char *member_id(const ProviderState *s, size_t pos) {
        return pos == 0 ? s->node.id : s->nodes[pos - 1].id;
}

static size_t member_count(const ProviderState *s) {
        return 1 + s->n_nodes;
}

/* The cluster a majority is counted in (rule 6): every id the daemon knows
 * of, as one enumeration without storage. Position k walks, in order: the
 * known list, then per answer its own id (unless it came through the load
 * balancer, which is no node) and its nodes list, then P' itself. An id
 * counts at its first position only. */
static const char *universe_id(const RuleInput *in, const char *primary_id, size_t k) {
        if (k < in->n_known)
                return in->known[k].id;
        k -= in->n_known;
        for (size_t i = 0; i < in->n_answers; i++) {
                const RuleAnswer *a = &in->answers[i];

                if (!a->ok || !a->state)
                        continue;
                if (k < member_count(a->state)) {
                        if (k == 0 && a->via_load_balancer)
                                return "";
                        return member_id(a->state, k);
                }
                k -= member_count(a->state);
        }
        return k == 0 ? primary_id : NULL;
}

static bool universe_seen_before(const RuleInput *in, const char *primary_id, const char *id, size_t upto) {
        for (size_t k = 0; k < upto; k++)
                if (streq(universe_id(in, primary_id, k), id))
                        return true;
        return false;
}

static unsigned cluster_size(const RuleInput *in, const char *primary_id) {
        unsigned size = 0;
        const char *u;

        for (size_t k = 0; (u = universe_id(in, primary_id, k)); k++)
                if (*u && !universe_seen_before(in, primary_id, u, k))
                        size++;
        return size;
}

/* How many supporters report the same primary api_url and broker as s. */
static unsigned agreeing(const RuleAnswer *answers, size_t n, const Candidate *c, const ProviderState *s) {
        unsigned count = 0;

        for (size_t i = 0; i < n; i++) {
                const ProviderState *o = canonical(answers, n, i);

                if (o && reports(o, c->epoch, c->primary_id) &&
                    streq(o->primary.api_url, s->primary.api_url) &&
                    broker_info_equal(&o->broker, &s->broker))
                        count++;
        }
        return count;
}

/* A fixed order of the broker settings supporters report, to break a tie
 * between two versions the same way whatever order the answers arrived in
 * (the choice is arbitrary; P' itself corrects it, by a broker-only commit,
 * when it answers). */
static int source_compare(const ProviderState *a, const ProviderState *b) {
        int r = strcmp(a->broker.host, b->broker.host);

        if (r == 0)
                r = (int) a->broker.port - (int) b->broker.port;
        if (r == 0)
                r = strcmp(a->broker.vhost, b->broker.vhost);
        if (r == 0)
                r = (int) a->broker.tls - (int) b->broker.tls;
        if (r == 0)
                r = strcmp(a->primary.api_url, b->primary.api_url);
        return r;
}

/* Fills in everything the round says about (epoch, primary_id). The source of
 * the broker settings is P' itself when it answered; otherwise the version
 * most supporters agree on (lagging Standbys may still carry an older one),
 * the first in source_compare() order on a tie; a majority confirms only
 * when that version itself has one (candidate_confirmed). */
static void candidate_evaluate(const RuleInput *in, Candidate *c) {
        const RuleAnswer *answers = in->answers;
        size_t n = in->n_answers;
        unsigned best_agree = 0;

        for (size_t i = 0; i < n; i++) {
                const ProviderState *s = canonical(answers, n, i);
                unsigned agree;

                if (!s || !reports(s, c->epoch, c->primary_id))
                        continue;
                c->supporters++;
                if (streq(s->node.id, c->primary_id) && s->role == NODE_ROLE_PRIMARY) {
                        c->by_primary = true;
                        c->source = s;
                        best_agree = UINT32_MAX;
                        c->source_agree = agreeing(answers, n, c, s);
                        continue;
                }
                agree = agreeing(answers, n, c, s);
                if (agree > best_agree || (agree == best_agree && source_compare(s, c->source) < 0)) {
                        best_agree = agree;
                        c->source = s;
                        c->source_agree = agree;
                }
        }
        c->cluster_size = cluster_size(in, c->primary_id);
}

/* By P' itself, or by a strict majority of the cluster reporting the same
 * pair with the same broker settings: the broker receives the Agent's
 * credentials, so a lone lying Standby must not choose it by breaking a
 * tie (found by the simulation, seed 157). */
static bool candidate_confirmed(const Candidate *c) {
        return c->by_primary || 2 * c->source_agree > c->cluster_size;
}

/* Is answer i the first one to name its (epoch, primary) pair? */
static bool first_of_pair(const RuleAnswer *answers, size_t n, size_t i) {
        const ProviderState *s = answers[i].state;

        for (size_t j = 0; j < i; j++) {
                const ProviderState *o = canonical(answers, n, j);
                if (o && reports(o, s->epoch, s->primary.id))
                        return false;
        }
        return true;
}

/* Another node than primary_id claiming primary at epoch: one answering
 * role=primary there, or another confirmed candidate pair at that epoch. */
static const char *find_rival(const RuleInput *in, uint64_t epoch, const char *primary_id) {
        const RuleAnswer *answers = in->answers;
        size_t n = in->n_answers;

        for (size_t i = 0; i < n; i++) {
                const ProviderState *s = canonical(answers, n, i);
                if (s && claims_primary_at(s, epoch) && !streq(s->node.id, primary_id))
                        return s->node.id;
        }
        for (size_t i = 0; i < n; i++) {
                const ProviderState *s = canonical(answers, n, i);
                Candidate c = {.epoch = epoch};

                if (!s || s->epoch != epoch || streq(s->primary.id, primary_id) ||
                    !first_of_pair(answers, n, i))
                        continue;
                c.primary_id = s->primary.id;
                candidate_evaluate(in, &c);
                if (candidate_confirmed(&c))
                        return s->primary.id;
        }
        return NULL;
}

/* The highest confirmed candidate above the committed epoch (false: none).
 * *ret_unconfirmed gets the highest one that is not confirmed, for logs. */
static bool best_candidate(const RuleInput *in, Candidate *ret, Candidate *ret_unconfirmed) {
        const RuleAnswer *answers = in->answers;
        size_t n = in->n_answers;
        bool found = false;

        for (size_t i = 0; i < n; i++) {
                const ProviderState *s = canonical(answers, n, i);
                Candidate c = {};

                if (!s || s->epoch <= in->current->epoch || !first_of_pair(answers, n, i))
                        continue;
                c.epoch = s->epoch;
                c.primary_id = s->primary.id;
                candidate_evaluate(in, &c);
                if (!candidate_confirmed(&c)) {
                        if (c.epoch > ret_unconfirmed->epoch)
                                *ret_unconfirmed = c;
                        continue;
                }
                if (!found || c.epoch > ret->epoch) {
                        *ret = c;
                        found = true;
                }
        }
        return found;
}

/* Rule 7: the nodes that answered (each once), and whether any of them
 * names another Primary than primary_id, or claims to be one, at an epoch
 * >= epoch. A missing answer could still do that, so an early commit
 * needs a strict majority of the cluster in hand and none of them
 * dissenting. */
static unsigned count_answered(const RuleInput *in) {
        unsigned count = 0;

        for (size_t i = 0; i < in->n_answers; i++)
                if (canonical(in->answers, in->n_answers, i))
                        count++;
        return count;
}

static bool any_dissent(const RuleInput *in, uint64_t epoch, const char *primary_id) {
        for (size_t i = 0; i < in->n_answers; i++) {
                const ProviderState *s = canonical(in->answers, in->n_answers, i);

                if (!s || s->epoch < epoch)
                        continue;
                if (!streq(s->primary.id, primary_id) ||
                    (s->role == NODE_ROLE_PRIMARY && !streq(s->node.id, primary_id)))
                        return true;
        }
        return false;
}

static void set_conflict(RuleResult *r, uint64_t epoch, const char *a, const char *b) {
        /* Sorted, so that the same conflict always reads the same in logs. */
        if (strcmp(a, b) > 0) {
                const char *t = a;
                a = b;
                b = t;
        }
        r->conflict = true;
        r->conflict_epoch = epoch;
        strscpy(r->conflict_a, sizeof(r->conflict_a), a);
        strscpy(r->conflict_b, sizeof(r->conflict_b), b);
}

static void commit_from(RuleResult *r, uint64_t epoch, const ProviderState *s, RuleConfirmation how) {
        r->verdict = RULE_COMMIT;
        r->confirmation = how;
        r->next.epoch = epoch;
        r->next.primary = s->primary;
        r->next.broker = s->broker;
}

/* The same pair with new broker fields (or a new api_url): only P itself,
 * answering as primary at the committed epoch, can tell us. */
static void check_same_pair(const RuleInput *in, RuleResult *r) {
        const Committed *current = in->current;
        const char *rival;

        if (current->epoch == 0)
                return;
        rival = find_rival(in, current->epoch, current->primary.id);
        if (rival) {
                set_conflict(r, current->epoch, current->primary.id, rival);
                return;
        }
        for (size_t i = 0; i < in->n_answers; i++) {
                const ProviderState *s = canonical(in->answers, in->n_answers, i);

                if (!s || !streq(s->node.id, current->primary.id) || !claims_primary_at(s, current->epoch) ||
                    !reports(s, current->epoch, current->primary.id))
                        continue;
                if (broker_info_equal(&s->broker, &current->broker) &&
                    streq(s->primary.api_url, current->primary.api_url))
                        return;
                commit_from(r, current->epoch, s, RULE_CONFIRMED_BY_PRIMARY);
                r->broker_only = true;
                return;
        }
}

/* Every node answering role=primary below the resulting epoch: an old
 * Primary that came back. Reported, never followed. */
static void collect_stale(const RuleInput *in, uint64_t epoch, RuleResult *r) {
        for (size_t i = 0; i < in->n_answers && r->n_stale < RULE_MAX_STALE; i++) {
                const ProviderState *s = canonical(in->answers, in->n_answers, i);

                if (!s || s->role != NODE_ROLE_PRIMARY || s->epoch >= epoch)
                        continue;
                strscpy(r->stale[r->n_stale].node_id, sizeof(r->stale[r->n_stale].node_id), s->node.id);
                r->stale[r->n_stale].epoch = s->epoch;
                r->n_stale++;
        }
}

/* Rule 7, while the round is in flight: commit only what no missing answer
 * can take back. Stale and conflict findings wait for the whole round. */
static void evaluate_partial(const RuleInput *in, RuleResult *ret) {
        Candidate best = {}, unconfirmed = {};

        if (!best_candidate(in, &best, &unconfirmed))
                return;
        ret->supporters = best.supporters;
        ret->cluster_size = best.cluster_size;
        ret->answered = count_answered(in);
        if (!best.by_primary || 2 * ret->answered <= best.cluster_size ||
            any_dissent(in, best.epoch, best.primary_id))
                return;
        commit_from(ret, best.epoch, best.source, RULE_CONFIRMED_BY_PRIMARY);
        ret->early = true;
}

void rule_evaluate(const RuleInput *in, RuleResult *ret) {
        Candidate best = {}, unconfirmed = {};
        const char *rival;

        *ret = (RuleResult){.verdict = RULE_KEEP};

        if (in->partial) {
                evaluate_partial(in, ret);
                return;
        }
        if (best_candidate(in, &best, &unconfirmed)) {
                ret->supporters = best.supporters;
                ret->cluster_size = best.cluster_size;
                rival = find_rival(in, best.epoch, best.primary_id);
                if (rival) {
                        ret->verdict = RULE_CONFLICT;
                        set_conflict(ret, best.epoch, best.primary_id, rival);
                } else
                        commit_from(ret, best.epoch, best.source,
                                    best.by_primary ? RULE_CONFIRMED_BY_PRIMARY
                                                    : RULE_CONFIRMED_BY_MAJORITY);
        } else {
                ret->supporters = unconfirmed.supporters;
                ret->cluster_size = unconfirmed.cluster_size;
        }
        ret->answered = count_answered(in);

        if (ret->verdict == RULE_KEEP)
                check_same_pair(in, ret);

        collect_stale(in, ret->verdict == RULE_COMMIT ? ret->next.epoch : in->current->epoch, ret);
}
