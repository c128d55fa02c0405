/* The synchronization core: what the daemon decides when a poll round's
 * answers come in, as plain data in and effects out. It owns the persistent
 * state (the committed pair, the cluster's nodes, the update record), the
 * latest rule verdict, the offer of the latest round (computed once; the
 * status document reads it), the update gate's memory across rounds and its
 * verdict. It does no I/O of its own: the clock and every effect (state
 * file, settings file, broker, updater) go through SyncIO, which the
 * manager implements with the real modules on sd-event, and the
 * deterministic simulation (tests/sim) with seeded fakes on a simulated
 * clock. The order it keeps is the daemon's spine:
 *
 *   rule -> state file (durable) -> settings file + on_change -> broker
 *   gate -> fetch (download/verify) -> gate again, at that moment -> apply
 */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <time.h>

#include "config.h"
#include "gate.h"
#include "poller.h"
#include "provider.h"
#include "rule.h"
#include "state.h"
#include "updater.h"

#define SYNC_MAX_CHANGE_TIMES 8

typedef struct SyncIO {
        void *userdata;
        /* CLOCK_MONOTONIC for intervals, CLOCK_REALTIME for what is shown or persisted. */
        uint64_t (*now)(void *userdata, clockid_t clock);
        /* Makes s durable (write, fsync, rename, fsync dir) before returning 0. */
        int (*state_save)(void *userdata, const PersistentState *s);
        /* Makes the settings file say c, then runs on_change; asynchronous
         * (settings_busy() is true until on_change succeeded). */
        void (*settings_apply)(void *userdata, const Committed *c);
        bool (*settings_busy)(void *userdata);
        /* Connect to (or move to) the committed Primary's broker. */
        void (*broker_move)(void *userdata, const BrokerInfo *target);
        /* The first line of agent_version_file, "" when unknown. */
        void (*read_installed)(void *userdata, char *buf, size_t size);
        /* The updater. fetch: download the offer (or re-check a kept
         * package); it ends later with sync_update_ready() (verified) or a
         * failure recorded in the update record and sync_update_changed().
         * apply: run the command for the verified package now. */
        UpdaterPhase (*update_phase)(void *userdata);
        int (*update_fetch)(void *userdata, const AgentUpdate *offer, const char *trusted_api_url);
        int (*update_apply)(void *userdata, const AgentUpdate *offer);
} SyncIO;

typedef struct Sync {
        const Config *config; /* borrowed; sync_reconfigure() replaces it */
        SyncIO io;
        bool once; /* --once: never fetch or apply an update */

        PersistentState state;
        bool state_save_failed; /* a commit waits for the state file */

        RuleResult last_rule; /* of the latest complete round */

        /* The latest complete round as the gate sees it. */
        bool have_offer;
        AgentUpdate offer; /* the committed Primary's agent_update at the committed epoch */
        GateNode nodes[PROVIDER_NODES_MAX];
        size_t n_nodes;
        unsigned agreeing_rounds;
        uint64_t agreement_counted_usec; /* CLOCK_MONOTONIC */
        char agreeing_version[PROVIDER_VERSION_MAX + 1];
        char installed_version[PROVIDER_VERSION_MAX + 1];
        char refused_update_version[PROVIDER_VERSION_MAX + 1]; /* logged once */
        GateResult gate;

        /* Commits, for the status document and the flapping warning. */
        uint64_t changes;
        uint64_t last_change_usec;                    /* CLOCK_REALTIME, 0 never */
        uint64_t change_times[SYNC_MAX_CHANGE_TIMES]; /* CLOCK_MONOTONIC of Primary changes */
        size_t n_change_times;
} Sync;

/* Starts from a loaded state (the state file's content, or empty). No
 * allocation: a Sync may simply be dropped (the simulation's crashes). The
 * updater writes its record into s->state.update: hand it that pointer
 * after sync_init(), and tell the core with sync_update_changed(). */
void sync_init(Sync *s, const Config *cfg, const SyncIO *io, const PersistentState *loaded, bool once);
void sync_reconfigure(Sync *s, const Config *cfg);
/* Writes the persistent state now (logged on failure). */
int sync_save_state(Sync *s);

/* Rule 7, while the round is in flight: commits when the answers in hand
 * already decide. Returns true when it committed. */
bool sync_round_progress(Sync *s, const PollRound *round);
/* The whole round: the rule (commit, or conflict/stale findings in
 * *ret_rule and s->last_rule), the cluster's nodes list, then the gate. */
void sync_round_done(Sync *s, const PollRound *round, RuleResult *ret_rule);
/* The updater holds a verified package: the gate is evaluated again at this
 * moment (the latest round's answers, the clock now, the config now, the
 * settings writer now) and the command runs only when it is open for the
 * same offer. */
void sync_update_ready(Sync *s, const AgentUpdate *verified);
/* The updater changed the update record (applied, failed): save it. */
void sync_update_changed(Sync *s);
