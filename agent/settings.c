/* The Agent's broker settings file and the on_change hook. See settings.h.
 *
 * Two small state machines share one struct:
 * - the write: `desired` is what the file should say; a failed write keeps
 *   the old file and retries on a timer (1 s doubling to 60 s), always for
 *   the latest `desired`;
 * - on_change: runs after each rewrite for `written` (what the file says).
 *   A change while it runs makes it owed once more (never a queue); a
 *   failed run is retried with the same backoff until it succeeds or a
 *   newer rewrite supersedes it.
 *
 * That a run is owed also survives a restart: a marker file
 * "<dir>/.<basename>.on_change-pending" (holding the epoch, written
 * atomically) exists from before the rename of a rewrite until a run
 * succeeds with no newer one owed, or until on_change is unset. At start a
 * marker makes the first apply run on_change even when the file already
 * matches, so a stop or crash between a rewrite and a successful run does
 * not lose the run. */
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <sys/stat.h>

#include "atomic_file.h"
#include "log.h"
#include "macro.h"
#include "runner.h"
#include "settings.h"
#include "util.h"

#define BACKOFF_MIN_USEC USEC_PER_SEC
#define BACKOFF_MAX_USEC (60 * USEC_PER_SEC)
#define SETTINGS_HEADER  "# Managed by dsm-agent-syncd. Local changes are overwritten.\n"
#define MARKER_SUFFIX    ".on_change-pending"
#define MARKER_MODE      0600

struct SettingsWriter {
        sd_event *event;

        /* From the Config, copied: the Config may be replaced (SIGHUP). */
        char *path;
        char *marker_path; /* "<dir>/.<basename>.on_change-pending" */
        mode_t mode;
        char **on_change_argv; /* NULL: no hook */
        usec_t on_change_timeout;

        bool have_desired;
        Committed desired; /* what the file should say */
        Committed written; /* what it says, after a write or a match */
        usec_t written_at; /* CLOCK_REALTIME of that write (or the file's mtime) */
        bool applied;      /* the first apply since the start happened */
        SettingsConvergedFn converged;
        void *converged_userdata;

        int error; /* last write error, 0 when the file is current */
        usec_t write_backoff;
        sd_event_source *write_timer;

        Runner *runner;
        bool run_owed;    /* on_change must run (again) for `written` */
        bool recover;     /* a marker from before the start: run on the first apply */
        bool marker;      /* the marker file was written (and not yet removed) */
        int marker_error; /* last failure to write it, for logging once */
        int run_status;   /* last on_change result, for logging once */

        uint64_t runs_ok, runs_failed; /* for GET /metrics */
        usec_t run_backoff;
        sd_event_source *run_timer;
};

/* A value must stay on its line of the INI file. */
static bool value_safe(const char *s) {
        for (; *s; s++)
                if ((unsigned char) *s < 0x20 || *s == 0x7f)
                        return false;
        return true;
}

int settings_render(const Committed *c, char *buf, size_t size) {
        int n;

        if (!c || !buf)
                return -EINVAL;
        if (!value_safe(c->broker.host) || !value_safe(c->broker.vhost) || !value_safe(c->primary.id) ||
            !value_safe(c->primary.api_url))
                return -EINVAL;
        n = snprintf(buf, size,
                     SETTINGS_HEADER "[rabbitmq]\n"
                                     "host = %s\n"
                                     "port = %u\n"
                                     "vhost = %s\n"
                                     "tls = %s\n"
                                     "\n"
                                     "[provider]\n"
                                     "primary_id = %s\n"
                                     "epoch = %" PRIu64 "\n"
                                     "api_url = %s\n",
                     c->broker.host, (unsigned) c->broker.port, c->broker.vhost,
                     c->broker.tls ? "true" : "false", c->primary.id, c->epoch, c->primary.api_url);
        if (n < 0)
                return -EINVAL;
        if ((size_t) n >= size)
                return -ENOBUFS;
        return n;
}

static int arm_timer(SettingsWriter *w, sd_event_source **s, usec_t delay, sd_event_time_handler_t cb) {
        int r;

        if (!*s)
                return sd_event_add_time_relative(w->event, s, CLOCK_MONOTONIC, delay, 0, cb, w);
        r = sd_event_source_set_time_relative(*s, delay);
        if (r < 0)
                return r;
        return sd_event_source_set_enabled(*s, SD_EVENT_ONESHOT);
}

static void disarm_timer(sd_event_source *s) {
        if (s)
                (void) sd_event_source_set_enabled(s, SD_EVENT_OFF);
}

static bool timer_armed(sd_event_source *s) {
        int enabled = SD_EVENT_OFF;

        return s && sd_event_source_get_enabled(s, &enabled) >= 0 && enabled != SD_EVENT_OFF;
}

/* "<dir>/.<basename>.on_change-pending": hidden, next to the file, and not
 * matched by atomic_file_sweep(path) (its temporary files are
 * ".<basename>.tmp-*"). */
static char *marker_path_of(const char *path) {
        const char *slash = strrchr(path, '/');
        const char *base = slash ? slash + 1 : path;
        char *p;

        if (asprintf(&p, "%.*s.%s" MARKER_SUFFIX, (int) (base - path), path, base) < 0)
                return NULL;
        return p;
}

/* Takes over the parts of cfg the writer needs. */
static int copy_config(SettingsWriter *w, const Config *cfg) {
        char *path, *marker;
        char **argv = NULL;

        if (!cfg->settings_file)
                return -EINVAL;
        path = strdup(cfg->settings_file);
        if (!path)
                return -ENOMEM;
        marker = marker_path_of(path);
        if (!marker) {
                free(path);
                return -ENOMEM;
        }
        /* An empty vector means no hook, as NULL does. */
        if (cfg->on_change_argv && cfg->on_change_argv[0] && !(argv = strv_copy(cfg->on_change_argv))) {
                free(marker);
                free(path);
                return -ENOMEM;
        }
        free(w->path);
        w->path = path;
        free(w->marker_path);
        w->marker_path = marker;
        strv_free(w->on_change_argv);
        w->on_change_argv = argv;
        w->mode = cfg->settings_mode & 07777;
        w->on_change_timeout = cfg->on_change_timeout;
        return 0;
}

static void sweep_one(const char *path) {
        int r = atomic_file_sweep(path);

        if (r > 0)
                log_info("Removed %d leftover temporary file(s) of %s", r, path);
        else if (r < 0 && r != -ENOENT)
                log_warning_errno(r, "Cannot sweep temporary files of %s", path);
}

/* Leftovers of a crash: temporary files of the settings file and of the
 * marker (never the marker itself). */
static void sweep(SettingsWriter *w) {
        sweep_one(w->path);
        sweep_one(w->marker_path);
}

/* ---- the on_change-pending marker ---- */

/* True while on_change is owed, running, or waiting for a retry. */
static bool run_pending(const SettingsWriter *w) {
        return w->run_owed || w->recover || runner_busy(w->runner);
}

/* Durably records that on_change is owed for epoch. A failure is logged
 * and otherwise ignored: the run is still owed in memory, only a restart
 * before it succeeds would lose it. */
static void marker_set(SettingsWriter *w, uint64_t epoch) {
        char buf[32];
        int n, r;

        if (!w->on_change_argv)
                return;
        n = snprintf(buf, sizeof(buf), "%" PRIu64 "\n", epoch);
        r = atomic_file_write(w->marker_path, buf, (size_t) n, MARKER_MODE);
        if (r < 0) {
                /* Once per error: a read-only file system fails this
                 * before every retry of the settings write too. */
                log_struct(r != w->marker_error ? LOG_WARNING : LOG_DEBUG, r, NULL, NULL,
                           "Cannot record the owed on_change in %s; a restart before it succeeds "
                           "would not run it",
                           w->marker_path);
                w->marker_error = r;
                return;
        }
        if (r > 0)
                log_warning_errno(r, "Cannot sync the directory of %s", w->marker_path);
        w->marker_error = 0;
        w->marker = true;
}

/* No run owed any more. A marker left behind (removal failed, or not yet
 * on disk at a crash) only costs one more run at the next start. */
static void marker_clear(SettingsWriter *w) {
        if (unlink(w->marker_path) < 0 && errno != ENOENT)
                log_warning_errno(-errno, "Cannot remove %s; on_change will run once more at the next start",
                                  w->marker_path);
        w->marker = false;
}

/* At start: a marker says a run was owed when the daemon last stopped. */
static void marker_load(SettingsWriter *w) {
        _cleanup_(freep) char *text = NULL;
        char epoch[24] = "?";

        if (access(w->marker_path, F_OK) < 0) {
                if (errno != ENOENT)
                        log_warning_errno(-errno, "Cannot check %s", w->marker_path);
                return;
        }
        if (read_file_full(w->marker_path, 64, &text, NULL) >= 0)
                (void) sscanf(text, "%23[0-9]", epoch);
        w->marker = true;
        if (!w->on_change_argv) {
                log_info("on_change for epoch %s was owed at the last stop, but on_change is no longer set",
                         epoch);
                marker_clear(w);
                return;
        }
        log_notice("on_change for epoch %s was owed at the last stop; it runs once the settings file is "
                   "current",
                   epoch);
        w->recover = true;
}

/* ---- on_change ---- */

static void run_start(SettingsWriter *w);
static int on_run_timer(sd_event_source *s, uint64_t usec, void *userdata);

/* status is a runner status, or with started false the errno of a
 * failed start (the numbers overlap: -2 is SIGINT or ENOENT). */
static void status_to_string(int status, bool started, char *buf, size_t size) {
        if (!started)
                snprintf(buf, size, "not started: %s", strerror(-status));
        else if (status == -ETIMEDOUT)
                snprintf(buf, size, "timed out");
        else if (status >= 0)
                snprintf(buf, size, "exit %d", status);
        else
                snprintf(buf, size, "killed by signal %s", sigabbrev_np(-status) ?: "?");
}

/* Logs a failure at warning the first time and when it changes (a hook
 * failing every minute for an hour is one story, not sixty). */
static void run_failed(SettingsWriter *w, int status, bool started) {
        char what[128];
        int r;

        status_to_string(status, started, what, sizeof(what));
        w->runs_failed++; /* one that could not start too */
        w->run_owed = true;
        w->run_backoff = backoff_next(w->run_backoff, BACKOFF_MIN_USEC, BACKOFF_MAX_USEC);
        log_full(status != w->run_status ? LOG_WARNING : LOG_DEBUG,
                 "on_change for epoch %" PRIu64 " failed (%s), retrying in %" PRIu64 "s", w->written.epoch,
                 what, w->run_backoff / USEC_PER_SEC);
        w->run_status = status;
        r = arm_timer(w, &w->run_timer, w->run_backoff, on_run_timer);
        if (r < 0)
                log_error_errno(r, "Cannot arm the on_change retry timer");
}

/* The file describes `written` and the Agent has been told (on_change
 * succeeded, or there is none). */
static void report_converged(SettingsWriter *w) {
        if (w->converged)
                w->converged(&w->written, w->written_at, w->converged_userdata);
}

static void on_run_done(Runner *r, int status, void *userdata) {
        SettingsWriter *w = userdata;

        if (status == 0) {
                w->runs_ok++;
                if (w->run_status != 0)
                        log_info("on_change for epoch %" PRIu64 " succeeded", w->written.epoch);
                else
                        log_debug("on_change for epoch %" PRIu64 " succeeded", w->written.epoch);
                w->run_status = 0;
                w->run_backoff = 0;
                if (!w->run_owed) {
                        marker_clear(w);
                        report_converged(w);
                }
        } else if (!w->run_owed) {
                run_failed(w, status, true);
                return;
        } else {
                char what[128];
                status_to_string(status, true, what, sizeof(what));
                w->runs_failed++;
                log_info("on_change failed (%s); a newer change supersedes it", what);
        }
        if (w->run_owed)
                run_start(w);
}

static int on_run_timer(sd_event_source *s, uint64_t usec, void *userdata) {
        SettingsWriter *w = userdata;

        if (w->run_owed && !runner_busy(w->runner))
                run_start(w);
        return 0;
}

#define N_ENV 7

static void free_env(char *env[N_ENV + 1]) {
        for (size_t i = 0; i < N_ENV; i++)
                free(env[i]);
}

static int env_add(char **slot, const char *fmt, ...) _printf_(2, 3);
static int env_add(char **slot, const char *fmt, ...) {
        va_list ap;
        int r;

        va_start(ap, fmt);
        r = vasprintf(slot, fmt, ap);
        va_end(ap);
        if (r < 0) {
                *slot = NULL; /* undefined after a failure */
                return -ENOMEM;
        }
        return 0;
}

/* The contract's variables, for the state the file now describes. */
static int build_env(const SettingsWriter *w, char *env[N_ENV + 1]) {
        const Committed *c = &w->written;
        int r = 0;

        memset(env, 0, (N_ENV + 1) * sizeof(char *));
        if (env_add(&env[0], "DSM_PRIMARY_ID=%s", c->primary.id) < 0 ||
            env_add(&env[1], "DSM_EPOCH=%" PRIu64, c->epoch) < 0 ||
            env_add(&env[2], "DSM_BROKER_HOST=%s", c->broker.host) < 0 ||
            env_add(&env[3], "DSM_BROKER_PORT=%u", (unsigned) c->broker.port) < 0 ||
            env_add(&env[4], "DSM_BROKER_VHOST=%s", c->broker.vhost) < 0 ||
            env_add(&env[5], "DSM_BROKER_TLS=%s", c->broker.tls ? "true" : "false") < 0 ||
            env_add(&env[6], "DSM_SETTINGS_FILE=%s", w->path) < 0)
                r = -ENOMEM;
        if (r < 0)
                free_env(env);
        return r;
}

static void run_start(SettingsWriter *w) {
        char *env[N_ENV + 1];
        int r;

        w->run_owed = false;
        disarm_timer(w->run_timer);
        if (!w->on_change_argv)
                return;
        r = build_env(w, env);
        if (r >= 0) {
                r = runner_start(w->runner, w->on_change_argv, env, w->on_change_timeout, on_run_done, w);
                free_env(env);
        }
        if (r < 0)
                run_failed(w, r, false);
        else
                log_debug("on_change started for epoch %" PRIu64, w->written.epoch);
}

/* A rewrite happened: on_change is owed for it, superseding a failed or
 * pending run of an older state. */
static void run_request(SettingsWriter *w) {
        w->recover = false;
        if (!w->on_change_argv) {
                report_converged(w);
                return;
        }
        if (!w->marker)
                marker_set(w, w->written.epoch); /* a failed attempt before the rename */
        w->run_owed = true;
        w->run_backoff = 0;
        disarm_timer(w->run_timer);
        if (!runner_busy(w->runner))
                run_start(w);
}

/* ---- the write ---- */

static int sync_file(SettingsWriter *w);

static int on_write_timer(sd_event_source *s, uint64_t usec, void *userdata) {
        (void) sync_file(userdata);
        return 0;
}

typedef enum FileMatch {
        FILE_DIFFERS,
        FILE_MODE_DIFFERS, /* same content: rewrite, but the Agent needs no restart */
        FILE_MATCHES,
} FileMatch;

static FileMatch file_compare(const char *path, const char *data, size_t len, mode_t mode) {
        _cleanup_(freep) char *cur = NULL;
        struct stat st;
        size_t cur_len;

        if (stat(path, &st) < 0 || !S_ISREG(st.st_mode))
                return FILE_DIFFERS;
        if (read_file_full(path, SETTINGS_MAX, &cur, &cur_len) < 0)
                return FILE_DIFFERS;
        if (cur_len != len || memcmp(cur, data, len) != 0)
                return FILE_DIFFERS;
        return (st.st_mode & 07777) == mode ? FILE_MATCHES : FILE_MODE_DIFFERS;
}

static int write_failed(SettingsWriter *w, int r) {
        int k;

        if (r != w->error)
                log_struct(LOG_ERR, r, NULL, &(LogFields){.epoch = w->desired.epoch, .reason = strerror(-r)},
                           "Cannot write settings file %s, keeping the old one; will retry", w->path);
        w->error = r;
        w->write_backoff = backoff_next(w->write_backoff, BACKOFF_MIN_USEC, BACKOFF_MAX_USEC);
        k = arm_timer(w, &w->write_timer, w->write_backoff, on_write_timer);
        if (k < 0)
                log_error_errno(k, "Cannot arm the settings retry timer");
        return r;
}

static usec_t file_mtime(const char *path) {
        struct stat st;

        if (stat(path, &st) < 0)
                return now_usec(CLOCK_REALTIME);
        return (usec_t) st.st_mtim.tv_sec * USEC_PER_SEC + (usec_t) st.st_mtim.tv_nsec / 1000;
}

static void write_done(SettingsWriter *w, FileMatch before) {
        bool first = !w->applied;

        w->applied = true;
        if (w->error != 0)
                log_info("Settings file %s is current again", w->path);
        w->error = 0;
        w->write_backoff = 0;
        disarm_timer(w->write_timer);
        w->written = w->desired;
        if (before == FILE_DIFFERS) {
                w->written_at = now_usec(CLOCK_REALTIME);
                log_struct(LOG_INFO, 0, NULL,
                           &(LogFields){.epoch = w->desired.epoch, .primary_id = w->desired.primary.id},
                           "Settings file %s now points to %s:%u (primary %s, epoch %" PRIu64 ")", w->path,
                           w->desired.broker.host, (unsigned) w->desired.broker.port, w->desired.primary.id,
                           w->desired.epoch);
                run_request(w);
                return;
        }
        if (before == FILE_MODE_DIFFERS)
                log_info("Settings file %s rewritten with mode %04o", w->path, (unsigned) w->mode);
        /* The file already says what the owed run (from before the start)
         * was for: run it now, with this content's variables. */
        if (w->recover) {
                w->written_at = file_mtime(w->path);
                log_info("Running the owed on_change for epoch %" PRIu64, w->written.epoch);
                run_request(w);
        } else if (first && !run_pending(w)) {
                /* At start the file already describes the commit and
                 * nothing is owed: the Agent was told before the stop.
                 * Reported, so that an acknowledgement the stop cut short
                 * is sent (ack.c keeps the confirmed ones apart). */
                w->written_at = file_mtime(w->path);
                report_converged(w);
        }
}

/* Makes the file match `desired`, writing only when it differs. */
static int sync_file(SettingsWriter *w) {
        char buf[SETTINGS_MAX];
        FileMatch before;
        int n, r;

        if (!w->have_desired)
                return 0;
        n = settings_render(&w->desired, buf, sizeof(buf));
        if (n < 0) {
                /* Validated input never gets here; retrying cannot help. */
                w->error = n;
                return log_error_errno(n, "Cannot render settings for epoch %" PRIu64, w->desired.epoch);
        }
        before = file_compare(w->path, buf, (size_t) n, w->mode);
        if (before != FILE_MATCHES) {
                bool pending = run_pending(w);

                /* Before the rename: a crash right after it still owes
                 * the run. */
                if (before == FILE_DIFFERS)
                        marker_set(w, w->desired.epoch);
                r = atomic_file_write(w->path, buf, (size_t) n, w->mode);
                if (r < 0) {
                        /* The old file stays: no run owed for it. */
                        if (before == FILE_DIFFERS && w->marker && !pending)
                                marker_clear(w);
                        return write_failed(w, r);
                }
                /* Renamed: readers (the agent) see the new file, so it
                 * counts as written and on_change runs. */
                if (r > 0)
                        log_struct(LOG_WARNING, r, NULL, &(LogFields){.epoch = w->desired.epoch},
                                   "Settings file %s replaced, but syncing its directory failed; the "
                                   "change may not survive a power loss",
                                   w->path);
        }
        write_done(w, before);
        return 0;
}

/* ---- public ---- */

int settings_writer_new(sd_event *e, const Config *cfg, SettingsWriter **ret) {
        SettingsWriter *w;
        int r;

        if (!e || !cfg || !ret)
                return -EINVAL;
        w = calloc(1, sizeof(*w));
        if (!w)
                return -ENOMEM;
        w->event = sd_event_ref(e);
        r = copy_config(w, cfg);
        if (r >= 0)
                r = runner_new(e, "on_change", &w->runner);
        if (r < 0) {
                settings_writer_free(w);
                return r;
        }
        sweep(w);
        marker_load(w);
        *ret = w;
        return 0;
}

SettingsWriter *settings_writer_free(SettingsWriter *w) {
        if (!w)
                return NULL;
        w->write_timer = sd_event_source_disable_unref(w->write_timer);
        w->run_timer = sd_event_source_disable_unref(w->run_timer);
        runner_free(w->runner);
        strv_free(w->on_change_argv);
        free(w->marker_path);
        free(w->path);
        sd_event_unref(w->event);
        free(w);
        return NULL;
}

int settings_writer_apply(SettingsWriter *w, const Committed *c) {
        if (!w || !c || c->epoch == 0)
                return -EINVAL;
        w->desired = *c;
        w->have_desired = true;
        return sync_file(w);
}

int settings_writer_reconfigure(SettingsWriter *w, const Config *cfg) {
        _cleanup_(freep) char *old_marker = NULL;
        bool moved;
        int r;

        if (!w || !cfg)
                return -EINVAL;
        moved = !streq_ptr(w->path, cfg->settings_file);
        if (moved && w->marker) {
                old_marker = strdup(w->marker_path);
                if (!old_marker)
                        return -ENOMEM;
        }
        r = copy_config(w, cfg);
        if (r < 0)
                return r;
        if (moved)
                sweep(w);
        if (old_marker) {
                /* An owed run moves with the file. */
                if (unlink(old_marker) < 0 && errno != ENOENT)
                        log_warning_errno(-errno, "Cannot remove %s", old_marker);
                w->marker = false;
                if (run_pending(w))
                        marker_set(w, w->written.epoch);
        }
        if (!w->on_change_argv) {
                bool owed = w->run_owed || w->recover;

                w->run_owed = false;
                w->recover = false;
                disarm_timer(w->run_timer);
                marker_clear(w);
                /* No hook to wait for any more: the written file is the
                 * whole change. */
                if (owed && w->error == 0 && w->written.epoch > 0)
                        report_converged(w);
        }
        /* A new path, mode or hook: try at once rather than at the next
         * backoff step. */
        w->write_backoff = 0;
        disarm_timer(w->write_timer);
        return sync_file(w);
}

void settings_writer_set_converged(SettingsWriter *w, SettingsConvergedFn fn, void *userdata) {
        w->converged = fn;
        w->converged_userdata = userdata;
}

bool settings_writer_busy(const SettingsWriter *w) {
        return w && (timer_armed(w->write_timer) || runner_busy(w->runner) || w->run_owed);
}

int settings_writer_error(const SettingsWriter *w) {
        return w ? w->error : 0;
}

void settings_writer_runs(const SettingsWriter *w, uint64_t *ret_ok, uint64_t *ret_failed) {
        *ret_ok = w ? w->runs_ok : 0;
        *ret_failed = w ? w->runs_failed : 0;
}
