/* The Primary-following rule (contract section 3) as a table: each row is a
 * committed pair, one round's answers and the expected verdict. */

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>

#include <cmocka.h>

#include "macro.h"
#include "rule.h"

enum {
        LB = 1 << 0,   /* asked through the load balancer */
        FAIL = 1 << 1, /* a failed read */
};

/* One answer: node id, role ('P' or 'S'), epoch, the primary it reports,
 * its nodes list (space separated; NULL: "p1 p2 p3"), flags, and the broker
 * host it reports (NULL: "<primary>.example"). */
typedef struct Ans {
        const char *id;
        char role;
        uint64_t epoch;
        const char *primary;
        const char *nodes;
        unsigned flags;
        const char *host;
} Ans;

#define MAX_ANS 8

typedef struct Case {
        const char *name;
        /* committed pair; epoch 0: none; host NULL: "<primary>.example" */
        uint64_t cur_epoch;
        const char *cur_primary;
        const char *cur_host;
        Ans ans[MAX_ANS]; /* ends at id == NULL */

        RuleVerdict verdict;
        RuleConfirmation confirmation;
        uint64_t next_epoch;
        const char *next_primary;
        const char *next_host;
        bool broker_only;
        const char *stale;                 /* "p1@7 p3@6", NULL: none */
        uint64_t conflict_epoch;           /* 0: no conflict */
        const char *conflict;              /* "a b", sorted */
        unsigned supporters, cluster_size; /* checked when cluster_size > 0 */
        const char *known;                 /* the state file's nodes list, NULL: none */
        bool partial;                      /* the round is still in flight (rule 7) */
} Case;

/* An answer; the optional rest are designated fields of Ans. */
#define A(i, r, e, p, ...)                                                                                  \
        { .id = i, .role = r, .epoch = e, .primary = p, __VA_ARGS__ }

#define N3 "p1 p2 p3"
#define N4 "p1 p2 p3 p4"

static const Case cases[] = {
        {.name = "no answers at all: keep", .cur_epoch = 7, .cur_primary = "p1", .verdict = RULE_KEEP},
        {.name = "first commit, confirmed by the Primary itself",
         .ans = {A("p1", 'P', 7, "p1")},
         .verdict = RULE_COMMIT,
         .confirmation = RULE_CONFIRMED_BY_PRIMARY,
         .next_epoch = 7,
         .next_primary = "p1"},
        {.name = "first commit, confirmed by a majority",
         .ans = {A("p2", 'S', 7, "p1"), A("p3", 'S', 7, "p1"), A("p1", 'P', 7, "p1", .flags = FAIL)},
         .verdict = RULE_COMMIT,
         .confirmation = RULE_CONFIRMED_BY_MAJORITY,
         .next_epoch = 7,
         .next_primary = "p1",
         .supporters = 2,
         .cluster_size = 3},
        {.name = "first commit, a single Standby is not enough",
         .ans = {A("p2", 'S', 7, "p1")},
         .verdict = RULE_KEEP,
         .supporters = 1,
         .cluster_size = 3},
        {.name = "higher epoch confirmed by the new Primary itself",
         .cur_epoch = 7,
         .cur_primary = "p1",
         .ans = {A("p2", 'P', 8, "p2"), A("p3", 'S', 7, "p1")},
         .verdict = RULE_COMMIT,
         .confirmation = RULE_CONFIRMED_BY_PRIMARY,
         .next_epoch = 8,
         .next_primary = "p2"},
        {.name = "higher epoch confirmed by a strict majority only (new Primary dead)",
         .cur_epoch = 7,
         .cur_primary = "p1",
         .ans = {A("p1", 'S', 8, "p2"), A("p3", 'S', 8, "p2"), A("p2", 'P', 8, "p2", .flags = FAIL)},
         .verdict = RULE_COMMIT,
         .confirmation = RULE_CONFIRMED_BY_MAJORITY,
         .next_epoch = 8,
         .next_primary = "p2",
         .supporters = 2,
         .cluster_size = 3},
        {.name = "a single Standby's claim is not enough",
         .cur_epoch = 7,
         .cur_primary = "p1",
         .ans = {A("p3", 'S', 8, "p2"), A("p1", 'P', 7, "p1")},
         .verdict = RULE_KEEP,
         .supporters = 1,
         .cluster_size = 3},
        {.name = "2 of 4 is not a majority",
         .cur_epoch = 7,
         .cur_primary = "p1",
         .ans = {A("p3", 'S', 8, "p2", .nodes = N4), A("p4", 'S', 8, "p2", .nodes = N4)},
         .verdict = RULE_KEEP,
         .supporters = 2,
         .cluster_size = 4},
        {.name = "3 of 4 is a majority",
         .cur_epoch = 7,
         .cur_primary = "p1",
         .ans = {A("p1", 'S', 8, "p2", .nodes = N4), A("p3", 'S', 8, "p2", .nodes = N4),
                 A("p4", 'S', 8, "p2", .nodes = N4)},
         .verdict = RULE_COMMIT,
         .confirmation = RULE_CONFIRMED_BY_MAJORITY,
         .next_epoch = 8,
         .next_primary = "p2",
         .supporters = 3,
         .cluster_size = 4},
        {.name = "majority: the broker a majority agrees on wins over a lagging one",
         .cur_epoch = 7,
         .cur_primary = "p1",
         .ans = {A("p4", 'S', 8, "p2", .nodes = N4, .host = "old.example"),
                 A("p1", 'S', 8, "p2", .nodes = N4, .host = "mq2.example"),
                 A("p3", 'S', 8, "p2", .nodes = N4, .host = "mq2.example"),
                 A("p5", 'S', 8, "p2", .nodes = "p1 p2 p3 p4 p5", .host = "mq2.example")},
         .verdict = RULE_COMMIT,
         .confirmation = RULE_CONFIRMED_BY_MAJORITY,
         .next_epoch = 8,
         .next_primary = "p2",
         .next_host = "mq2.example"},
        {.name = "majority: supporters split on the broker, no version has a majority: nothing committed",
         .cur_epoch = 7,
         .cur_primary = "p1",
         .ans = {A("p4", 'S', 8, "p2", .nodes = N4, .host = "old.example"),
                 A("p1", 'S', 8, "p2", .nodes = N4, .host = "mq2.example"),
                 A("p3", 'S', 8, "p2", .nodes = N4, .host = "mq2.example")},
         .verdict = RULE_KEEP},
        /* Found by the simulation (seed 157): on a tie a lying Standby chose
         * the broker that receives the Agent's credentials. */
        {.name = "majority: a tie between two brokers confirms nothing (one order)",
         .cur_epoch = 7,
         .cur_primary = "p1",
         .ans = {A("p1", 'S', 8, "p2"), A("p3", 'S', 8, "p2", .host = "evil.example")},
         .verdict = RULE_KEEP},
        {.name = "majority: a tie between two brokers confirms nothing (the other order)",
         .cur_epoch = 7,
         .cur_primary = "p1",
         .ans = {A("p3", 'S', 8, "p2", .host = "evil.example"), A("p1", 'S', 8, "p2")},
         .verdict = RULE_KEEP},
        {.name = "the Primary's own broker beats its Standbys'",
         .cur_epoch = 7,
         .cur_primary = "p1",
         .ans = {A("p1", 'S', 8, "p2", .host = "old.example"), A("p3", 'S', 8, "p2", .host = "old.example"),
                 A("p2", 'P', 8, "p2", .host = "mq2.example")},
         .verdict = RULE_COMMIT,
         .confirmation = RULE_CONFIRMED_BY_PRIMARY,
         .next_epoch = 8,
         .next_primary = "p2",
         .next_host = "mq2.example"},
        {.name = "stale Primary back with a lower epoch: ignored and reported",
         .cur_epoch = 8,
         .cur_primary = "p2",
         .ans = {A("p1", 'P', 7, "p1"), A("p2", 'P', 8, "p2"), A("p3", 'S', 8, "p2")},
         .verdict = RULE_KEEP,
         .stale = "p1@7"},
        {.name = "stale Primary is the only answer",
         .cur_epoch = 8,
         .cur_primary = "p2",
         .ans = {A("p1", 'P', 7, "p1")},
         .verdict = RULE_KEEP,
         .stale = "p1@7"},
        {.name = "stale at the moment of a commit (old at E, new at E+1)",
         .cur_epoch = 7,
         .cur_primary = "p1",
         .ans = {A("p1", 'P', 7, "p1"), A("p2", 'P', 8, "p2")},
         .verdict = RULE_COMMIT,
         .confirmation = RULE_CONFIRMED_BY_PRIMARY,
         .next_epoch = 8,
         .next_primary = "p2",
         .stale = "p1@7"},
        {.name = "two promotions in one round: the highest confirmed epoch wins",
         .cur_epoch = 6,
         .cur_primary = "p1",
         .ans = {A("p3", 'P', 7, "p3"), A("p2", 'P', 8, "p2"), A("p1", 'S', 7, "p3")},
         .verdict = RULE_COMMIT,
         .confirmation = RULE_CONFIRMED_BY_PRIMARY,
         .next_epoch = 8,
         .next_primary = "p2",
         .stale = "p3@7"},
        {.name = "two Primaries at one epoch: conflict, nothing committed",
         .cur_epoch = 7,
         .cur_primary = "p1",
         .ans = {A("p3", 'P', 8, "p3"), A("p2", 'P', 8, "p2")},
         .verdict = RULE_CONFLICT,
         .conflict_epoch = 8,
         .conflict = "p2 p3"},
        {.name = "majority-confirmed Primary and another self-declared one: conflict",
         .cur_epoch = 7,
         .cur_primary = "p1",
         .ans = {A("p1", 'S', 8, "p2", .nodes = N4), A("p4", 'S', 8, "p2", .nodes = N4),
                 A("p2", 'S', 8, "p2", .nodes = N4), A("p3", 'P', 8, "p3", .nodes = N4)},
         .verdict = RULE_CONFLICT,
         .conflict_epoch = 8,
         .conflict = "p2 p3"},
        {.name = "conflict at the higher epoch does not hide a stale Primary",
         .cur_epoch = 7,
         .cur_primary = "p1",
         .ans = {A("p1", 'P', 6, "p1"), A("p3", 'P', 8, "p3"), A("p2", 'P', 8, "p2")},
         .verdict = RULE_CONFLICT,
         .stale = "p1@6",
         .conflict_epoch = 8,
         .conflict = "p2 p3"},
        {.name = "conflict at the committed epoch: keep, flagged",
         .cur_epoch = 7,
         .cur_primary = "p1",
         .ans = {A("p1", 'P', 7, "p1"), A("p3", 'P', 7, "p3")},
         .verdict = RULE_KEEP,
         .conflict_epoch = 7,
         .conflict = "p1 p3"},
        {.name = "conflict at the committed epoch blocks a broker change",
         .cur_epoch = 7,
         .cur_primary = "p1",
         .ans = {A("p1", 'P', 7, "p1", .host = "mq1.example"), A("p3", 'P', 7, "p3")},
         .verdict = RULE_KEEP,
         .conflict_epoch = 7,
         .conflict = "p1 p3"},
        {.name = "a higher commit wins over a conflict at the committed epoch",
         .cur_epoch = 7,
         .cur_primary = "p1",
         .ans = {A("p3", 'P', 7, "p3"), A("p2", 'P', 8, "p2")},
         .verdict = RULE_COMMIT,
         .confirmation = RULE_CONFIRMED_BY_PRIMARY,
         .next_epoch = 8,
         .next_primary = "p2",
         .stale = "p3@7"},
        {.name = "broker changed at the same epoch, confirmed by P: broker-only commit",
         .cur_epoch = 7,
         .cur_primary = "p1",
         .ans = {A("p1", 'P', 7, "p1", .host = "mq1.example"), A("p2", 'S', 7, "p1")},
         .verdict = RULE_COMMIT,
         .confirmation = RULE_CONFIRMED_BY_PRIMARY,
         .next_epoch = 7,
         .next_primary = "p1",
         .next_host = "mq1.example",
         .broker_only = true},
        {.name = "broker changed, reported only by a Standby: keep",
         .cur_epoch = 7,
         .cur_primary = "p1",
         .ans = {A("p2", 'S', 7, "p1", .host = "mq1.example"), A("p3", 'S', 7, "p1", .host = "mq1.example"),
                 A("p1", 'P', 7, "p1", .flags = FAIL, .host = "mq1.example")},
         .verdict = RULE_KEEP},
        {.name = "broker changed, seen only through the load balancer: keep",
         .cur_epoch = 7,
         .cur_primary = "p1",
         .ans = {A("p1", 'P', 7, "p1", .flags = LB, .host = "mq1.example")},
         .verdict = RULE_KEEP},
        {.name = "same pair, same broker: keep",
         .cur_epoch = 7,
         .cur_primary = "p1",
         .ans = {A("p1", 'P', 7, "p1"), A("p2", 'S', 7, "p1"), A("p3", 'S', 7, "p1")},
         .verdict = RULE_KEEP},
        {.name = "load balancer claiming a higher epoch as primary is no confirmation",
         .cur_epoch = 7,
         .cur_primary = "p1",
         .ans = {A("p2", 'P', 8, "p2", .flags = LB), A("p1", 'P', 7, "p1")},
         .verdict = RULE_KEEP},
        {.name = "load balancer answers do not count toward a majority",
         .cur_epoch = 7,
         .cur_primary = "p1",
         .ans = {A("p3", 'S', 8, "p2"), A("p1", 'S', 8, "p2", .flags = LB),
                 A("p2", 'S', 8, "p2", .flags = LB)},
         .verdict = RULE_KEEP,
         .supporters = 1,
         .cluster_size = 3},
        {.name = "failed answers are ignored",
         .cur_epoch = 7,
         .cur_primary = "p1",
         .ans = {A("p2", 'P', 8, "p2", .flags = FAIL), A("p3", 'S', 8, "p2", .flags = FAIL)},
         .verdict = RULE_KEEP},
        {.name = "one node asked at two URLs counts once",
         .cur_epoch = 7,
         .cur_primary = "p1",
         .ans = {A("p3", 'S', 8, "p2"), A("p3", 'S', 8, "p2")},
         .verdict = RULE_KEEP,
         .supporters = 1,
         .cluster_size = 3},
        {.name = "two disagreeing answers of one node: the higher epoch is used",
         .cur_epoch = 7,
         .cur_primary = "p1",
         .ans = {A("p3", 'S', 7, "p1"), A("p3", 'S', 8, "p2"), A("p1", 'S', 8, "p2")},
         .verdict = RULE_COMMIT,
         .confirmation = RULE_CONFIRMED_BY_MAJORITY,
         .next_epoch = 8,
         .next_primary = "p2",
         .supporters = 2,
         .cluster_size = 3},
        {.name = "lower-epoch candidates are never committed",
         .cur_epoch = 8,
         .cur_primary = "p2",
         .ans = {A("p3", 'P', 6, "p3"), A("p1", 'S', 6, "p3"), A("p2", 'S', 6, "p3")},
         .verdict = RULE_KEEP,
         .stale = "p3@6"},
        {.name = "equal-epoch claim of one Standby never moves the pair",
         .cur_epoch = 8,
         .cur_primary = "p2",
         .ans = {A("p1", 'S', 8, "p3"), A("p2", 'P', 8, "p2")},
         .verdict = RULE_KEEP},
        {.name = "equal-epoch pair confirmed by a majority: keep, flagged as a conflict",
         .cur_epoch = 8,
         .cur_primary = "p2",
         .ans = {A("p1", 'S', 8, "p3"), A("p3", 'S', 8, "p3")},
         .verdict = RULE_KEEP,
         .conflict_epoch = 8,
         .conflict = "p2 p3"},
        {.name = "nodes lists define the cluster: their union makes 2 of 4",
         .ans = {A("p2", 'S', 7, "p1", .nodes = N3), A("p3", 'S', 7, "p1", .nodes = N4)},
         .verdict = RULE_KEEP,
         .supporters = 2,
         .cluster_size = 4},
        {.name = "nodes lists define the cluster: reporters not listed are added",
         .ans = {A("p2", 'S', 7, "p1", .nodes = "p1 p2"), A("p3", 'S', 7, "p1", .nodes = "p1 p2")},
         .verdict = RULE_COMMIT,
         .confirmation = RULE_CONFIRMED_BY_MAJORITY,
         .next_epoch = 7,
         .next_primary = "p1",
         .supporters = 2,
         .cluster_size = 3},
        /* Rule 6: the cluster is never smaller than what the daemon knows. */
        {.name = "rule 6: a lone Standby listing no nodes is one vote of three (defect 1)",
         .cur_epoch = 7,
         .cur_primary = "p1",
         .known = N3,
         .ans = {A("p1", 'P', 7, "p1", .flags = FAIL), A("p2", 'S', 7, "p1", .flags = FAIL),
                 A("p3", 'S', 8, "p2", .nodes = "")},
         .verdict = RULE_KEEP,
         .supporters = 1,
         .cluster_size = 3},
        {.name = "rule 6: a lone Standby listing only itself is one vote of three",
         .cur_epoch = 7,
         .cur_primary = "p1",
         .known = N3,
         .ans = {A("p3", 'S', 8, "p2", .nodes = "p3")},
         .verdict = RULE_KEEP,
         .supporters = 1,
         .cluster_size = 3},
        {.name = "rule 6: two Standbys of a known four-node cluster are no majority",
         .cur_epoch = 7,
         .cur_primary = "p1",
         .known = N4,
         .ans = {A("p3", 'S', 8, "p2"), A("p1", 'S', 8, "p2")},
         .verdict = RULE_KEEP,
         .supporters = 2,
         .cluster_size = 4},
        {.name = "rule 6: two Standbys of a known three-node cluster are a majority",
         .cur_epoch = 7,
         .cur_primary = "p1",
         .known = N3,
         .ans = {A("p3", 'S', 8, "p2", .nodes = ""), A("p1", 'S', 8, "p2", .nodes = "")},
         .verdict = RULE_COMMIT,
         .confirmation = RULE_CONFIRMED_BY_MAJORITY,
         .next_epoch = 8,
         .next_primary = "p2",
         .supporters = 2,
         .cluster_size = 3},
        {.name = "rule 6: a non-supporter's nodes list grows the cluster",
         .cur_epoch = 7,
         .cur_primary = "p1",
         .ans = {A("p3", 'S', 8, "p2", .nodes = "p2 p3"), A("p1", 'S', 7, "p1", .nodes = "p1 p2 p3 p4 p5")},
         .verdict = RULE_KEEP,
         .supporters = 1,
         .cluster_size = 5},
        {.name = "rule 6: the load balancer's nodes list grows the cluster, it does not vote",
         .cur_epoch = 7,
         .cur_primary = "p1",
         .ans = {A("p3", 'S', 8, "p2", .nodes = "p2 p3"), A("p4", 'S', 8, "p2", .nodes = N4, .flags = LB)},
         .verdict = RULE_KEEP,
         .supporters = 1,
         .cluster_size = 4},

        /* Rule 7: a round in flight decides when the answers in hand decide it. */
        {.name = "rule 7: P' confirmed itself and 2 of 3 answered: commit before the round ends",
         .cur_epoch = 7,
         .cur_primary = "p1",
         .known = N3,
         .partial = true,
         .ans = {A("p2", 'P', 8, "p2"), A("p3", 'S', 8, "p2")},
         .verdict = RULE_COMMIT,
         .confirmation = RULE_CONFIRMED_BY_PRIMARY,
         .next_epoch = 8,
         .next_primary = "p2",
         .supporters = 2,
         .cluster_size = 3},
        {.name = "rule 7: P' alone of three has answered: wait",
         .cur_epoch = 7,
         .cur_primary = "p1",
         .known = N3,
         .partial = true,
         .ans = {A("p2", 'P', 8, "p2")},
         .verdict = RULE_KEEP},
        {.name = "rule 7: an answer naming another Primary at E' holds the commit",
         .cur_epoch = 7,
         .cur_primary = "p1",
         .known = N3,
         .partial = true,
         .ans = {A("p2", 'P', 8, "p2"), A("p3", 'S', 8, "p1")},
         .verdict = RULE_KEEP},
        {.name = "rule 7: an answer at a higher epoch with another Primary holds the commit",
         .cur_epoch = 7,
         .cur_primary = "p1",
         .known = N3,
         .partial = true,
         .ans = {A("p2", 'P', 8, "p2"), A("p3", 'S', 9, "p3"), A("p1", 'S', 8, "p2")},
         .verdict = RULE_KEEP},
        {.name = "rule 7: a majority of Standbys alone waits for the whole round",
         .cur_epoch = 7,
         .cur_primary = "p1",
         .known = N3,
         .partial = true,
         .ans = {A("p1", 'S', 8, "p2"), A("p3", 'S', 8, "p2")},
         .verdict = RULE_KEEP},
        {.name = "rule 7: the load balancer's answer is no node's answer",
         .cur_epoch = 7,
         .cur_primary = "p1",
         .known = N3,
         .partial = true,
         .ans = {A("p2", 'P', 8, "p2"), A("p3", 'S', 8, "p2", .flags = LB)},
         .verdict = RULE_KEEP},
        {.name = "rule 7: two of a known four is no majority",
         .cur_epoch = 7,
         .cur_primary = "p1",
         .known = N4,
         .partial = true,
         .ans = {A("p2", 'P', 8, "p2"), A("p3", 'S', 8, "p2")},
         .verdict = RULE_KEEP},
        {.name = "rule 7: three of a known four commit",
         .cur_epoch = 7,
         .cur_primary = "p1",
         .known = N4,
         .partial = true,
         .ans = {A("p2", 'P', 8, "p2"), A("p3", 'S', 8, "p2"), A("p4", 'S', 8, "p2")},
         .verdict = RULE_COMMIT,
         .confirmation = RULE_CONFIRMED_BY_PRIMARY,
         .next_epoch = 8,
         .next_primary = "p2"},
        {.name = "rule 7: a stale old Primary answering does not hold the commit; stale waits for the round",
         .cur_epoch = 7,
         .cur_primary = "p1",
         .known = N3,
         .partial = true,
         .ans = {A("p1", 'P', 7, "p1"), A("p2", 'P', 8, "p2")},
         .verdict = RULE_COMMIT,
         .confirmation = RULE_CONFIRMED_BY_PRIMARY,
         .next_epoch = 8,
         .next_primary = "p2"},
        {.name = "rule 7: a failed read is no answer",
         .cur_epoch = 7,
         .cur_primary = "p1",
         .known = N3,
         .partial = true,
         .ans = {A("p2", 'P', 8, "p2"), A("p3", 'S', 8, "p2", .flags = FAIL)},
         .verdict = RULE_KEEP},

};

/* ---- building the inputs ---- */

static void make_url(char *dst, size_t size, const char *id) {
        snprintf(dst, size, "https://%s.example:8443", id);
}

static void make_broker(BrokerInfo *b, const char *primary, const char *host) {
        if (host)
                snprintf(b->host, sizeof(b->host), "%s", host);
        else
                snprintf(b->host, sizeof(b->host), "%s.example", primary);
        b->port = 5671;
        snprintf(b->vhost, sizeof(b->vhost), "/dsm");
        b->tls = true;
}

static void make_nodes(ProviderState *s, const char *list) {
        const char *p = list ? list : N3;

        s->n_nodes = 0;
        while (*p && s->n_nodes < PROVIDER_NODES_MAX) {
                size_t n = strcspn(p, " ");
                NodeRef *ref = &s->nodes[s->n_nodes++];

                char id[PROVIDER_ID_MAX + 1];

                snprintf(id, sizeof(id), "%.*s", (int) n, p);
                snprintf(ref->id, sizeof(ref->id), "%s", id);
                make_url(ref->api_url, sizeof(ref->api_url), id);
                p += n;
                p += strspn(p, " ");
        }
}

static void make_state(ProviderState *s, const Ans *a) {
        memset(s, 0, sizeof(*s));
        snprintf(s->node.id, sizeof(s->node.id), "%s", a->id);
        make_url(s->node.api_url, sizeof(s->node.api_url), a->id);
        s->role = a->role == 'P' ? NODE_ROLE_PRIMARY : NODE_ROLE_STANDBY;
        snprintf(s->version, sizeof(s->version), "9.0.1");
        s->epoch = a->epoch;
        snprintf(s->primary.id, sizeof(s->primary.id), "%s", a->primary);
        make_url(s->primary.api_url, sizeof(s->primary.api_url), a->primary);
        make_broker(&s->broker, a->primary, a->host);
        make_nodes(s, a->nodes);
}

static void make_committed(Committed *c, uint64_t epoch, const char *primary, const char *host) {
        memset(c, 0, sizeof(*c));
        c->epoch = epoch;
        if (!primary)
                return;
        snprintf(c->primary.id, sizeof(c->primary.id), "%s", primary);
        make_url(c->primary.api_url, sizeof(c->primary.api_url), primary);
        make_broker(&c->broker, primary, host);
}

static void format_stale(const RuleResult *r, char *buf, size_t size) {
        size_t off = 0;

        buf[0] = 0;
        for (size_t i = 0; i < r->n_stale && off < size; i++) {
                int n = snprintf(buf + off, size - off, "%s%s@%llu", i ? " " : "", r->stale[i].node_id,
                                 (unsigned long long) r->stale[i].epoch);
                if (n < 0)
                        break;
                off += (size_t) n;
        }
}

/* ---- the table runner ---- */

static bool committed_equal(const Committed *a, const Committed *b) {
        return a->epoch == b->epoch && strcmp(a->primary.id, b->primary.id) == 0 &&
               strcmp(a->primary.api_url, b->primary.api_url) == 0 &&
               broker_info_equal(&a->broker, &b->broker);
}

static void run_case(void **st) {
        const Case *c = *st;
        static ProviderState states[MAX_ANS];
        RuleAnswer answers[MAX_ANS];
        Committed cur, want;
        RuleResult r;
        char buf[256];
        size_t n = 0;

        make_committed(&cur, c->cur_epoch, c->cur_primary, c->cur_host);
        for (; n < MAX_ANS && c->ans[n].id; n++) {
                make_state(&states[n], &c->ans[n]);
                answers[n] = (RuleAnswer){
                        .via_load_balancer = c->ans[n].flags & LB,
                        .ok = !(c->ans[n].flags & FAIL),
                        .state = &states[n],
                };
        }

        ProviderState known = {};
        if (c->known)
                make_nodes(&known, c->known);
        rule_evaluate(&(RuleInput){.current = &cur,
                                   .known = known.nodes,
                                   .n_known = known.n_nodes,
                                   .answers = answers,
                                   .n_answers = n,
                                   .partial = c->partial},
                      &r);

        assert_int_equal(r.verdict, c->verdict);
        if (c->verdict == RULE_COMMIT) {
                assert_int_equal(r.confirmation, c->confirmation);
                make_committed(&want, c->next_epoch, c->next_primary, c->next_host);
                assert_int_equal(r.next.epoch, want.epoch);
                assert_string_equal(r.next.primary.id, want.primary.id);
                assert_string_equal(r.next.primary.api_url, want.primary.api_url);
                assert_string_equal(r.next.broker.host, want.broker.host);
                assert_true(committed_equal(&r.next, &want));
                assert_int_equal(r.broker_only, c->broker_only);
        }

        format_stale(&r, buf, sizeof(buf));
        assert_string_equal(buf, c->stale ? c->stale : "");

        assert_int_equal(r.conflict, c->conflict_epoch > 0);
        if (c->conflict_epoch > 0) {
                assert_int_equal(r.conflict_epoch, c->conflict_epoch);
                snprintf(buf, sizeof(buf), "%s %s", r.conflict_a, r.conflict_b);
                assert_string_equal(buf, c->conflict);
        }

        if (c->cluster_size > 0) {
                assert_int_equal(r.supporters, c->supporters);
                assert_int_equal(r.cluster_size, c->cluster_size);
        }
}

/* The rule must not depend on the order in which answers arrive. */
static void test_order_independent(void **st) {
        static ProviderState states[3];
        const Ans in[3] = {A("p1", 'S', 8, "p2"), A("p3", 'S', 8, "p2"), A("p1", 'P', 7, "p1")};
        RuleAnswer answers[3];
        RuleResult first, r;
        Committed cur;
        const size_t perms[6][3] = {{0, 1, 2}, {0, 2, 1}, {1, 0, 2}, {1, 2, 0}, {2, 0, 1}, {2, 1, 0}};

        make_committed(&cur, 7, "p1", NULL);
        for (size_t i = 0; i < 3; i++)
                make_state(&states[i], &in[i]);
        for (size_t p = 0; p < ELEMENTSOF(perms); p++) {
                for (size_t i = 0; i < 3; i++)
                        answers[i] = (RuleAnswer){.ok = true, .state = &states[perms[p][i]]};
                rule_evaluate(&(RuleInput){.current = &cur, .answers = answers, .n_answers = 3}, &r);
                assert_int_equal(r.verdict, RULE_COMMIT);
                /* p1's newer answer (a Standby of p2 at 8) replaces its old one */
                assert_int_equal(r.next.epoch, 8);
                assert_string_equal(r.next.primary.id, "p2");
                assert_int_equal(r.n_stale, 0);
                if (p == 0)
                        first = r;
                assert_true(committed_equal(&r.next, &first.next));
        }
}

int main(void) {
        struct CMUnitTest tests[ELEMENTSOF(cases) + 1];
        size_t n = 0;

        for (size_t i = 0; i < ELEMENTSOF(cases); i++)
                tests[n++] = (struct CMUnitTest){
                        .name = cases[i].name,
                        .test_func = run_case,
                        .initial_state = (void *) &cases[i],
                };
        tests[n++] = (struct CMUnitTest){.name = "order independent", .test_func = test_order_independent};
        return _cmocka_run_group_tests("rule", tests, n, NULL, NULL);
}
