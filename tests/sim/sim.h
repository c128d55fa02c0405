/* The deterministic simulation of the daemon's decisions (issue 12), in the
 * manner of FoundationDB's and TigerBeetle's simulators: one seed drives a
 * Provider cluster, the network between it and the daemon, the daemon's
 * effects and its crashes; the real synchronization core (agent/sync.c
 * with rule.c, gate.c, settings_render, state_format/state_parse) decides;
 * after every step the invariants are checked from the simulator's own
 * records. Single-threaded, one global Sim per run, no wall clock: a seed
 * replays exactly.
 *
 *   world.c   the cluster: true history of promotions, node views, faults
 *   fakes.c   SyncIO: the disk, the settings writer, the broker, the updater
 *   check.c   the invariants
 *   sim.c     the scheduler, poll rounds, crashes and restarts, reporting */
#pragma once

#include <setjmp.h>
#include <stdbool.h>
#include <stdint.h>

#include "config.h"
#include "poller.h"
#include "provider.h"
#include "settings.h"
#include "state.h"
#include "sync.h"

/* ---- seeded randomness (splitmix64): one stream per concern, so that the
 * world a seed builds does not depend on what the daemon under test does ---- */

typedef struct Rng {
        uint64_t s;
} Rng;

uint64_t rng_next(Rng *r);
uint64_t rng_below(Rng *r, uint64_t n);               /* [0, n), n > 0 */
uint64_t rng_range(Rng *r, uint64_t lo, uint64_t hi); /* [lo, hi] */
bool rng_permille(Rng *r, unsigned p);                /* true with probability p/1000 */

/* ---- the world ---- */

#define W_MAX_NODES 4
#define W_MAX_HIST  512
#define W_LB_URL    "https://dsm.example:8443"

/* One entry of the true history: a node claimed primary at epoch with this
 * broker. A conflict puts two entries at one epoch. */
typedef struct Pair {
        uint64_t epoch;
        int primary; /* node index */
        BrokerInfo broker;
} Pair;

typedef struct WNode {
        char id[8];
        char url[64];
        bool alive;
        bool claims_primary; /* answers role=primary at its view */
        int view;            /* index into hist: what it last replicated or claimed */
        char version[PROVIDER_VERSION_MAX + 1];
        bool liar;         /* reports a fabricated pair while a standby and lying */
        Pair fake;         /* the fabricated pair (primary may be -1: an unknown id) */
        int nodes_mode;    /* its nodes list: 0 full, 1 partial, 2 empty, 3 self only */
        AgentUpdate offer; /* agent_update it reports (a Primary's offer) */
} WNode;

typedef struct World {
        int n;
        WNode node[W_MAX_NODES];
        Pair hist[W_MAX_HIST];
        int n_hist;
        int cur;         /* index of the current true pair */
        bool conflicted; /* two nodes claim primary at hist[cur].epoch */
        bool has_liar;
        bool liar_persistent;
        bool lying;
        unsigned version_seq; /* Provider versions 9.0.N */
        char target_version[PROVIDER_VERSION_MAX + 1];
        unsigned offer_seq;
        AgentUpdate offer; /* the current Primary's agent_update */
} World;

/* ---- events ---- */

typedef enum EvKind {
        EV_WORLD,    /* a change in the cluster */
        EV_ROUND,    /* start a poll round */
        EV_ANSWER,   /* one answer of the round in flight arrives */
        EV_ONCHANGE, /* the on_change child ends */
        EV_ONCHANGE_RETRY,
        EV_DOWNLOAD, /* the updater's fetch ends */
        EV_COMMAND,  /* the update command ends */
        EV_SIGHUP,
        EV_CRASH,
        EV_QUIET,       /* faults off: the world settles */
        EV_QUIET_CHECK, /* the end of a quiet phase: liveness and on_change */
        EV_END,
} EvKind;

typedef struct Event {
        uint64_t at, seq;
        EvKind kind;
        unsigned incarnation; /* process-bound events die with the process */
        int arg;
} Event;

#define SIM_MAX_EVENTS  64
#define SIM_MAX_TARGETS 16
#define SIM_ROUNDS_KEPT 4
#define SIM_LOG_LINES   80
#define SIM_LOG_LINE    240

/* What the simulator records of one complete round, for invariant 3. */
typedef struct RoundRecord {
        bool direct[W_MAX_NODES]; /* node i answered ok at its own URL */
        char version[W_MAX_NODES][PROVIDER_VERSION_MAX + 1];
        bool primary_claim[W_MAX_NODES]; /* ... with role=primary */
        uint64_t epoch[W_MAX_NODES];
        AgentUpdate offer[W_MAX_NODES];
} RoundRecord;

enum {
        INV_EPOCH = 1, /* 1: the committed epoch never goes down */
        INV_SETTINGS,  /* 2: the settings file (and broker) only name confirmed pairs */
        INV_UPDATE,    /* 3: an update command only while the gate holds */
        INV_ONCHANGE,  /* 4: on_change owed is never lost */
        INV_LIVENESS,  /* a settled cluster is committed */
        INV_MAX,
};

typedef struct Sim {
        uint64_t seed;
        bool verbose;

        Rng world_rng, fault_rng, effect_rng, daemon_rng;
        World w;

        uint64_t mono;          /* CLOCK_MONOTONIC, usec */
        uint64_t realtime_base; /* CLOCK_REALTIME = base + mono */

        Event ev[SIM_MAX_EVENTS];
        size_t n_ev;
        uint64_t ev_seq;
        unsigned incarnation;

        /* knobs drawn per seed */
        int endpoints_mode;
        bool on_change_set;
        unsigned p_loss, p_late, p_crash_effect, p_save_fail, p_onchange_fail, p_download_fail,
                p_command_fail, p_hint, p_stale_nodes;
        uint64_t world_tick_max;
        bool faults;

        /* the daemon */
        Config cfg[2];
        int cfg_cur;
        char *endpoint_store[W_MAX_NODES];
        char *on_change_argv_store[2];
        bool running; /* a Sync exists (false only inside a crash) */
        Sync sync;
        jmp_buf crash_jmp;
        bool crash_armed;

        /* the poller shim: targets and the round in flight */
        PollAnswer answers[SIM_MAX_TARGETS];
        size_t n_answers, n_pending;
        bool in_flight, round_pending;
        ProviderState snapshot[SIM_MAX_TARGETS]; /* taken when asked */
        PollOutcome snap_outcome[SIM_MAX_TARGETS];
        struct {
                char url[64];
                ProviderState state;
        } kept[SIM_MAX_TARGETS]; /* the poller's last good answer per URL (304s) */
        size_t n_kept;
        uint64_t fast_delay;
        unsigned discovery_rounds;

        /* the disk */
        char *state_bytes;
        size_t state_len;
        PersistentState disk_state; /* state_parse of state_bytes, at each save */
        bool disk_bad;
        char settings[SETTINGS_MAX];
        int settings_len; /* -1: no file */
        bool marker;      /* on_change owed, durable */
        char installed[PROVIDER_VERSION_MAX + 1];
        bool have_package; /* a verified package kept under download_dir */
        AgentUpdate package;

        /* the settings writer's on_change */
        bool sw_running, sw_owed, sw_recover;
        unsigned sw_failures;
        uint64_t write_seq, run_seq, ok_seq;
        char run_content[SETTINGS_MAX], ok_content[SETTINGS_MAX];

        /* the broker */
        BrokerInfo broker_target;
        bool have_broker_target;

        /* the updater */
        UpdaterPhase up_phase;
        AgentUpdate up_offer;

        /* records for the invariants */
        uint64_t max_epoch_mem, max_epoch_disk;
        RoundRecord rounds[SIM_ROUNDS_KEPT];
        unsigned n_rounds; /* complete rounds of this incarnation */
        char succeeded[32][PROVIDER_VERSION_MAX + 1];
        size_t n_succeeded;
        char disk_delay_version[PROVIDER_VERSION_MAX + 1];
        uint64_t disk_delay_usec;

        /* statistics */
        uint64_t steps, rounds_done, commits, crashes, applies, downloads, writes, onchange_ok;

        /* the step log (a ring) and the verdict */
        char log[SIM_LOG_LINES][SIM_LOG_LINE];
        uint64_t n_log;
        int failed; /* INV_*, 0 none */
        char failure[512];
} Sim;

extern Sim *S;

/* sim.c */
uint64_t sim_realtime(void);
void sim_log(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void sim_fail(int inv, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void sim_schedule(uint64_t delay, EvKind kind, bool process_bound, int arg);
void sim_hint(void);
const Config *sim_config(void);

/* world.c */
void world_init(World *w, Rng *r);
void world_tick(World *w, Rng *r, bool faults);
void world_settle(World *w, Rng *r);
void world_catch_up_all(World *w);
bool world_pair_true(const World *w, uint64_t epoch, const char *primary_id, const char *api_url,
                     const BrokerInfo *b);
int world_node_by_url(const World *w, const char *url);
/* The answer of the node at url (or of the load balancer) at this moment;
 * false when nobody answers (dead node, no live node behind the LB). */
bool world_answer(const World *w, Rng *r, const char *url, ProviderState *ret);
void world_describe(const World *w, char *buf, size_t size);

/* fakes.c */
void fakes_io(SyncIO *io);
void fakes_restart(void); /* the process-side state of the fakes, after a crash */
void fakes_crash(void);   /* the process dies: what survives of its children */
void fakes_settings_apply(void *userdata, const Committed *c);
void fakes_broker_move(void *userdata, const BrokerInfo *target);
void fakes_onchange_done(void);
void fakes_onchange_retry(void);
void fakes_download_done(void);
void fakes_command_done(void);
bool fakes_settings_busy(void *userdata);
void fakes_crash_point(const char *where); /* may longjmp */
int fakes_parse_settings(const char *text, Committed *ret);

/* check.c */
void check_step(void);
void check_settings_now(void); /* invariant 2 alone, inside an effect */
void check_command_start(const AgentUpdate *offer);
void check_quiet(void);
void check_round_done(const PollRound *round);
