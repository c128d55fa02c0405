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
#include "discovery.h"
#include "lockfile.h"
#include "log.h"
#include "macro.h"
#include "util.h"

#define MAX_LOGGED_STALE     16
#define MAX_DISCOVERY_ROUNDS 3
#define HINT_BURST           4 /* hint rounds that may start at once */
#define HINT_RATE            8 /* hint rounds per second after the burst */

/* ---- the round scheduler ---- */

static void on_round_done(Poller *p, void *userdata);
static void on_round_answer(Poller *p, size_t index, void *userdata);
static const PollerCallbacks poller_callbacks = {.answer = on_round_answer, .done = on_round_done};

static int on_poll_timer(sd_event_source *s, uint64_t usec, void *userdata) {
        Manager *m = userdata;

        /* The deferred hint round is this one, whatever armed the timer. */
        if (m->hint_deferred)
                ratelimit_charge(&m->hint_bucket, now_usec(CLOCK_MONOTONIC));
        manager_request_round(m, NULL);
        return 0;
}

/* Steady unless the Primary is unknown or its broker connection was lost.
 * A connection being set up for a newly committed Primary is no loss:
 * with a fleet moving at once, fast polls there would multiply the
 * Provider's load exactly when it has just failed over (issue 14); only a
 * failed attempt counts. */
static bool manager_steady(Manager *m) {
        if (m->sync.state.committed.epoch == 0)
                return false;
        return !m->broker || !m->broker_lost;
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
                m->fast_delay_usec =
                        backoff_next(m->fast_delay_usec, c->fast_poll_interval, c->poll_interval);
                delay = m->fast_delay_usec;
        }
        delay = jittered(delay, c->poll_jitter);
        (void) sd_event_source_set_time(m->poll_timer, now_usec(CLOCK_MONOTONIC) + delay);
        (void) sd_event_source_set_enabled(m->poll_timer, SD_EVENT_ONESHOT);
}

void manager_start_round(Manager *m) {
        int r;

        (void) sd_event_source_set_enabled(m->poll_timer, SD_EVENT_OFF);
        m->round_pending = false;
        m->hint_pending = false;
        m->hint_deferred = false;
        m->metrics.round_started_usec = now_usec(CLOCK_MONOTONIC);
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

/* ---- after a round: discovery ---- */

/* Returns true when a target is new (not polled before and taken). */
bool manager_refresh_targets(Manager *m) {
        const char *extra[DISCOVERY_MAX];
        PollRound round;
        size_t n;
        int r;

        poller_get_round(m->poller, &round);
        n = discovery_targets(m->config, &m->sync.state, &round, extra, ELEMENTSOF(extra));
        r = poller_set_targets(m->poller, extra, n);
        manager_forget_reports(m);
        return r > 0;
}

/* ---- the sync core's effects, with the real modules ---- */

static uint64_t io_now(void *userdata, clockid_t clock) {
        return now_usec(clock);
}

static int io_state_save(void *userdata, const PersistentState *s) {
        Manager *m = userdata;
        return state_save(m->config->state_file, s);
}

static void io_settings_apply(void *userdata, const Committed *c) {
        Manager *m = userdata;
        if (m->settings)
                (void) settings_writer_apply(m->settings, c);
}

static bool io_settings_busy(void *userdata) {
        Manager *m = userdata;
        return m->settings && settings_writer_busy(m->settings);
}

static void io_broker_move(void *userdata, const BrokerInfo *target) {
        Manager *m = userdata;

        if (!m->broker)
                return;
        (void) broker_set_target(m->broker, target);
        /* A new connection is not a loss until it fails; the same broker,
         * still refusing (or backing off), still is one. */
        if (broker_state(m->broker) != BROKER_DOWN)
                m->broker_lost = false;
}

static void io_read_installed(void *userdata, char *buf, size_t size) {
        Manager *m = userdata;
        (void) updater_read_installed(m->config, buf, size);
}

static UpdaterPhase io_update_phase(void *userdata) {
        Manager *m = userdata;
        return m->updater ? updater_phase(m->updater) : UPDATER_IDLE;
}

static int io_update_fetch(void *userdata, const AgentUpdate *offer, const char *trusted_api_url) {
        Manager *m = userdata;
        return m->updater ? updater_start(m->updater, offer, trusted_api_url) : -EOPNOTSUPP;
}

static int io_update_apply(void *userdata, const AgentUpdate *offer) {
        Manager *m = userdata;
        return m->updater ? updater_apply(m->updater, offer) : -EOPNOTSUPP;
}

static const SyncIO sync_io = {
        .now = io_now,
        .state_save = io_state_save,
        .settings_apply = io_settings_apply,
        .settings_busy = io_settings_busy,
        .broker_move = io_broker_move,
        .read_installed = io_read_installed,
        .update_phase = io_update_phase,
        .update_fetch = io_update_fetch,
        .update_apply = io_update_apply,
};

/* ---- the round's end ---- */

static void manager_print_once_summary(Manager *m) {
        const Committed *c = &m->sync.state.committed;

        if (c->epoch == 0) {
                printf("no primary confirmed: %zu nodes polled\n", poller_n_targets(m->poller));
                return;
        }
        printf("primary %s epoch %" PRIu64 " broker %s:%u vhost %s tls %s settings %s update %s%s%s\n",
               c->primary.id, c->epoch, c->broker.host, c->broker.port, c->broker.vhost,
               c->broker.tls ? "true" : "false",
               settings_writer_error(m->settings) < 0 ? "write-failed" : "ok",
               gate_state_to_string(m->sync.gate.state), m->sync.gate.reason[0] ? ": " : "",
               m->sync.gate.reason);
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
        m->exit_code = m->sync.state.committed.epoch > 0 && settings_writer_error(m->settings) == 0 ? 0 : 2;
        return sd_event_exit(m->event, m->exit_code);
}

static void manager_finish_once(Manager *m) {
        uint64_t now = now_usec(CLOCK_MONOTONIC);

        m->once_deadline_usec = now + m->config->on_change_timeout + USEC_PER_SEC;
        if (sd_event_add_time(m->event, &m->once_timer, CLOCK_MONOTONIC, now, USEC_PER_MSEC, on_once_check,
                              m) < 0)
                (void) sd_event_exit(m->event, 2);
}

/* Rule 7: a round in flight decides as soon as its answers decide it, so
 * a Provider host that vanished does not hold the Agent back by
 * request_timeout. The rest of the round is judged when it ends. */
static void on_round_answer(Poller *p, size_t index, void *userdata) {
        Manager *m = userdata;
        PollRound round;

        poller_get_round(p, &round);
        if (round.n_pending == 0 || m->in_round_done)
                return; /* the whole round is judged by on_round_done */
        if (sync_round_progress(&m->sync, &round))
                manager_send_status(m);
}

static void on_round_done(Poller *p, void *userdata) {
        Manager *m = userdata;
        RuleResult prev = m->sync.last_rule, res;
        PollRound round;

        (void) sd_event_source_set_enabled(m->round_deadline, SD_EVENT_OFF);
        m->in_round_done = true;
        m->counters.polls++;
        m->last_poll_usec = now_usec(CLOCK_REALTIME);
        manager_log_targets(m);

        poller_get_round(p, &round);
        manager_count_round(m, &round);
        sync_round_done(&m->sync, &round, &res);
        manager_log_rule(m, &prev, &res);
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

        m->broker_lost = state == BROKER_DOWN ? true : state == BROKER_CONNECTED ? false : m->broker_lost;
        if (state == BROKER_DOWN && reason)
                strscpy(m->broker_error, sizeof(m->broker_error), reason);
        else if (state == BROKER_CONNECTED)
                m->broker_error[0] = 0;
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
        ack_broker_state(m->ack, state);
        manager_send_status(m);
}

static void on_broker_confirmed(Broker *b, uint64_t seq, bool multiple, bool ok, void *userdata) {
        Manager *m = userdata;
        ack_confirmed(m->ack, seq, multiple, ok);
}

static void on_broker_publish_refused(Broker *b, const char *reason, void *userdata) {
        Manager *m = userdata;
        ack_refused(m->ack, reason);
}

static void on_settings_converged(const Committed *c, uint64_t written_at, void *userdata) {
        Manager *m = userdata;
        ack_converged(m->ack, c, written_at);
}

static void on_notify(NotifyServer *s, const char *peer, const char *summary, void *userdata) {
        Manager *m = userdata;

        m->counters.notifies++;
        manager_request_hint_round(m, "notify");
}

static json_t *on_status(NotifyServer *s, void *userdata) {
        return manager_status_json(userdata);
}

static char *on_metrics(NotifyServer *s, void *userdata) {
        return manager_metrics_text(userdata);
}

static void on_updater_changed(Updater *u, void *userdata) {
        Manager *m = userdata;

        sync_update_changed(&m->sync);
        manager_send_status(m);
}

/* A package is verified, maybe long after the round that opened the gate:
 * the sync core judges the gate again now. */
static void on_updater_ready(Updater *u, const AgentUpdate *offer, void *userdata) {
        Manager *m = userdata;

        sync_update_ready(&m->sync, offer);
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

const NotifyCallbacks manager_notify_callbacks = {
        .notify = on_notify, .status = on_status, .metrics = on_metrics};

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
        PersistentState loaded = {};
        SyncIO io = sync_io;
        char err[256];
        int r;

        /* Leftovers of a crash in the middle of a state write. */
        (void) atomic_file_sweep(m->config->state_file);
        r = state_load(m->config->state_file, &loaded, err, sizeof(err));

        if (r < 0)
                return log_error_errno(r,
                                       "Cannot use state file %s (%s); refusing to start rather than "
                                       "forget the committed epoch. Inspect or remove it",
                                       m->config->state_file, err[0] ? err : "unreadable");
        io.userdata = m;
        sync_init(&m->sync, m->config, &io, &loaded, m->once);
        if (m->sync.state.committed.epoch > 0)
                log_info("Restored primary %s at epoch %" PRIu64 " from %s",
                         m->sync.state.committed.primary.id, m->sync.state.committed.epoch,
                         m->config->state_file);
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

/* The convergence acknowledgement, named by [daemon] agent_id or the
 * machine id. Without either the daemon runs on, unacknowledged. */
static int manager_add_ack(Manager *m) {
        char id[CONFIG_AGENT_ID_MAX + 1], *record;
        int r;

        if (m->config->agent_id)
                strscpy(id, sizeof id, m->config->agent_id);
        else if ((r = ack_default_agent_id(id, sizeof id)) < 0) {
                log_warning_errno(r, "No machine id and no usable host name: set [daemon] agent_id; "
                                     "convergence is not acknowledged to the Provider");
                return 0;
        }
        if (asprintf(&record, "%s.acked", m->config->state_file) < 0)
                return log_error_errno(-ENOMEM, "Cannot set up the convergence acknowledgement");
        r = ack_new(m->event, m->broker, id, record, &m->ack);
        free(record);
        if (r < 0)
                return log_error_errno(r, "Cannot set up the convergence acknowledgement");
        settings_writer_set_converged(m->settings, on_settings_converged, m);
        return 0;
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
                       &(BrokerCallbacks){.event = on_broker_event,
                                          .state_changed = on_broker_state,
                                          .confirmed = on_broker_confirmed,
                                          .publish_refused = on_broker_publish_refused},
                       m, &m->broker);
        if (r < 0)
                return log_error_errno(r, "Cannot set up the broker connection");
        r = manager_add_ack(m);
        if (r < 0)
                return r;
        if (m->config->notify_enabled) {
                r = notify_server_new(m->event, m->config, &manager_notify_callbacks, m, &m->notify);
                if (r < 0)
                        return log_error_errno(r, "Cannot open the notify listener %s",
                                               m->config->notify_listen);
        }
        /* Before READY=1 (manager_run): dsm-agent-syncctl may ask at once. */
        r = control_server_new(m->event, m->config, &manager_notify_callbacks, m, &m->control);
        if (r < 0)
                return log_error_errno(r, "Cannot open the control socket %s", m->config->control_socket);
        (void) updater_sweep(m->config);
        r = updater_new(m->event, m->config, &m->sync.state.update, &updater_callbacks, m, &m->updater);
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
        m->sync.gate.state = config->update_enabled ? GATE_NONE : GATE_DISABLED;
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
        ack_free(m->ack);
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
        const Committed *c = &m->sync.state.committed;
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
