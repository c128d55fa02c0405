/* Runs one Updater attempt in an sd-event loop, for the integration tests:
 *
 *   updater_drive CONFIG URL VERSION SHA256 SIZE [TRUSTED_API_URL]
 *
 * Loads CONFIG with config_load, sweeps download_dir, starts the update and
 * waits for it to end: when the package is verified (READY), the drive
 * plays the manager whose gate is open and calls updater_apply() with the
 * same offer. TRUSTED_API_URL is what the manager passes as the
 * committed Primary's api_url (the origin the provider token may go to);
 * without it, URL itself (the same origin). Prints key=value lines on stdout:
 *   swept=N installed=V second_start=E early_apply=E (updater_apply before
 *   the package is verified) ready=VERSION result=applied|failed|ready
 *   reason=R failures=N retry_start=E retry_in_s=N (seconds until the next
 *   attempt of the failed version may start, 0 when it may start now)
 * Exit status: 0 applied, 1 failed, 2 usage or config error, 3 the safety
 * timeout hit, 4 stopped by SIGTERM/SIGINT (the Updater is freed first, so
 * a download in flight must leave no file behind), 5 left READY.
 *
 * Environment (milliseconds / bytes per second) for short test timeouts:
 * UPDATER_DRIVE_LOW_SPEED_BYTES, UPDATER_DRIVE_LOW_SPEED_MS,
 * UPDATER_DRIVE_TOTAL_MS, UPDATER_DRIVE_TIMEOUT_MS (safety, default 60000).
 * UPDATER_DRIVE_STATE=PATH: the persistent state (backoff, applied version)
 * is loaded from PATH before the attempt (missing: empty) and saved back to
 * it at the end, so a test can hand in a crafted backoff.
 * UPDATER_DRIVE_READY=hold: the gate stays closed: nothing is applied, the
 * drive ends in READY (result=ready, exit 5). =stale: updater_apply() is
 * first called with offers that differ in one field each (version, url,
 * sha256, size), printing stale_apply=E,E,E,E and phase_after_stale=ready
 * when they were refused, then with the verified one. */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "config.h"
#include "log.h"
#include "macro.h"
#include "state.h"
#include "updater.h"

enum {
        EXIT_APPLIED = 0,
        EXIT_FAILED = 1,
        EXIT_USAGE = 2,
        EXIT_TIMEOUT = 3,
        EXIT_SIGNAL = 4,
        EXIT_READY = 5
};

typedef struct Drive {
        sd_event *event;
        int exit_code;
        AgentUpdate offer; /* what the manager would apply: the one started */
} Drive;

static uint64_t env_u64(const char *name, uint64_t def) {
        const char *s = getenv(name);
        char *end;
        unsigned long long v;

        if (!s || !*s)
                return def;
        errno = 0;
        v = strtoull(s, &end, 10);
        if (errno || *end)
                return def;
        return v;
}

static const char *errno_name(int r) {
        switch (r) {
        case 0:
                return "0";
        case -EBUSY:
                return "EBUSY";
        case -EAGAIN:
                return "EAGAIN";
        case -EINVAL:
                return "EINVAL";
        case -ESTALE:
                return "ESTALE";
        default:
                return strerror(-r);
        }
}

static void on_changed(Updater *u, void *userdata) {
        Drive *d = userdata;
        UpdaterPhase p = updater_phase(u);

        if (p == UPDATER_DOWNLOADING || p == UPDATER_APPLYING)
                return;
        d->exit_code = p == UPDATER_FAILED ? EXIT_FAILED : EXIT_APPLIED;
        sd_event_exit(d->event, 0);
}

/* updater_apply() with offers that differ from the verified one in one
 * field each: every one must be refused, the package kept READY. */
static void apply_stale_offers(Updater *u, const AgentUpdate *offer) {
        AgentUpdate o[4] = {*offer, *offer, *offer, *offer};

        strscpy(o[0].version, sizeof(o[0].version), "0.0.0-other");
        strscpy(o[1].url + strlen(o[1].url), sizeof(o[1].url) - strlen(o[1].url), "?other");
        o[2].sha256[0] = o[2].sha256[0] == '0' ? '1' : '0';
        o[3].size++;
        printf("stale_apply=");
        for (size_t i = 0; i < ELEMENTSOF(o); i++)
                printf("%s%s", i ? "," : "", errno_name(updater_apply(u, &o[i])));
        printf("\nphase_after_stale=%s\n", updater_phase(u) == UPDATER_READY ? "ready" : "other");
}

static void on_ready(Updater *u, const AgentUpdate *offer, void *userdata) {
        Drive *d = userdata;
        const char *mode = getenv("UPDATER_DRIVE_READY");
        int r;

        printf("ready=%s\n", offer->version);
        if (streq_ptr(mode, "hold")) {
                d->exit_code = EXIT_READY;
                sd_event_exit(d->event, 0);
                return;
        }
        if (streq_ptr(mode, "stale"))
                apply_stale_offers(u, offer);
        r = updater_apply(u, &d->offer);
        if (r < 0)
                printf("apply=%s\n", errno_name(r));
}

static int on_signal(sd_event_source *s, const struct signalfd_siginfo *si, void *userdata) {
        Drive *d = userdata;

        d->exit_code = EXIT_SIGNAL;
        return sd_event_exit(d->event, 0);
}

static int on_timeout(sd_event_source *s, uint64_t usec, void *userdata) {
        Drive *d = userdata;

        d->exit_code = EXIT_TIMEOUT;
        return sd_event_exit(d->event, 0);
}

static int parse_offer(char **argv, AgentUpdate *o) {
        char *end;

        *o = (AgentUpdate){.present = true};
        if (strscpy(o->url, sizeof(o->url), argv[2]) < 0 ||
            strscpy(o->version, sizeof(o->version), argv[3]) < 0 ||
            strscpy(o->sha256, sizeof(o->sha256), argv[4]) < 0)
                return -EINVAL;
        errno = 0;
        o->size = strtoull(argv[5], &end, 10);
        return errno || *end ? -EINVAL : 0;
}

static void print_retry_in(const UpdateRecord *s) {
        struct timespec ts;
        uint64_t now;

        clock_gettime(CLOCK_REALTIME, &ts);
        now = (uint64_t) ts.tv_sec * USEC_PER_SEC + (uint64_t) ts.tv_nsec / 1000;
        printf("retry_in_s=%llu\n",
               (unsigned long long) (s->retry_not_before_usec > now
                                             ? (s->retry_not_before_usec - now) / USEC_PER_SEC
                                             : 0));
}

static int state_io(PersistentState *state, bool save) {
        const char *path = getenv("UPDATER_DRIVE_STATE");
        char err[256];
        int r;

        if (!path || !*path)
                return 0;
        r = save ? state_save(path, state) : state_load(path, state, err, sizeof(err));
        if (r < 0)
                fprintf(stderr, "updater_drive: %s %s: %s\n", save ? "saving" : "loading", path,
                        save ? strerror(-r) : err);
        return r;
}

static int run(Config *cfg, const AgentUpdate *offer, const char *trusted) {
        static const UpdaterCallbacks callbacks = {.changed = on_changed, .ready = on_ready};
        PersistentState state = {0};
        Drive d = {.exit_code = EXIT_TIMEOUT, .offer = *offer};
        Updater *u = NULL;
        char installed[PROVIDER_VERSION_MAX + 1];
        sigset_t mask;
        uint64_t now;
        int r;

        sigemptyset(&mask);
        sigaddset(&mask, SIGTERM);
        sigaddset(&mask, SIGINT);
        sigprocmask(SIG_BLOCK, &mask, NULL);

        if (sd_event_default(&d.event) < 0 ||
            sd_event_add_signal(d.event, NULL, SIGTERM, on_signal, &d) < 0 ||
            sd_event_add_signal(d.event, NULL, SIGINT, on_signal, &d) < 0 ||
            sd_event_now(d.event, CLOCK_MONOTONIC, &now) < 0 ||
            sd_event_add_time(d.event, NULL, CLOCK_MONOTONIC,
                              now + env_u64("UPDATER_DRIVE_TIMEOUT_MS", 60000) * USEC_PER_MSEC, 0,
                              on_timeout, &d) < 0) {
                fprintf(stderr, "updater_drive: event loop setup failed\n");
                return EXIT_USAGE;
        }

        printf("swept=%d\n", updater_sweep(cfg));
        r = updater_read_installed(cfg, installed, sizeof(installed));
        printf("installed=%s\n", r < 0 ? errno_name(r) : installed);

        if (state_io(&state, false) < 0) {
                sd_event_unref(d.event);
                return EXIT_USAGE;
        }
        r = updater_new(d.event, cfg, &state.update, &callbacks, &d, &u);
        if (r < 0) {
                fprintf(stderr, "updater_drive: updater_new: %s\n", strerror(-r));
                sd_event_unref(d.event);
                return EXIT_USAGE;
        }
        updater_set_download_limits(u, env_u64("UPDATER_DRIVE_LOW_SPEED_BYTES", 1024),
                                    env_u64("UPDATER_DRIVE_LOW_SPEED_MS", 60000) * USEC_PER_MSEC,
                                    env_u64("UPDATER_DRIVE_TOTAL_MS", 3600000) * USEC_PER_MSEC);

        r = updater_start(u, offer, trusted);
        if (r < 0) {
                printf("result=failed\nreason=start: %s\n", errno_name(r));
                print_retry_in(&state.update);
                (void) state_io(&state, true);
                updater_free(u);
                sd_event_unref(d.event);
                return EXIT_FAILED;
        }
        printf("second_start=%s\n", errno_name(updater_start(u, offer, trusted)));
        printf("early_apply=%s\n", errno_name(updater_apply(u, offer)));
        fflush(stdout);

        if (updater_phase(u) == UPDATER_FAILED)
                d.exit_code = EXIT_FAILED; /* failed before the loop ran */
        else
                (void) sd_event_loop(d.event);

        if (d.exit_code == EXIT_APPLIED || d.exit_code == EXIT_FAILED) {
                printf("result=%s\nreason=%s\n", d.exit_code == EXIT_APPLIED ? "applied" : "failed",
                       updater_last_error(u));
                printf("applied_version=%s\nfailures=%u\n", state.update.applied_version,
                       state.update.failures);
                printf("retry_start=%s\n",
                       errno_name(d.exit_code == EXIT_FAILED ? updater_start(u, offer, trusted) : 0));
                print_retry_in(&state.update);
                (void) state_io(&state, true);
        } else if (d.exit_code == EXIT_READY) {
                printf("result=ready\napplied_version=%s\n", state.update.applied_version);
                (void) state_io(&state, true);
        } else
                printf("result=%s\n", d.exit_code == EXIT_SIGNAL ? "stopped" : "timeout");
        fflush(stdout);

        updater_free(u);
        sd_event_unref(d.event);
        return d.exit_code;
}

int main(int argc, char **argv) {
        char err[CONFIG_ERROR_MAX];
        Config *cfg = NULL;
        AgentUpdate offer;
        int r;

        if ((argc != 6 && argc != 7) || parse_offer(argv, &offer) < 0) {
                fprintf(stderr, "usage: updater_drive CONFIG URL VERSION SHA256 SIZE [TRUSTED_API_URL]\n");
                return EXIT_USAGE;
        }
        log_setup(LOG_TARGET_STDERR, LOG_DEBUG);
        r = config_load(argv[1], &cfg, err, sizeof(err));
        if (r < 0) {
                fprintf(stderr, "%s\n", err);
                return EXIT_USAGE;
        }
        r = run(cfg, &offer, argc == 7 ? argv[6] : argv[2]);
        config_free(cfg);
        return r;
}
