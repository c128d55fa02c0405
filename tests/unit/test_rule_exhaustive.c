/* An exhaustive check of the Primary-following rule (contract section 3,
 * rules 1-7) against the real agent/rule.c: every combination of answers
 * of small clusters, each verdict checked against invariants that this
 * file computes on its own, from the contract, on its own plain view of the
 * answers (bit masks of node indexes). Nothing of rule.c is called but
 * rule_evaluate().
 *
 * The space. A cluster of n nodes p1..pn (n = 2, 3, 4) plus a load
 * balancer; the committed pair is (E, P) with E = 7 (and E = 0, nothing
 * committed, in the sample); the state file's `known` list is full or
 * empty; every answer set is evaluated complete (partial=false) and in
 * flight (partial=true); a case is one such evaluation. Each node answers
 * at most once, at its own endpoint: no answer, a failed read (ok=false,
 * carrying a tempting document: role=primary at E+2 naming itself, which
 * must be ignored), or a document: role {primary, standby} x epoch
 * {E-1, E, E+1, E+2} x the Primary it names (any of p1..pn) x its nodes list
 * {full, partial (full minus its predecessor), empty, self-only}; plus the
 * documents reporting (E, pj) with new broker fields (role x list), the
 * only way a broker-only commit can arise. The load balancer: no answer, a
 * failed read, or any node's document.
 *
 * Two reductions hold in every exhaustive pass below:
 *  - with `known` full, rule 6 makes the cluster all n nodes whatever the
 *    nodes lists say, so the lists cannot matter to a correct rule: they
 *    are fixed empty, the shape that broke the old rule (defect 1); with
 *    `known` empty every list is enumerated;
 *  - new broker fields only for the committed pair (E, P): for any other
 *    pair they are just another version of the same candidate.
 * What is exhaustive (every element of the set, no sampling):
 *   n=2: every answer of both nodes x every answer of the load balancer
 *        (relaying either node's document) x known full/empty, committed
 *        (7, p1) (the alphabet is symmetric under p1 <-> p2).
 *   n=3: every answer of the three nodes x known full/empty, committed
 *        (7, p1), no load balancer answer (covered by n=2 and the sample;
 *        invariant 4 shows its answer acts only through its nodes list).
 *   n=4: every answer of the four nodes, known full, committed (7, p1), no
 *        load balancer answer. Node ids p2..p4 are interchangeable (p1 is
 *        fixed, the alphabet is closed under renaming p2..p4, and the
 *        verdict does not depend on answer order: invariant 8), so only
 *        the smallest tuple of each orbit of the 6 renamings is evaluated.
 * What is sampled (fixed seed, reproducible): the whole space for n = 2, 3,
 * 4 with every field free (every list with known full or empty, the load
 * balancer relaying any node's document, new broker fields for any pair,
 * committed epoch 0 or 7 with any committed Primary), each case also
 * evaluated with its answers permuted (invariant 8) and without its load
 * balancer answer (invariant 4). A node answering twice (asked at two
 * URLs) is outside the space: the contract does not say which answer
 * counts.
 *
 * The invariants, checked on every verdict (numbers as printed):
 *  1 epoch: a commit is above the committed epoch, or a broker-only commit
 *    of the same pair justified by P's own answer as Primary at E.
 *  2 confirmation: a commit (E', P') has P''s own confirmation (a non-LB ok
 *    answer from P' as primary at E' naming itself) or a strict majority of
 *    the rule-6 cluster (the known ids, the non-LB answering nodes, every
 *    ok answer's nodes list, P') reporting (E', P') with the same broker
 *    settings (the simulation found a lying Standby choosing the broker on
 *    a tie); the broker and api_url
 *    committed are ones a supporter reported (P''s own when it answered).
 *  3 conflict: no commit while another node claims primary at the winning
 *    epoch (role=primary there, or a confirmed other pair there); a
 *    reported conflict is real; a conflict at the deciding epoch is
 *    reported (rule 4).
 *  4 load balancer: the justifications above count non-LB answers only;
 *    and the answer set with the load balancer's answer gives exactly the
 *    result of the same set without it and with its nodes list added to
 *    `known`. So the load balancer acts only through discovery: whatever it
 *    says about roles, epochs and Primaries (e.g. supporting a candidate)
 *    changes nothing, and its nodes list can only grow the cluster, which
 *    never creates a commit (it can only take a majority away).
 *  5 stale: every node answering role=primary below the resulting epoch
 *    is reported once, with its epoch, by the complete evaluation, nothing
 *    else is; a stale pair is never committed (by 1).
 *  6 rule 7: a partial round commits only when P' confirmed itself, a
 *    strict majority of the rule-6 cluster answered (non-LB, ok, distinct)
 *    and no answer in hand names another Primary or claims primary for
 *    another node at an epoch >= E'; what it commits is what the complete
 *    evaluation of the same answers commits; it reports no stale, no
 *    conflict, and never a conflict verdict.
 *  7 liveness: when the highest confirmed epoch above E has one claimant
 *    (one confirmed pair, no other node claiming primary there), the
 *    complete round commits that pair, and a commit is always at that
 *    epoch (so: P' answering primary at E' > E with no rival claim and no
 *    answer naming another Primary at >= E' is followed, at E' or at a
 *    higher epoch of P' itself); a broker change confirmed by P with no
 *    rival at E is committed; a partial round commits when rule 7 allows
 *    it and the pair is the highest confirmed one (when a majority reports
 *    P' at a higher epoch than P' itself does, the round's decision is that
 *    majority-confirmed pair, which rule 7 does not commit early).
 *  8 order: permuting the answers changes nothing (sampled: every 61st
 *    set of the exhaustive passes, every set of the sample); only which
 *    two nodes a conflict names may differ when three or more claim one
 *    epoch.
 *
 * A violation prints the case as a test_rule.c table row (replayable), the
 * verdict and the invariant, and the test fails. */

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cmocka.h>

#include "macro.h"
#include "rule.h"

#define CUR_EPOCH 7
#define EPOCH_LO  (CUR_EPOCH - 1) /* answers carry E-1 .. E+2 */
#define N_EPOCHS  4
#define MAX_N     4
#define MAX_SLOTS (MAX_N + 1) /* one answer per node and the load balancer's */

#ifndef streq
#define streq(a, b) (strcmp((a), (b)) == 0)
#endif

enum { LIST_FULL, LIST_PARTIAL, LIST_EMPTY, LIST_SELF, N_LISTS };
enum { KIND_NONE, KIND_ERROR, KIND_OK };
enum { SYM_NONE, SYM_ERROR, SYM_CONTENT }; /* SYM_CONTENT + c: document c */

/* ---- the checker's own view of an answer ---- */

typedef struct Spec {
        uint8_t kind;
        bool lb;        /* asked through the load balancer */
        uint8_t id;     /* whose document it is: node index, p1 is 0 */
        bool role_p;    /* role = primary */
        uint64_t epoch; /* EPOCH_LO .. EPOCH_LO + 3 */
        uint8_t primary;
        uint8_t list;
        unsigned nodes;  /* its nodes list as a bit mask */
        bool new_broker; /* reports new broker fields for its Primary */
        const ProviderState *state;
} Spec;

typedef struct Case {
        unsigned n;
        uint64_t cur_epoch; /* 0: nothing committed */
        uint8_t cur_primary;
        unsigned known; /* bit mask */
        bool partial;
        Spec ans[MAX_SLOTS];
        size_t n_ans;
} Case;

static unsigned bit(unsigned i) {
        return 1u << i;
}

static unsigned full_mask(unsigned n) {
        return (1u << n) - 1;
}

static unsigned popcount(unsigned m) {
        return (unsigned) __builtin_popcount(m);
}

static unsigned list_mask(unsigned n, unsigned self, unsigned list) {
        switch (list) {
        case LIST_FULL:
                return full_mask(n);
        case LIST_PARTIAL:
                return full_mask(n) & ~bit((self + n - 1) % n);
        case LIST_EMPTY:
                return 0;
        default:
                return bit(self);
        }
}

/* Documents of node k in a cluster of n: c < 32n is role x epoch x Primary x
 * list; the 8n after it report (E, pj) with new broker fields, role x list. */
static unsigned n_contents(unsigned n) {
        return 40 * n;
}

static Spec content_spec(unsigned n, unsigned k, unsigned c) {
        Spec s = {.kind = KIND_OK, .id = k};

        if (c < 32 * n) {
                s.list = c % N_LISTS;
                c /= N_LISTS;
                s.primary = c % n;
                c /= n;
                s.epoch = EPOCH_LO + c % N_EPOCHS;
                s.role_p = c / N_EPOCHS;
        } else {
                c -= 32 * n;
                s.list = c % N_LISTS;
                c /= N_LISTS;
                s.role_p = c % 2;
                s.primary = c / 2;
                s.epoch = CUR_EPOCH;
                s.new_broker = true;
        }
        s.nodes = list_mask(n, k, s.list);
        return s;
}

/* ---- the ProviderState documents handed to rule.c, built once per n ---- */

/* docs[n][k * n_contents(n) + c]: node k's document c in a cluster of n. */
static ProviderState *docs[MAX_N + 1];

static void node_name(char *dst, size_t size, unsigned i) {
        snprintf(dst, size, "p%u", i + 1);
}

static void node_ref(NodeRef *r, unsigned i) {
        node_name(r->id, sizeof(r->id), i);
        snprintf(r->api_url, sizeof(r->api_url), "https://p%u.example:8443", i + 1);
}

static void broker_of(BrokerInfo *b, unsigned primary, bool new_broker) {
        snprintf(b->host, sizeof(b->host), "p%u%s.example", primary + 1, new_broker ? "-new" : "");
        b->port = 5671;
        snprintf(b->vhost, sizeof(b->vhost), "/dsm");
        b->tls = true;
}

static void docs_build(unsigned n) {
        if (docs[n])
                return;
        docs[n] = calloc((size_t) n * n_contents(n), sizeof(ProviderState));
        assert_non_null(docs[n]);
        for (unsigned k = 0; k < n; k++)
                for (unsigned c = 0; c < n_contents(n); c++) {
                        ProviderState *d = &docs[n][k * n_contents(n) + c];
                        Spec s = content_spec(n, k, c);

                        node_ref(&d->node, k);
                        d->role = s.role_p ? NODE_ROLE_PRIMARY : NODE_ROLE_STANDBY;
                        snprintf(d->version, sizeof(d->version), "9.0.1");
                        d->epoch = s.epoch;
                        node_ref(&d->primary, s.primary);
                        broker_of(&d->broker, s.primary, s.new_broker);
                        for (unsigned j = 0; j < n; j++)
                                if (s.nodes & bit(j))
                                        node_ref(&d->nodes[d->n_nodes++], j);
                }
}

/* The document a failed read of node k carries: role=primary at E+2 naming
 * itself, full list. rule.c must not look at it. */
static unsigned tempting_content(unsigned n, unsigned k) {
        return LIST_FULL + N_LISTS * (k + n * ((N_EPOCHS - 1) + N_EPOCHS * 1));
}

static Spec symbol_spec(unsigned n, unsigned k, unsigned sym, bool lb) {
        Spec s = {.kind = KIND_NONE};

        if (sym == SYM_ERROR) {
                s = content_spec(n, k, tempting_content(n, k));
                s.kind = KIND_ERROR;
        } else if (sym >= SYM_CONTENT) {
                s = content_spec(n, k, sym - SYM_CONTENT);
                s.state = &docs[n][k * n_contents(n) + sym - SYM_CONTENT];
        }
        if (s.kind == KIND_ERROR)
                s.state = &docs[n][k * n_contents(n) + tempting_content(n, k)];
        s.lb = lb;
        return s;
}

/* The load balancer's symbols: none, error, then node k's document c at
 * SYM_CONTENT + k * n_contents(n) + c. */
static Spec lb_spec(unsigned n, unsigned sym) {
        if (sym < SYM_CONTENT)
                return symbol_spec(n, 0, sym, true);
        sym -= SYM_CONTENT;
        return symbol_spec(n, sym / n_contents(n), SYM_CONTENT + sym % n_contents(n), true);
}

/* ---- running rule.c on a case ---- */

static void known_refs(const Case *c, NodeRef *refs, size_t *n_refs) {
        *n_refs = 0;
        for (unsigned j = 0; j < c->n; j++)
                if (c->known & bit(j))
                        node_ref(&refs[(*n_refs)++], j);
}

static void committed_of(const Case *c, Committed *cur) {
        memset(cur, 0, sizeof(*cur));
        cur->epoch = c->cur_epoch;
        if (c->cur_epoch == 0)
                return;
        node_ref(&cur->primary, c->cur_primary);
        broker_of(&cur->broker, c->cur_primary, false);
}

static unsigned long evaluations;

static void evaluate(const Case *c, bool partial, RuleResult *r) {
        RuleAnswer answers[MAX_SLOTS];
        NodeRef known[MAX_N];
        size_t n_known;
        Committed cur;

        committed_of(c, &cur);
        known_refs(c, known, &n_known);
        for (size_t i = 0; i < c->n_ans; i++)
                answers[i] = (RuleAnswer){
                        .via_load_balancer = c->ans[i].lb,
                        .ok = c->ans[i].kind == KIND_OK,
                        .state = c->ans[i].state,
                };
        rule_evaluate(&(RuleInput){.current = &cur,
                                   .known = known,
                                   .n_known = n_known,
                                   .answers = answers,
                                   .n_answers = c->n_ans,
                                   .partial = partial},
                      r);
        evaluations++;
}

/* ---- printing a case, replayable as a test_rule.c row ---- */

static void format_mask(char *buf, size_t size, unsigned m) {
        size_t off = 0;

        buf[0] = 0;
        for (unsigned j = 0; j < MAX_N && off < size; j++)
                if (m & bit(j))
                        off += (size_t) snprintf(buf + off, size - off, "%sp%u", off ? " " : "", j + 1);
}

static const char *verdict_name(RuleVerdict v) {
        return v == RULE_COMMIT ? "RULE_COMMIT" : v == RULE_CONFLICT ? "RULE_CONFLICT" : "RULE_KEEP";
}

static void print_result(const char *what, const RuleResult *r) {
        printf("    %s: %s", what, verdict_name(r->verdict));
        if (r->verdict == RULE_COMMIT)
                printf(" (%llu, %s, broker %s)%s%s%s", (unsigned long long) r->next.epoch,
                       r->next.primary.id, r->next.broker.host,
                       r->confirmation == RULE_CONFIRMED_BY_PRIMARY ? " by primary" : " by majority",
                       r->broker_only ? " broker-only" : "", r->early ? " early" : "");
        printf(" supporters=%u cluster=%u answered=%u stale=[", r->supporters, r->cluster_size, r->answered);
        for (size_t i = 0; i < r->n_stale; i++)
                printf("%s%s@%llu", i ? " " : "", r->stale[i].node_id,
                       (unsigned long long) r->stale[i].epoch);
        printf("]");
        if (r->conflict)
                printf(" conflict=%s/%s@%llu", r->conflict_a, r->conflict_b,
                       (unsigned long long) r->conflict_epoch);
        printf("\n");
}

static void print_case(const Case *c) {
        char buf[64];

        printf("    {.name = \"rule_exhaustive n=%u\", .cur_epoch = %llu, .cur_primary = ", c->n,
               (unsigned long long) c->cur_epoch);
        if (c->cur_epoch)
                printf("\"p%u\"", c->cur_primary + 1);
        else
                printf("NULL");
        format_mask(buf, sizeof(buf), c->known);
        printf(", .known = %s%s%s, .partial = %s,\n     .ans = {", c->known ? "\"" : "",
               c->known ? buf : "NULL", c->known ? "\"" : "", c->partial ? "true" : "false");
        for (size_t i = 0; i < c->n_ans; i++) {
                const Spec *s = &c->ans[i];

                format_mask(buf, sizeof(buf), s->nodes);
                printf("%s\n             A(\"p%u\", '%c', %llu, \"p%u\", .nodes = \"%s\"", i ? "," : "",
                       s->id + 1, s->role_p ? 'P' : 'S', (unsigned long long) s->epoch, s->primary + 1, buf);
                if (s->lb || s->kind == KIND_ERROR)
                        printf(", .flags = %s%s%s", s->lb ? "LB" : "",
                               s->lb && s->kind == KIND_ERROR ? " | " : "",
                               s->kind == KIND_ERROR ? "FAIL" : "");
                if (s->new_broker)
                        printf(", .host = \"p%u-new.example\"", s->primary + 1);
                printf(")");
        }
        printf("}},\n");
}

/* ---- failures, counted per invariant ---- */

#define N_INV       9
#define PRINT_LIMIT 3

static const char *const inv_names[N_INV] = {
        [1] = "epoch", [2] = "confirmation", [3] = "conflict", [4] = "load balancer",
        [5] = "stale", [6] = "rule 7",       [7] = "liveness", [8] = "order",
};
static unsigned long failures[N_INV];

/* For invariants 4 and 8: the result the verdict is compared with. */
static const RuleResult *fail_other;
static const char *fail_other_label;

static void fail_case(unsigned inv, const Case *c, const RuleResult *r, const char *fmt, ...) {
        va_list ap;

        if (failures[inv]++ >= PRINT_LIMIT)
                return;
        printf("VIOLATION of invariant %u (%s): ", inv, inv_names[inv]);
        va_start(ap, fmt);
        vprintf(fmt, ap);
        va_end(ap);
        printf("\n");
        print_case(c);
        print_result(c->partial ? "partial verdict" : "verdict", r);
        if (fail_other)
                print_result(fail_other_label, fail_other);
        fflush(stdout);
}

/* ---- what the answers say, computed from the Spec view only ---- */

typedef struct Facts {
        unsigned n;
        uint64_t cur_epoch;
        unsigned cur_primary;
        unsigned answered;                 /* nodes with a non-LB ok answer */
        unsigned universe;                 /* rule 6 without P': known, answered, every ok nodes list */
        unsigned claim[N_EPOCHS];          /* nodes answering role=primary at the epoch */
        unsigned support[N_EPOCHS][MAX_N]; /* nodes reporting (epoch, pj) */
        /* ... split by the broker they report (0: the usual one, 1: "new") */
        unsigned support_b[N_EPOCHS][MAX_N][2];
        unsigned self[N_EPOCHS]; /* pj answered role=primary at the epoch naming itself */
        const Spec *own[MAX_N];  /* each node's own non-LB ok answer */
        bool estar_found;
        unsigned estar; /* highest confirmed epoch above the committed one (index) */
} Facts;

static unsigned cluster(const Facts *f, unsigned j) {
        return f->universe | bit(j);
}

/* A strict majority of the cluster reporting the pair with the same broker
 * settings (the broker receives the Agent's credentials: a pair whose
 * supporters split on it is not confirmed by them). */
static bool by_majority(const Facts *f, unsigned e, unsigned j) {
        unsigned size = popcount(cluster(f, j));

        return 2 * popcount(f->support_b[e][j][0]) > size || 2 * popcount(f->support_b[e][j][1]) > size;
}

static bool confirmed(const Facts *f, unsigned e, unsigned j) {
        return (f->self[e] & bit(j)) || by_majority(f, e, j);
}

static uint64_t epoch_of(unsigned e) {
        return EPOCH_LO + e;
}

/* Who claims primary at epoch e: answering role=primary there, the primary
 * of a confirmed pair there, and at the committed epoch the committed
 * Primary. Two or more: a conflict (rule 4). */
static unsigned rivals(const Facts *f, unsigned e) {
        unsigned m = f->claim[e];

        for (unsigned j = 0; j < f->n; j++)
                if (confirmed(f, e, j))
                        m |= bit(j);
        if (f->cur_epoch && epoch_of(e) == f->cur_epoch)
                m |= bit(f->cur_primary);
        return m;
}

static void facts_compute(const Case *c, Facts *f) {
        memset(f, 0, sizeof(*f));
        f->n = c->n;
        f->cur_epoch = c->cur_epoch;
        f->cur_primary = c->cur_primary;
        f->universe = c->known;
        for (size_t i = 0; i < c->n_ans; i++) {
                const Spec *s = &c->ans[i];
                unsigned e = (unsigned) (s->epoch - EPOCH_LO);

                if (s->kind != KIND_OK)
                        continue;
                f->universe |= s->nodes;
                if (s->lb)
                        continue;
                f->answered |= bit(s->id);
                f->universe |= bit(s->id);
                f->own[s->id] = s;
                f->support[e][s->primary] |= bit(s->id);
                f->support_b[e][s->primary][s->new_broker ? 1 : 0] |= bit(s->id);
                if (s->role_p)
                        f->claim[e] |= bit(s->id);
                if (s->role_p && s->primary == s->id)
                        f->self[e] |= bit(s->id);
        }
        for (unsigned e = 0; e < N_EPOCHS; e++) {
                if (epoch_of(e) <= c->cur_epoch)
                        continue;
                for (unsigned j = 0; j < c->n; j++)
                        if (confirmed(f, e, j)) {
                                f->estar_found = true;
                                f->estar = e;
                        }
        }
}

static int node_index(const Facts *f, const char *id) {
        for (unsigned j = 0; j < f->n; j++) {
                char name[16];

                node_name(name, sizeof(name), j);
                if (streq(name, id))
                        return (int) j;
        }
        return -1;
}

/* Another node than j naming another Primary, or claiming primary, at an
 * epoch >= e, among the answers in hand (rule 7). */
static bool dissent(const Facts *f, unsigned e, unsigned j) {
        for (unsigned k = 0; k < f->n; k++) {
                const Spec *s = f->own[k];

                if (s && s->epoch >= epoch_of(e) && (s->primary != j || (s->role_p && s->id != j)))
                        return true;
        }
        return false;
}

/* ---- the invariants on one complete verdict ---- */

static bool broker_matches(const BrokerInfo *b, unsigned j, bool new_broker) {
        BrokerInfo want = {};

        broker_of(&want, j, new_broker);
        return broker_info_equal(b, &want);
}

/* The broker and api_url of a commit of (e, j) come from a supporter; from
 * P' itself when it confirmed itself. */
static bool source_ok(const Facts *f, const RuleResult *r, unsigned e, unsigned j) {
        NodeRef want = {};

        node_ref(&want, j);
        if (!streq(r->next.primary.api_url, want.api_url))
                return false;
        if (f->self[e] & bit(j))
                return broker_matches(&r->next.broker, j, f->own[j]->new_broker);
        for (unsigned k = 0; k < f->n; k++)
                if ((f->support[e][j] & bit(k)) && broker_matches(&r->next.broker, j, f->own[k]->new_broker))
                        return true;
        return false;
}

static void check_commit(const Case *c, const Facts *f, const RuleResult *r) {
        int j = node_index(f, r->next.primary.id);
        unsigned e;

        if (j < 0 || r->next.epoch < EPOCH_LO || r->next.epoch >= EPOCH_LO + N_EPOCHS) {
                fail_case(2, c, r, "commit of a pair no answer reported");
                return;
        }
        e = (unsigned) (r->next.epoch - EPOCH_LO);
        if (r->broker_only) {
                const Spec *p = f->own[j];

                if (r->next.epoch != c->cur_epoch || (unsigned) j != c->cur_primary || !p || !p->role_p ||
                    p->epoch != c->cur_epoch || p->primary != (unsigned) j || !p->new_broker ||
                    !broker_matches(&r->next.broker, j, true))
                        fail_case(1, c, r,
                                  "broker-only commit not justified by P's own answer as primary at E");
                if (rivals(f, e) != bit(j))
                        fail_case(3, c, r, "broker-only commit while another node claims primary at E");
                return;
        }
        if (r->next.epoch <= c->cur_epoch)
                fail_case(1, c, r, "commit at an epoch at or below the committed one");
        if (!confirmed(f, e, j))
                fail_case(2, c, r, "commit without P''s confirmation or a strict majority (%u of %u)",
                          popcount(f->support[e][j]), popcount(cluster(f, j)));
        else if (!source_ok(f, r, e, j))
                fail_case(2, c, r, "committed api_url/broker not reported by a supporter (P''s own first)");
        if ((r->confirmation == RULE_CONFIRMED_BY_PRIMARY && !(f->self[e] & bit(j))) ||
            (r->confirmation == RULE_CONFIRMED_BY_MAJORITY && !by_majority(f, e, j)) ||
            r->confirmation == RULE_CONFIRMED_NONE)
                fail_case(2, c, r, "confirmation label does not match the answers");
        if (rivals(f, e) != bit(j))
                fail_case(3, c, r, "commit while another node claims primary at the winning epoch");
        if (f->estar_found && e != f->estar)
                fail_case(7, c, r, "commit below the highest confirmed epoch %llu",
                          (unsigned long long) epoch_of(f->estar));
}

static void check_conflict_report(const Case *c, const Facts *f, const RuleResult *r) {
        int a, b;

        if (!r->conflict)
                return;
        a = node_index(f, r->conflict_a);
        b = node_index(f, r->conflict_b);
        if (r->conflict_epoch < EPOCH_LO || r->conflict_epoch >= EPOCH_LO + N_EPOCHS || a < 0 || b < 0 ||
            a == b) {
                fail_case(3, c, r, "conflict reported between unknown or equal nodes");
                return;
        }
        unsigned m = rivals(f, (unsigned) (r->conflict_epoch - EPOCH_LO));
        if (!(m & bit(a)) || !(m & bit(b)))
                fail_case(3, c, r, "conflict reported that the answers do not show");
}

/* Every node answering role=primary below the resulting epoch, once. */
static void check_stale(const Case *c, const Facts *f, const RuleResult *r) {
        uint64_t limit = r->verdict == RULE_COMMIT ? r->next.epoch : c->cur_epoch;
        unsigned seen = 0, want = 0;

        for (unsigned k = 0; k < f->n; k++)
                if (f->own[k] && f->own[k]->role_p && f->own[k]->epoch < limit)
                        want |= bit(k);
        for (size_t i = 0; i < r->n_stale; i++) {
                int k = node_index(f, r->stale[i].node_id);

                if (k < 0 || (seen & bit(k)) || !(want & bit(k)) || f->own[k]->epoch != r->stale[i].epoch) {
                        fail_case(5, c, r, "stale list names %s@%llu wrongly or twice", r->stale[i].node_id,
                                  (unsigned long long) r->stale[i].epoch);
                        return;
                }
                seen |= bit(k);
        }
        if (seen != want)
                fail_case(5, c, r, "a stale Primary is not reported");
}

static void check_complete(const Case *c, const Facts *f, const RuleResult *r) {
        if (r->verdict == RULE_COMMIT)
                check_commit(c, f, r);
        if (r->verdict == RULE_CONFLICT &&
            (!f->estar_found || !r->conflict || r->conflict_epoch != epoch_of(f->estar)))
                fail_case(3, c, r, "conflict verdict without a conflict at the highest confirmed epoch");
        check_conflict_report(c, f, r);
        check_stale(c, f, r);

        /* liveness */
        if (f->estar_found) {
                unsigned m = rivals(f, f->estar);

                if (popcount(m) == 1 &&
                    (r->verdict != RULE_COMMIT || r->broker_only || r->next.epoch != epoch_of(f->estar) ||
                     node_index(f, r->next.primary.id) != __builtin_ctz(m)))
                        fail_case(7, c, r,
                                  "the only claimant of the highest confirmed epoch is not committed");
                if (popcount(m) > 1 && r->verdict != RULE_CONFLICT)
                        fail_case(3, c, r, "a conflict at the highest confirmed epoch is not the verdict");
        } else if (c->cur_epoch) {
                unsigned e = (unsigned) (c->cur_epoch - EPOCH_LO), P = c->cur_primary, m = rivals(f, e);
                const Spec *p = f->own[P];
                bool change = p && p->role_p && p->epoch == c->cur_epoch && p->primary == P && p->new_broker;

                if (change && m == bit(P) && (r->verdict != RULE_COMMIT || !r->broker_only))
                        fail_case(7, c, r, "a broker change confirmed by P with no rival is not committed");
                if (popcount(m) > 1 && (!r->conflict || r->conflict_epoch != c->cur_epoch))
                        fail_case(3, c, r, "a conflict at the committed epoch is not reported");
                if (r->verdict == RULE_COMMIT && !r->broker_only)
                        fail_case(7, c, r, "commit with no confirmed pair above E");
        }
        /* the literal statement: P' answering primary at E' > E, and no answer
         * naming another Primary or claiming primary for another node at
         * >= E', is followed (at E' or at a higher epoch of P' itself) */
        for (unsigned e = 0; e < N_EPOCHS; e++)
                for (unsigned j = 0; j < f->n; j++)
                        if (epoch_of(e) > c->cur_epoch && (f->self[e] & bit(j)) && !dissent(f, e, j) &&
                            (r->verdict != RULE_COMMIT || node_index(f, r->next.primary.id) != (int) j ||
                             r->next.epoch < epoch_of(e)))
                                fail_case(7, c, r, "p%u answering primary at %llu unopposed is not followed",
                                          j + 1, (unsigned long long) epoch_of(e));
}

/* ---- the invariants on one partial verdict (rule 7) ---- */

static bool same_pair(const RuleResult *a, const RuleResult *b) {
        return a->verdict == RULE_COMMIT && b->verdict == RULE_COMMIT && a->next.epoch == b->next.epoch &&
               streq(a->next.primary.id, b->next.primary.id) &&
               streq(a->next.primary.api_url, b->next.primary.api_url) &&
               broker_info_equal(&a->next.broker, &b->next.broker);
}

static void check_partial(const Case *c, const Facts *f, const RuleResult *r, const RuleResult *whole) {
        if (r->n_stale || r->conflict || r->verdict == RULE_CONFLICT)
                fail_case(6, c, r, "a partial round reports stale, conflict or a conflict verdict");
        if (r->verdict == RULE_COMMIT) {
                int j = node_index(f, r->next.primary.id);

                check_commit(c, f, r);
                if (j < 0 || r->next.epoch <= c->cur_epoch || r->next.epoch >= EPOCH_LO + N_EPOCHS)
                        return; /* reported by check_commit */
                unsigned e = (unsigned) (r->next.epoch - EPOCH_LO);
                if (r->broker_only || !(f->self[e] & bit(j)))
                        fail_case(6, c, r, "partial commit without P''s own confirmation");
                if (2 * popcount(f->answered) <= popcount(cluster(f, j)))
                        fail_case(6, c, r, "partial commit with %u of %u answered", popcount(f->answered),
                                  popcount(cluster(f, j)));
                if (dissent(f, e, j))
                        fail_case(6, c, r, "partial commit while an answer names another Primary at >= E'");
                if (!same_pair(r, whole))
                        fail_case(6, c, r, "partial commit the complete evaluation does not make");
                return;
        }
        if (!f->estar_found)
                return;
        for (unsigned j = 0; j < f->n; j++)
                if ((f->self[f->estar] & bit(j)) && 2 * popcount(f->answered) > popcount(cluster(f, j)) &&
                    !dissent(f, f->estar, j))
                        fail_case(7, c, r, "partial round holds back p%u confirmed by itself and a majority",
                                  j + 1);
}

/* ---- comparing two results (invariants 4 and 8) ---- */

static bool stale_has(const RuleResult *r, const RuleStale *s) {
        for (size_t i = 0; i < r->n_stale; i++)
                if (streq(r->stale[i].node_id, s->node_id) && r->stale[i].epoch == s->epoch)
                        return true;
        return false;
}

/* names: also the two nodes a conflict names; with three or more claimants
 * at one epoch, which two are named depends on the order of the answers. */
static bool results_equal(const RuleResult *a, const RuleResult *b, bool names) {
        if (a->verdict != b->verdict || a->conflict != b->conflict || a->n_stale != b->n_stale)
                return false;
        if (a->verdict == RULE_COMMIT &&
            (!same_pair(a, b) || a->confirmation != b->confirmation || a->broker_only != b->broker_only))
                return false;
        if (a->conflict &&
            (a->conflict_epoch != b->conflict_epoch ||
             (names && (!streq(a->conflict_a, b->conflict_a) || !streq(a->conflict_b, b->conflict_b)))))
                return false;
        for (size_t i = 0; i < a->n_stale; i++)
                if (!stale_has(b, &a->stale[i]))
                        return false;
        return true;
}

/* ---- one case: both evaluations and every invariant ---- */

typedef struct Outcome {
        RuleResult whole, part;
} Outcome;

static unsigned long cases_checked;

static void check_case(Case *c, Outcome *o) {
        Facts f;

        facts_compute(c, &f);
        c->partial = false;
        evaluate(c, false, &o->whole);
        check_complete(c, &f, &o->whole);
        c->partial = true;
        evaluate(c, true, &o->part);
        check_partial(c, &f, &o->part, &o->whole);
        c->partial = false;
        cases_checked += 2;
}

/* Invariant 4: c with its load balancer answer (slot lb) gives what c
 * without it, with that answer's nodes list added to known, gives. */
static void check_lb_equivalent(Case *c, const Outcome *with, const Outcome *without) {
        fail_other_label = "without it, its nodes list added to known";
        fail_other = &without->whole;
        if (!results_equal(&with->whole, &without->whole, true))
                fail_case(4, c, &with->whole,
                          "the load balancer's answer changed the verdict beyond its nodes list");
        fail_other = &without->part;
        if (!results_equal(&with->part, &without->part, true)) {
                c->partial = true;
                fail_case(4, c, &with->part,
                          "the load balancer's answer changed the verdict beyond its nodes list");
                c->partial = false;
        }
        fail_other = NULL;
}

static void case_without_slot(const Case *c, size_t slot, Case *ret) {
        *ret = *c;
        ret->n_ans = 0;
        for (size_t i = 0; i < c->n_ans; i++)
                if (i != slot)
                        ret->ans[ret->n_ans++] = c->ans[i];
        if (c->ans[slot].kind == KIND_OK)
                ret->known |= c->ans[slot].nodes;
}

/* ---- a fixed-seed random source (splitmix64), reproducible ---- */

static uint64_t rng_state;

static uint64_t rng_next(void) {
        uint64_t z = (rng_state += 0x9e3779b97f4a7c15ULL);

        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
        return z ^ (z >> 31);
}

static unsigned rng_below(unsigned n) {
        return (unsigned) (rng_next() % n);
}

/* Invariant 8: the same answers in another order give the same results. */
static void check_permuted(Case *c, const Outcome *o) {
        Case p = *c;
        Outcome q;

        for (size_t i = p.n_ans; i > 1; i--) {
                size_t j = rng_below((unsigned) i);
                Spec t = p.ans[i - 1];

                p.ans[i - 1] = p.ans[j];
                p.ans[j] = t;
        }
        evaluate(&p, false, &q.whole);
        evaluate(&p, true, &q.part);
        fail_other_label = "in the original order";
        fail_other = &o->whole;
        if (!results_equal(&o->whole, &q.whole, false))
                fail_case(8, &p, &q.whole, "permuting the answers changed the complete verdict");
        fail_other = &o->part;
        if (!results_equal(&o->part, &q.part, false)) {
                p.partial = true;
                fail_case(8, &p, &q.part, "permuting the answers changed the partial verdict");
        }
        fail_other = NULL;
}

/* ---- the exhaustive passes ---- */

typedef bool (*ContentFilter)(const Spec *s, unsigned cur_primary);

static bool any_content(const Spec *s, unsigned cur_primary) {
        /* new broker fields matter only for the committed pair */
        return !s->new_broker || s->primary == cur_primary;
}

static bool empty_lists(const Spec *s, unsigned cur_primary) {
        return s->list == LIST_EMPTY && any_content(s, cur_primary);
}

/* The symbols a node may take in a pass: none, error, the allowed documents. */
static unsigned alphabet(unsigned n, ContentFilter filter, unsigned cur_primary, unsigned *syms) {
        unsigned count = 0;

        syms[count++] = SYM_NONE;
        syms[count++] = SYM_ERROR;
        for (unsigned c = 0; c < n_contents(n); c++) {
                Spec s = content_spec(n, 0, c);

                if (filter(&s, cur_primary))
                        syms[count++] = SYM_CONTENT + c;
        }
        return count;
}

static bool odometer_next(unsigned *digits, unsigned n, unsigned base) {
        for (unsigned i = 0; i < n; i++) {
                if (++digits[i] < base)
                        return true;
                digits[i] = 0;
        }
        return false;
}

static void case_from_symbols(Case *c, const unsigned *syms, const unsigned *digits) {
        c->n_ans = 0;
        for (unsigned k = 0; k < c->n; k++) {
                Spec s = symbol_spec(c->n, k, syms[digits[k]], false);

                if (s.kind != KIND_NONE)
                        c->ans[c->n_ans++] = s;
        }
}

static double now(void) {
        struct timespec ts;

        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (double) ts.tv_sec + (double) ts.tv_nsec / 1e9;
}

static unsigned long failures_all;

static void failures_reset(void) {
        memset(failures, 0, sizeof(failures));
}

/* The failures of the current pass, per invariant. */
static unsigned long failures_total(void) {
        unsigned long sum = 0;

        for (unsigned i = 1; i < N_INV; i++) {
                if (failures[i])
                        printf("rule exhaustive: invariant %u (%s): %lu failing cases\n", i, inv_names[i],
                               failures[i]);
                sum += failures[i];
        }
        failures_all += sum;
        return sum;
}

/* One pass: its failures, time and evaluations, reported at its end. */
typedef struct Pass {
        double t0;
        unsigned long evals, sets;
} Pass;

static void pass_begin(Pass *p, unsigned n) {
        failures_reset();
        if (n)
                docs_build(n);
        *p = (Pass){.t0 = now(), .evals = evaluations};
}

static void pass_end(const Pass *p, const char *what) {
        printf("rule exhaustive: %s: %lu answer sets, %lu evaluations checked, %.2f s\n", what, p->sets,
               evaluations - p->evals, now() - p->t0);
        fflush(stdout);
        assert_int_equal(failures_total(), 0);
}

/* Results of one node tuple without a load balancer answer, for each known
 * mask (the baseline of invariant 4), computed on demand. */
typedef struct Baseline {
        bool valid[1u << MAX_N];
        Outcome o[1u << MAX_N];
} Baseline;

/* With the whole cluster known, rule 6 makes the cluster every node
 * whatever the nodes lists say: the exhaustive passes then fix the lists
 * empty (the shape of defect 1); with nothing known, every list. */
static ContentFilter filter_for(unsigned known) {
        return known ? empty_lists : any_content;
}

/* n=2: every node answer x every load balancer answer x known empty/full. */
static void test_two_nodes(void **st) {
        unsigned syms[2 + 40 * MAX_N], n = 2;
        static Baseline bl;
        Pass pass;

        pass_begin(&pass, n);
        for (unsigned known = 0; known <= full_mask(n); known += full_mask(n)) {
                ContentFilter filter = filter_for(known);
                unsigned digits[MAX_N] = {}, base = alphabet(n, filter, 0, syms);

                do {
                        Case c = {.n = n, .cur_epoch = CUR_EPOCH, .cur_primary = 0, .known = known};

                        case_from_symbols(&c, syms, digits);
                        memset(bl.valid, 0, sizeof(bl.valid));
                        for (unsigned lb = 0; lb < SYM_CONTENT + n * n_contents(n); lb++) {
                                Spec s = lb_spec(n, lb);
                                Case w = c;
                                Outcome o;
                                unsigned m;

                                if (s.kind == KIND_OK && !filter(&s, 0))
                                        continue;
                                if (s.kind != KIND_NONE)
                                        w.ans[w.n_ans++] = s;
                                check_case(&w, &o);
                                if (++pass.sets % 61 == 0)
                                        check_permuted(&w, &o);
                                if (s.kind == KIND_NONE) { /* the first symbol */
                                        bl.o[known] = o;
                                        bl.valid[known] = true;
                                        continue;
                                }
                                m = known | (s.kind == KIND_OK ? s.nodes : 0);
                                if (!bl.valid[m]) {
                                        Case b;

                                        case_without_slot(&w, w.n_ans - 1, &b);
                                        check_case(&b, &bl.o[m]);
                                        bl.valid[m] = true;
                                }
                                check_lb_equivalent(&w, &o, &bl.o[m]);
                        }
                } while (odometer_next(digits, n, base));
        }
        pass_end(&pass, "2 nodes + load balancer, exhaustive");
}

/* n=3: every answer of the three nodes x known empty/full. */
static void test_three_nodes(void **st) {
        unsigned syms[2 + 40 * MAX_N], n = 3;
        Pass pass;

        pass_begin(&pass, n);
        for (unsigned known = 0; known <= full_mask(n); known += full_mask(n)) {
                unsigned digits[MAX_N] = {}, base = alphabet(n, filter_for(known), 0, syms);

                do {
                        Case c = {.n = n, .cur_epoch = CUR_EPOCH, .cur_primary = 0, .known = known};
                        Outcome o;

                        case_from_symbols(&c, syms, digits);
                        check_case(&c, &o);
                        if (++pass.sets % 61 == 0)
                                check_permuted(&c, &o);
                } while (odometer_next(digits, n, base));
        }
        pass_end(&pass, "3 nodes, exhaustive");
}

/* The renamings of p2..p4 (p1, the committed Primary, stays). */
static const uint8_t perms4[6][MAX_N] = {{0, 1, 2, 3}, {0, 1, 3, 2}, {0, 2, 1, 3},
                                         {0, 2, 3, 1}, {0, 3, 1, 2}, {0, 3, 2, 1}};

/* The index in syms of symbol sym renamed by perm (node k's document). */
static unsigned renamed(const unsigned *syms, unsigned base, unsigned n, unsigned idx, const uint8_t *perm) {
        Spec s;

        if (syms[idx] < SYM_CONTENT)
                return idx;
        s = content_spec(n, 0, syms[idx] - SYM_CONTENT);
        for (unsigned i = 0; i < base; i++) {
                Spec t;

                if (syms[i] < SYM_CONTENT)
                        continue;
                t = content_spec(n, 0, syms[i] - SYM_CONTENT);
                if (t.role_p == s.role_p && t.epoch == s.epoch && t.primary == perm[s.primary] &&
                    t.list == s.list && t.new_broker == s.new_broker)
                        return i;
        }
        fail_msg("alphabet not closed under renaming");
        return idx;
}

/* Is digits the smallest tuple of its orbit under the renamings? */
static bool canonical(const unsigned *digits, unsigned n, unsigned map[6][2 + 40 * MAX_N]) {
        for (unsigned p = 1; p < 6; p++) {
                unsigned image[MAX_N];

                for (unsigned k = 0; k < n; k++)
                        image[perms4[p][k]] = map[p][digits[k]];
                for (int k = (int) n - 1; k >= 0; k--) {
                        if (image[k] < digits[k])
                                return false;
                        if (image[k] > digits[k])
                                break;
                }
        }
        return true;
}

/* n=4: known full, empty lists, one tuple per orbit of the renamings. */
static void test_four_nodes(void **st) {
        static unsigned map[6][2 + 40 * MAX_N];
        unsigned syms[2 + 40 * MAX_N], digits[MAX_N] = {}, n = 4, base;
        Pass pass;

        pass_begin(&pass, n);
        base = alphabet(n, empty_lists, 0, syms);
        for (unsigned p = 0; p < 6; p++)
                for (unsigned i = 0; i < base; i++)
                        map[p][i] = renamed(syms, base, n, i, perms4[p]);
        do {
                Case c = {.n = n, .cur_epoch = CUR_EPOCH, .cur_primary = 0, .known = full_mask(n)};
                Outcome o;

                if (!canonical(digits, n, map))
                        continue;
                case_from_symbols(&c, syms, digits);
                check_case(&c, &o);
                if (++pass.sets % 61 == 0)
                        check_permuted(&c, &o);
        } while (odometer_next(digits, n, base));
        pass_end(&pass, "4 nodes, known full, empty lists, up to renaming p2..p4, exhaustive");
}

/* ---- the sample of the whole space ---- */

#define SAMPLE_SEED      20261125
#define SAMPLE_SEED_TEXT "20261125"
#define SAMPLE_CASES     300000

static void random_case(Case *c) {
        unsigned n = 2 + rng_below(3);

        docs_build(n);
        *c = (Case){.n = n,
                    .cur_epoch = rng_below(4) ? CUR_EPOCH : 0,
                    .cur_primary = (uint8_t) rng_below(n),
                    .known = rng_below(2) ? full_mask(n) : 0};
        for (unsigned k = 0; k < n; k++) {
                Spec s = symbol_spec(n, k, rng_below(SYM_CONTENT + n_contents(n)), false);

                if (s.kind != KIND_NONE)
                        c->ans[c->n_ans++] = s;
        }
        /* the load balancer is asked in half the cases */
        if (rng_below(2)) {
                Spec s = lb_spec(n, rng_below(SYM_CONTENT + n * n_contents(n)));

                if (s.kind != KIND_NONE)
                        c->ans[c->n_ans++] = s;
        }
}

static void test_sample(void **st) {
        Pass pass;

        pass_begin(&pass, 0);
        rng_state = SAMPLE_SEED;
        for (unsigned i = 0; i < SAMPLE_CASES; i++) {
                Case c;
                Outcome o;

                random_case(&c);
                check_case(&c, &o);
                pass.sets++;
                check_permuted(&c, &o);
                for (size_t s = 0; s < c.n_ans; s++)
                        if (c.ans[s].lb) {
                                Case b;
                                Outcome ob;

                                case_without_slot(&c, s, &b);
                                check_case(&b, &ob);
                                check_lb_equivalent(&c, &o, &ob);
                        }
        }
        pass_end(&pass, "sample of the whole space (seed " SAMPLE_SEED_TEXT ")");
}

int main(void) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_two_nodes),
                cmocka_unit_test(test_three_nodes),
                cmocka_unit_test(test_four_nodes),
                cmocka_unit_test(test_sample),
        };
        int r = cmocka_run_group_tests_name("rule exhaustive", tests, NULL, NULL);

        printf("rule exhaustive: %lu cases checked (%lu rule evaluations), %lu invariant violations\n",
               cases_checked, evaluations, failures_all);
        for (unsigned n = 0; n <= MAX_N; n++)
                free(docs[n]);
        return r;
}
