/* The persistent state file (JSON): the committed pair, the cluster's node
 * list, and what the update gate must remember across restarts. Written
 * atomically; loaded at start so a restart never goes back to a lower
 * epoch. Pure data and I/O: no logging. */
#pragma once

#include <stdbool.h>
#include <stdint.h>

#include "provider.h"

/* The committed pair (contract section 3). epoch 0: none yet. */
typedef struct Committed {
        uint64_t epoch;
        NodeRef primary;
        BrokerInfo broker;
} Committed;

/* What the update gate and the updater must remember across restarts
 * (contract 8), the "update" object of the file. The manager draws the
 * delay; the updater owns the rest and is handed only this record. */
typedef struct UpdateRecord {
        char applied_version[PROVIDER_VERSION_MAX + 1]; /* last update applied, "" none */

        /* The random delay drawn once per offered version (contract 8). */
        char delay_version[PROVIDER_VERSION_MAX + 1];
        uint64_t delay_not_before_usec; /* CLOCK_REALTIME */

        /* A failing update resumes its backoff after a restart. */
        char failed_version[PROVIDER_VERSION_MAX + 1];
        unsigned failures;
        uint64_t retry_not_before_usec; /* CLOCK_REALTIME */
} UpdateRecord;

typedef struct PersistentState {
        Committed committed;               /* epoch 0: nothing committed yet */
        NodeRef nodes[PROVIDER_NODES_MAX]; /* the committed Primary's latest `nodes` */
        size_t n_nodes;
        UpdateRecord update;
} PersistentState;

/* Loads path into *ret. A missing file gives an empty state and 0. A
 * corrupt one gives -EBADMSG with a reason in err, *ret left empty. */
int state_load(const char *path, PersistentState *ret, char *err, size_t errlen);

/* Serializes and atomically replaces path (mode 0600). */
int state_save(const char *path, const PersistentState *s);

/* Parse/serialize without I/O, for tests and fuzzing. *ret_json is malloc'd. */
int state_parse(const char *json, size_t len, PersistentState *ret, char *err, size_t errlen);
int state_format(const PersistentState *s, char **ret_json);
