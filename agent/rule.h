/* The Primary-following rule of contract section 3, as a pure function over
 * plain data: the committed pair and one poll round's answers in, a verdict
 * out. No I/O, no clock, no logging; the caller acts on the verdict. */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "provider.h"
#include "state.h"

/* One node's answer in a poll round. */
typedef struct RuleAnswer {
        bool via_load_balancer;     /* asked through the load balancer: discovery only */
        bool ok;                    /* a valid state document (200, or 304 with a cached one) */
        const ProviderState *state; /* valid when ok */
} RuleAnswer;

/* Everything the rule looks at. */
typedef struct RuleInput {
        const Committed *current; /* the committed pair (epoch 0 when none) */
        /* The committed Primary's latest `nodes` list, from the state file:
         * the cluster a majority is counted in never shrinks below it. */
        const NodeRef *known;
        size_t n_known;
        const RuleAnswer *answers;
        size_t n_answers;
        /* false while the round is in flight: only a decision that no
         * missing answer can take back is made (rule 7). */
        bool partial;
} RuleInput;

typedef enum RuleVerdict {
        RULE_KEEP,     /* nothing to commit */
        RULE_COMMIT,   /* commit `next` */
        RULE_CONFLICT, /* two Primaries at the highest candidate epoch: commit nothing */
} RuleVerdict;

typedef enum RuleConfirmation {
        RULE_CONFIRMED_NONE,
        RULE_CONFIRMED_BY_PRIMARY,  /* P' itself answered role=primary at E' */
        RULE_CONFIRMED_BY_MAJORITY, /* a strict majority of P''s cluster */
} RuleConfirmation;

#define RULE_MAX_STALE 16

typedef struct RuleStale {
        char node_id[PROVIDER_ID_MAX + 1];
        uint64_t epoch;
} RuleStale;

typedef struct RuleResult {
        RuleVerdict verdict;
        RuleConfirmation confirmation;     /* for RULE_COMMIT */
        Committed next;                    /* for RULE_COMMIT */
        bool broker_only;                  /* RULE_COMMIT of the same pair with new broker fields */
        unsigned supporters, cluster_size; /* majority arithmetic, for logs */
        unsigned answered;                 /* cluster nodes that answered (rule 7) */
        bool early;                        /* committed before the round ended (rule 7) */

        /* Nodes that answered role=primary below the (resulting) epoch. */
        RuleStale stale[RULE_MAX_STALE];
        size_t n_stale;

        /* Two different nodes claiming primary at one epoch (also at the
         * committed epoch, where nothing is committed anyway). */
        bool conflict;
        uint64_t conflict_epoch;
        char conflict_a[PROVIDER_ID_MAX + 1], conflict_b[PROVIDER_ID_MAX + 1];
} RuleResult;

/* Applies the rule to a whole round, or (in->partial) to the answers in
 * hand while the round is in flight: then the verdict is RULE_COMMIT only
 * when P' confirmed itself, a strict majority of the cluster has answered
 * and no answer names another Primary at an epoch >= E' (rule 7), and
 * RULE_KEEP otherwise, with no stale or conflict findings (the whole round
 * reports those). */
void rule_evaluate(const RuleInput *in, RuleResult *ret);
