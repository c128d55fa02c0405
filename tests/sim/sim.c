/* The deterministic simulation's driver (see sim.h): the event scheduler on
 * a simulated clock, the poll rounds as the poller would deliver them (one
 * answer at a time, in a seeded order, with losses and delays), SIGHUP,
 * crashes and restarts from what is on the fake disk, and the report.
 *
 *   build/tests/sim                 seeds 1..2000
 *   build/tests/sim --seeds 1-300,828   ranges and seeds
 *   build/tests/sim --seed 42 -v    replays one seed with its whole step log */
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "log.h"
#include "macro.h"
#include "sim.h"
#include "util.h"

#define SEC    USEC_PER_SEC
#define MSEC   USEC_PER_MSEC
#define MINUTE (60 * SEC)

#define CHAOS_LEN  (45 * MINUTE)
#define QUIET_LEN  (6 * MINUTE)
#define N_CYCLES   2
#define START_2026 UINT64_C(1767225600) /* 2026-01-01T00:00:00Z */

static Sim sim_storage;
Sim *S = &sim_storage;

static const char *const inv_names[INV_MAX] = {
        [INV_EPOCH] = "1 epoch never goes down",
        [INV_SETTINGS] = "2 settings/broker only name confirmed pairs",
        [INV_UPDATE] = "3 update command only while the gate holds",
        [INV_ONCHANGE] = "4 on_change owed is never lost",
        [INV_LIVENESS] = "liveness: a settled Primary is committed",
};

uint64_t sim_realtime(void) {
        return S->realtime_base + S->mono;
}

const Config *sim_config(void) {
        return &S->cfg[S->cfg_cur];
}

void sim_log(const char *fmt, ...) {
        char *line = S->log[S->n_log++ % SIM_LOG_LINES];
        int n = snprintf(line, SIM_LOG_LINE, "%8.3fs ", (double) S->mono / SEC);
        va_list ap;

        va_start(ap, fmt);
        vsnprintf(line + n, SIM_LOG_LINE - (size_t) n, fmt, ap);
        va_end(ap);
        if (S->verbose)
                printf("%s\n", line);
}

void sim_fail(int inv, const char *fmt, ...) {
        va_list ap;

        if (S->failed)
                return;
        S->failed = inv;
        va_start(ap, fmt);
        vsnprintf(S->failure, sizeof(S->failure), fmt, ap);
        va_end(ap);
        sim_log("VIOLATION of invariant %s: %s", inv_names[inv], S->failure);
}

/* ---- the event queue ---- */

void sim_schedule(uint64_t delay, EvKind kind, bool process_bound, int arg) {
        if (S->n_ev == SIM_MAX_EVENTS) {
                fprintf(stderr, "sim: event queue full (seed %" PRIu64 ")\n", S->seed);
                abort();
        }
        S->ev[S->n_ev++] = (Event){.at = S->mono + delay,
                                   .seq = S->ev_seq++,
                                   .kind = kind,
                                   .incarnation = process_bound ? S->incarnation : 0,
                                   .arg = arg};
}

static bool next_event(Event *ret) {
        size_t best = 0;

        if (S->n_ev == 0)
                return false;
        for (size_t i = 1; i < S->n_ev; i++)
                if (S->ev[i].at < S->ev[best].at ||
                    (S->ev[i].at == S->ev[best].at && S->ev[i].seq < S->ev[best].seq))
                        best = i;
        *ret = S->ev[best];
        S->ev[best] = S->ev[--S->n_ev];
        return true;
}

/* The process died: its timers, children and requests die with it. */
static void purge_process_events(void) {
        for (size_t i = 0; i < S->n_ev;)
                if (S->ev[i].incarnation)
                        S->ev[i] = S->ev[--S->n_ev];
                else
                        i++;
}

static uint64_t daemon_random(void *userdata) {
        return rng_next(&S->daemon_rng);
}

/* ---- configuration ---- */

static void config_window(Config *c) {
        unsigned now_min = (unsigned) ((sim_realtime() / MINUTE) % 1440);

        c->window_set = rng_permille(&S->fault_rng, 400);
        if (!c->window_set)
                return;
        c->window_start_min = (now_min + 1440 - 120 + (unsigned) rng_below(&S->fault_rng, 180)) % 1440;
        c->window_end_min = (c->window_start_min + 60 + (unsigned) rng_below(&S->fault_rng, 240)) % 1440;
}

static void config_init(Config *c) {
        const World *w = &S->w;
        int first = S->endpoints_mode == 4 && w->n > 2 ? 2 : S->endpoints_mode >= 2 ? 1 : w->n;

        *c = (Config){.path = "/sim/agent-sync.ini",
                      .poll_interval = 30 * SEC,
                      .poll_jitter = 0.2,
                      .fast_poll_interval = 500 * MSEC,
                      .request_timeout = 5 * SEC,
                      .settings_file = "/sim/rabbitmq.ini",
                      .settings_mode = 0640,
                      .on_change_timeout = 30 * SEC,
                      .update_enabled = rng_permille(&S->fault_rng, 800),
                      .stable_rounds = 1 + (unsigned) rng_below(&S->fault_rng, 3),
                      .max_delay = rng_below(&S->fault_rng, 5 * MINUTE),
                      .state_file = "/sim/state.json"};
        if (S->endpoints_mode != 3)
                for (int i = 0; i < first; i++)
                        c->endpoints[c->n_endpoints++] = S->endpoint_store[i];
        if (S->endpoints_mode == 0 || S->endpoints_mode == 2 || S->endpoints_mode == 3)
                c->load_balancer = W_LB_URL;
        if (S->on_change_set)
                c->on_change_argv = S->on_change_argv_store;
        config_window(c);
}

/* SIGHUP: a new Config takes effect whole (the old one stays valid until
 * the next SIGHUP: the core borrows it). */
static void sighup(void) {
        Config *next = &S->cfg[!S->cfg_cur];

        *next = *sim_config();
        if (rng_permille(&S->fault_rng, 500))
                next->update_enabled = !next->update_enabled;
        next->stable_rounds = 1 + (unsigned) rng_below(&S->fault_rng, 3);
        config_window(next);
        S->cfg_cur = !S->cfg_cur;
        sim_log("SIGHUP: update %s, stable_rounds %u, window %s %02u:%02u-%02u:%02u",
                next->update_enabled ? "enabled" : "disabled", next->stable_rounds,
                next->window_set ? "set" : "none", next->window_start_min / 60, next->window_start_min % 60,
                next->window_end_min / 60, next->window_end_min % 60);
        if (S->running)
                sync_reconfigure(&S->sync, next);
}

/* ---- poll rounds ---- */

typedef struct Targets {
        char url[SIM_MAX_TARGETS][PROVIDER_URL_MAX + 1];
        bool lb[SIM_MAX_TARGETS], configured[SIM_MAX_TARGETS];
        size_t n;
} Targets;

static void target_add(Targets *t, const char *url, bool lb, bool configured) {
        for (size_t i = 0; i < t->n; i++)
                if (strcmp(t->url[i], url) == 0)
                        return;
        if (t->n == SIM_MAX_TARGETS)
                return;
        strscpy(t->url[t->n], sizeof(t->url[0]), url);
        t->lb[t->n] = lb;
        t->configured[t->n++] = configured;
}

/* As the manager: the configured endpoints and load balancer, the
 * committed Primary's nodes, what the load balancer reported, and while
 * nothing is committed what any node reported. */
static void targets_build(Targets *t) {
        const Config *c = sim_config();
        const PersistentState *st = &S->sync.state;

        t->n = 0;
        for (size_t i = 0; i < c->n_endpoints; i++)
                target_add(t, c->endpoints[i], false, true);
        if (c->load_balancer)
                target_add(t, c->load_balancer, true, true);
        for (size_t i = 0; i < st->n_nodes; i++)
                target_add(t, st->nodes[i].api_url, false, false);
        for (size_t i = 0; i < S->n_answers; i++) {
                const PollAnswer *a = &S->answers[i];
                if (a->ok && (a->via_load_balancer || st->committed.epoch == 0))
                        for (size_t k = 0; k < a->state.n_nodes; k++)
                                target_add(t, a->state.nodes[k].api_url, false, false);
        }
}

static ProviderState *kept_state(const char *url) {
        for (size_t i = 0; i < S->n_kept; i++)
                if (strcmp(S->kept[i].url, url) == 0)
                        return &S->kept[i].state;
        if (S->n_kept == SIM_MAX_TARGETS)
                return NULL;
        strscpy(S->kept[S->n_kept].url, sizeof(S->kept[0].url), url);
        memset(&S->kept[S->n_kept].state, 0, sizeof(ProviderState));
        return &S->kept[S->n_kept++].state;
}

static void round_start(void) {
        const uint64_t timeout = sim_config()->request_timeout;
        Targets t;

        if (S->in_flight) {
                S->round_pending = true;
                return;
        }
        targets_build(&t);
        S->n_answers = t.n;
        S->n_pending = t.n;
        S->in_flight = true;
        S->round_pending = false;
        for (size_t i = 0; i < t.n; i++) {
                PollAnswer *a = &S->answers[i];
                ProviderState *k = kept_state(t.url[i]);
                bool up = world_answer(&S->w, &S->fault_rng, t.url[i], &S->snapshot[i]);
                uint64_t delay;

                *a = (PollAnswer){.via_load_balancer = t.lb[i],
                                  .configured = t.configured[i],
                                  .outcome = POLL_PENDING};
                strscpy(a->url, sizeof(a->url), t.url[i]);
                if (k && k->node.id[0]) {
                        a->state = *k;
                        a->have_state = true;
                }
                if (up && S->faults && rng_permille(&S->fault_rng, S->p_loss))
                        up = false; /* lost: a 503, a reset, a timeout */
                S->snap_outcome[i] = up ? POLL_OK : POLL_ERROR;
                if (!up)
                        delay = rng_permille(&S->fault_rng, 500) ? rng_range(&S->fault_rng, MSEC, 50 * MSEC)
                                                                 : timeout;
                else if (S->faults && rng_permille(&S->fault_rng, S->p_late))
                        delay = rng_range(&S->fault_rng, 150 * MSEC, timeout);
                else
                        delay = rng_range(&S->fault_rng, MSEC, 150 * MSEC);
                sim_schedule(delay, EV_ANSWER, true, (int) i);
        }
        sim_log("round starts: %zu targets", t.n);
}

static void round_schedule_next(bool primary_answered) {
        const Config *c = sim_config();
        Targets t;
        bool discovered = false;

        targets_build(&t);
        for (size_t i = 0; i < t.n; i++) {
                bool known = false;
                for (size_t j = 0; j < S->n_answers && !known; j++)
                        known = strcmp(S->answers[j].url, t.url[i]) == 0;
                discovered |= !known;
        }
        if (discovered && S->discovery_rounds < 3) {
                S->discovery_rounds++;
                S->round_pending = true;
        } else
                S->discovery_rounds = 0;
        if (S->round_pending) {
                sim_schedule(0, EV_ROUND, true, 0);
                return;
        }
        if (primary_answered) {
                S->fast_delay = 0;
                sim_schedule(jittered(c->poll_interval, c->poll_jitter), EV_ROUND, true, 0);
                return;
        }
        S->fast_delay = backoff_next(S->fast_delay, c->fast_poll_interval, c->poll_interval);
        sim_schedule(jittered(S->fast_delay, c->poll_jitter), EV_ROUND, true, 0);
}

static void log_answer(const PollAnswer *a) {
        const ProviderState *s = &a->state;

        if (!a->ok) {
                sim_log("  answer %s: error", a->url + 8);
                return;
        }
        sim_log("  answer %s%s: %s %s e%" PRIu64 " primary %s broker %s:%u%s nodes %zu v%s offer %s",
                a->url + 8, a->via_load_balancer ? " (lb)" : "", s->node.id,
                s->role == NODE_ROLE_PRIMARY ? "PRIMARY" : "standby", s->epoch, s->primary.id,
                s->broker.host, s->broker.port, s->broker.tls ? " tls" : "", s->n_nodes, s->version,
                s->update.present ? s->update.version : "-");
}

static bool primary_answered(void) {
        const Committed *c = &S->sync.state.committed;
        const RoundRecord *r = &S->rounds[(S->n_rounds - 1) % SIM_ROUNDS_KEPT];

        for (int i = 0; i < S->w.n; i++)
                if (strcmp(S->w.node[i].id, c->primary.id) == 0)
                        return r->direct[i] && r->primary_claim[i] && r->epoch[i] == c->epoch;
        return false;
}

static void round_answer(size_t i) {
        PollAnswer *a = &S->answers[i];
        PollRound round;
        RuleResult res;

        if (S->snap_outcome[i] == POLL_OK) {
                ProviderState *k = kept_state(a->url);
                bool same = k && memcmp(k, &S->snapshot[i], sizeof(*k)) == 0;

                a->outcome = same && rng_permille(&S->fault_rng, 500) ? POLL_NOT_MODIFIED : POLL_OK;
                a->ok = a->have_state = true;
                a->state = S->snapshot[i];
                a->last_seen_usec = sim_realtime();
                a->error[0] = 0;
                if (k)
                        *k = S->snapshot[i];
        } else {
                a->outcome = POLL_ERROR;
                a->ok = false;
                strscpy(a->error, sizeof(a->error), "timeout");
        }
        log_answer(a);
        S->n_pending--;
        round = (PollRound){.answers = S->answers,
                            .n_answers = S->n_answers,
                            .n_pending = S->n_pending,
                            .in_flight = S->n_pending > 0};
        if (S->n_pending > 0) {
                uint64_t before = S->sync.state.committed.epoch;
                if (sync_round_progress(&S->sync, &round)) {
                        S->commits++;
                        sim_log("early commit (rule 7): epoch %" PRIu64 " -> %" PRIu64 " %s", before,
                                S->sync.state.committed.epoch, S->sync.state.committed.primary.id);
                }
                return;
        }
        S->in_flight = false;
        check_round_done(&round);
        sync_round_done(&S->sync, &round, &res);
        S->rounds_done++;
        if (res.verdict == RULE_COMMIT)
                S->commits++;
        sim_log("round done: %s -> committed e%" PRIu64 " %s (%zu nodes known); gate %s %s",
                res.verdict == RULE_COMMIT     ? "COMMIT"
                : res.verdict == RULE_CONFLICT ? "conflict"
                                               : "keep",
                S->sync.state.committed.epoch, S->sync.state.committed.primary.id, S->sync.state.n_nodes,
                gate_state_to_string(S->sync.gate.state), S->sync.gate.reason);
        round_schedule_next(primary_answered());
}

void sim_hint(void) {
        if (!S->running)
                return;
        if (S->in_flight)
                S->round_pending = true;
        else
                sim_schedule(rng_range(&S->fault_rng, 0, 50 * MSEC), EV_ROUND, true, 0);
}

/* ---- start, crash, restart ---- */

/* As the daemon starts: the state file read back, the core, then the
 * settings file made current (an owed on_change runs), the broker, and a
 * round at once. A crash inside any of it starts over. */
static void daemon_start(void) {
        SyncIO io;

        for (;;) {
                PersistentState loaded = {};
                char err[256];

                S->incarnation++;
                purge_process_events();
                S->in_flight = S->round_pending = false;
                S->n_answers = S->n_pending = 0;
                S->n_kept = 0;
                S->n_rounds = 0;
                S->fast_delay = 0;
                S->discovery_rounds = 0;
                fakes_restart();
                if (S->state_bytes &&
                    state_parse(S->state_bytes, S->state_len, &loaded, err, sizeof(err)) < 0) {
                        sim_fail(INV_EPOCH, "the state file does not parse at start: %s", err);
                        return;
                }
                fakes_io(&io);
                sync_init(&S->sync, sim_config(), &io, &loaded, false);
                S->running = true;
                sim_log("daemon starts: state file epoch %" PRIu64 " %s", loaded.committed.epoch,
                        loaded.committed.primary.id);
                if (setjmp(S->crash_jmp) == 0) {
                        S->crash_armed = true;
                        if (loaded.committed.epoch > 0) {
                                fakes_settings_apply(NULL, &loaded.committed);
                                fakes_broker_move(NULL, &loaded.committed.broker);
                        }
                        S->crash_armed = false;
                        sim_schedule(0, EV_ROUND, true, 0);
                        return;
                }
                S->crash_armed = false;
                S->running = false;
                fakes_crash();
        }
}

static void crash_and_restart(void) {
        S->running = false;
        fakes_crash();
        daemon_start();
}

/* ---- one step ---- */

static void handle(const Event *e) {
        char buf[512];

        switch (e->kind) {
        case EV_WORLD:
                if (S->faults) {
                        world_tick(&S->w, &S->world_rng, true);
                        world_describe(&S->w, buf, sizeof(buf));
                        sim_log("world: %s", buf);
                }
                if (rng_permille(&S->world_rng, S->p_hint))
                        sim_hint(); /* an event on the broker, a notify */
                sim_schedule(rng_range(&S->world_rng, SEC, S->world_tick_max), EV_WORLD, false, 0);
                break;
        case EV_ROUND:
                round_start();
                break;
        case EV_ANSWER:
                round_answer((size_t) e->arg);
                break;
        case EV_ONCHANGE:
                fakes_onchange_done();
                break;
        case EV_ONCHANGE_RETRY:
                fakes_onchange_retry();
                break;
        case EV_DOWNLOAD:
                fakes_download_done();
                break;
        case EV_COMMAND:
                fakes_command_done();
                break;
        case EV_SIGHUP:
                sighup();
                sim_schedule(rng_range(&S->fault_rng, 2 * MINUTE, 30 * MINUTE), EV_SIGHUP, false, 0);
                break;
        case EV_CRASH:
                if (S->faults) {
                        sim_log("CRASH (at a random moment, updater %d, on_change %s)", S->up_phase,
                                S->sw_running ? "running" : "idle");
                        crash_and_restart();
                }
                sim_schedule(rng_range(&S->fault_rng, MINUTE, 20 * MINUTE), EV_CRASH, false, 0);
                break;
        case EV_QUIET:
                S->faults = false;
                world_settle(&S->w, &S->world_rng);
                world_describe(&S->w, buf, sizeof(buf));
                sim_log("QUIET: faults off, the cluster settles: %s", buf);
                sim_hint();
                sim_schedule(QUIET_LEN, EV_QUIET_CHECK, false, e->arg);
                break;
        case EV_QUIET_CHECK:
                check_quiet();
                if ((unsigned) e->arg + 1 < N_CYCLES) {
                        S->faults = true;
                        sim_schedule(CHAOS_LEN, EV_QUIET, false, e->arg + 1);
                } else
                        sim_schedule(0, EV_END, false, 0);
                break;
        case EV_END:
                break;
        }
}

static void knobs_init(void) {
        Rng *r = &S->fault_rng;
        bool calm = rng_permille(r, 250); /* some seeds only settle and update */

        S->endpoints_mode = (int) rng_below(r, 5);
        S->on_change_set = rng_permille(r, 800);
        S->p_loss = calm ? 0 : (unsigned) rng_below(r, 300);
        S->p_late = calm ? 0 : (unsigned) rng_below(r, 400);
        S->p_crash_effect = calm || rng_permille(r, 300) ? 0 : (unsigned) rng_range(r, 5, 60);
        S->p_save_fail = calm || rng_permille(r, 500) ? 0 : (unsigned) rng_below(r, 50);
        S->p_onchange_fail = calm ? 0 : (unsigned) rng_below(r, 400);
        S->p_download_fail = (unsigned) rng_below(r, 300);
        S->p_command_fail = (unsigned) rng_below(r, 300);
        S->p_hint = (unsigned) rng_range(r, 100, 700);
        S->world_tick_max = calm ? 5 * MINUTE : rng_range(r, 20 * SEC, 2 * MINUTE);
}

static void run_seed(uint64_t seed, bool verbose) {
        Event e;

        free(S->state_bytes);
        memset(S, 0, sizeof(*S));
        S->seed = seed;
        S->verbose = verbose;
        S->world_rng.s = seed * 0x9e3779b97f4a7c15ULL + 1;
        S->fault_rng.s = seed * 0xd1b54a32d192ed03ULL + 2;
        S->effect_rng.s = seed * 0x8cb92ba72f3d8dd7ULL + 3;
        S->daemon_rng.s = seed * 0xaef17502108ef2d9ULL + 4;
        random_set_source(daemon_random, NULL);
        S->realtime_base = (START_2026 + rng_below(&S->world_rng, 365 * 86400)) * SEC;
        world_init(&S->w, &S->world_rng);
        for (int i = 0; i < S->w.n; i++)
                S->endpoint_store[i] = S->w.node[i].url;
        S->on_change_argv_store[0] = "/usr/bin/true";
        knobs_init();
        config_init(&S->cfg[0]);
        S->settings_len = -1;
        strscpy(S->installed, sizeof(S->installed), "9.0.0");
        S->faults = true;

        sim_schedule(rng_range(&S->world_rng, SEC, S->world_tick_max), EV_WORLD, false, 0);
        sim_schedule(rng_range(&S->fault_rng, 2 * MINUTE, 30 * MINUTE), EV_SIGHUP, false, 0);
        if (S->p_crash_effect)
                sim_schedule(rng_range(&S->fault_rng, MINUTE, 20 * MINUTE), EV_CRASH, false, 0);
        sim_schedule(CHAOS_LEN, EV_QUIET, false, 0);
        daemon_start();

        while (!S->failed && next_event(&e) && e.kind != EV_END) {
                if (e.incarnation && e.incarnation != S->incarnation)
                        continue;
                S->mono = e.at;
                S->steps++;
                if (setjmp(S->crash_jmp) == 0) {
                        S->crash_armed = true;
                        handle(&e);
                        S->crash_armed = false;
                } else
                        crash_and_restart();
                check_step();
        }
}

/* ---- the report ---- */

typedef struct Totals {
        uint64_t runs, failed, steps, rounds, commits, crashes, applies, downloads, writes, onchange_ok;
        uint64_t per_inv[INV_MAX];
        uint64_t failing[32];
        size_t n_failing;
        unsigned tails;
} Totals;

static void print_tail(void) {
        uint64_t from = S->n_log > SIM_LOG_LINES ? S->n_log - SIM_LOG_LINES : 0;

        printf("---- seed %" PRIu64 ": the last %" PRIu64 " steps of the log ----\n", S->seed,
               S->n_log - from);
        for (uint64_t i = from; i < S->n_log; i++)
                printf("  %s\n", S->log[i % SIM_LOG_LINES]);
        printf("FAIL seed %" PRIu64 ": invariant %s: %s\n", S->seed, inv_names[S->failed], S->failure);
        printf("replay: build/tests/sim --seed %" PRIu64 " -v\n", S->seed);
}

static void account(Totals *t) {
        t->runs++;
        t->steps += S->steps;
        t->rounds += S->rounds_done;
        t->commits += S->commits;
        t->crashes += S->crashes;
        t->applies += S->applies;
        t->downloads += S->downloads;
        t->writes += S->writes;
        t->onchange_ok += S->onchange_ok;
        if (!S->failed)
                return;
        t->failed++;
        t->per_inv[S->failed]++;
        if (t->n_failing < ELEMENTSOF(t->failing))
                t->failing[t->n_failing++] = S->seed;
        if (t->tails < 2 && !S->verbose) {
                t->tails++;
                print_tail();
        }
}

static void report(const Totals *t, const char *seeds, double secs) {
        printf("sim: seeds %s: %" PRIu64 " runs, %" PRIu64 " failed; %" PRIu64
               " steps in %.2f s (%.0f steps/s)\n",
               seeds, t->runs, t->failed, t->steps, secs, secs > 0 ? (double) t->steps / secs : 0.0);
        printf("sim: %" PRIu64 " rounds, %" PRIu64 " commits, %" PRIu64 " settings writes, %" PRIu64
               " on_change runs, %" PRIu64 " crashes, %" PRIu64 " downloads, %" PRIu64 " update commands\n",
               t->rounds, t->commits, t->writes, t->onchange_ok, t->crashes, t->downloads, t->applies);
        for (int i = 1; i < INV_MAX; i++)
                printf("sim:   invariant %-46s %" PRIu64 " seeds failed\n", inv_names[i], t->per_inv[i]);
        if (t->n_failing) {
                printf("sim: failing seeds:");
                for (size_t i = 0; i < t->n_failing; i++)
                        printf(" %" PRIu64, t->failing[i]);
                printf("%s\n", t->failed > t->n_failing ? " ..." : "");
        }
}

static double wall_seconds(void) {
        struct timespec ts;

        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (double) ts.tv_sec + (double) ts.tv_nsec / 1e9;
}

static int usage(void) {
        fprintf(stderr, "usage: sim [--seed N [-v]] [--seeds A-B,C,D-E...] [--count N]\n");
        return 2;
}

/* Runs "A-B,C,..." (each item a seed or a range); false on a malformed list. */
static bool run_seeds(const char *list, bool verbose, Totals *t) {
        for (const char *p = list; *p;) {
                uint64_t a, b;
                int n = 0;

                if (sscanf(p, "%" SCNu64 "-%" SCNu64 "%n", &a, &b, &n) == 2 && n > 0)
                        ;
                else if (sscanf(p, "%" SCNu64 "%n", &a, &n) == 1 && n > 0)
                        b = a;
                else
                        return false;
                if (b < a)
                        return false;
                for (uint64_t seed = a; seed <= b; seed++) {
                        run_seed(seed, verbose);
                        account(t);
                        if (verbose && S->failed)
                                printf("FAIL seed %" PRIu64 ": invariant %s: %s\n", seed,
                                       inv_names[S->failed], S->failure);
                }
                p += n;
                if (*p == ',')
                        p++;
                else if (*p)
                        return false;
        }
        return true;
}

int main(int argc, char **argv) {
        char seeds[256] = "1-2000";
        bool verbose = false;
        Totals t = {};
        double start;

        for (int i = 1; i < argc; i++) {
                if (strcmp(argv[i], "-v") == 0)
                        verbose = true;
                else if ((strcmp(argv[i], "--seed") == 0 || strcmp(argv[i], "--seeds") == 0) && i + 1 < argc)
                        snprintf(seeds, sizeof(seeds), "%s", argv[++i]);
                else if (strcmp(argv[i], "--count") == 0 && i + 1 < argc)
                        snprintf(seeds, sizeof(seeds), "1-%s", argv[++i]);
                else
                        return usage();
        }
        /* The core's own log lines join the step log when replaying. */
        log_setup(LOG_TARGET_STDERR, verbose ? LOG_DEBUG : -1);
        setvbuf(stdout, NULL, _IOLBF, 0);
        start = wall_seconds();
        if (!run_seeds(seeds, verbose, &t))
                return usage();
        report(&t, seeds, wall_seconds() - start);
        return t.failed ? 1 : 0;
}
