/* settings: the exact file, rewrite only on change, on_change with its
 * environment, coalescing, timeouts, retries, and write failures on a
 * real read-only mount. Runs a real sd-event loop. */
#include <fcntl.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>

#include <cmocka.h>

#include "atomic_file.h"
#include "log.h"
#include "macro.h"
#include "settings.h"

static const char contract_example[] = "# Managed by dsm-agent-syncd. Local changes are overwritten.\n"
                                       "[rabbitmq]\n"
                                       "host = p2.example\n"
                                       "port = 5671\n"
                                       "vhost = /dsm\n"
                                       "tls = true\n"
                                       "\n"
                                       "[provider]\n"
                                       "primary_id = p2\n"
                                       "epoch = 8\n"
                                       "api_url = https://p2.example:8443\n";

/* Replaces libc's fsync() for atomic_file.o (an object linked into the
 * program wins over the shared library): the fsync of a directory can be
 * made to fail as on a disk error, after the rename happened. */
static bool fail_dir_fsync;

int fsync(int fd) {
        struct stat st;

        if (fail_dir_fsync && fstat(fd, &st) == 0 && S_ISDIR(st.st_mode)) {
                errno = EIO;
                return -1;
        }
        return (int) syscall(SYS_fsync, fd);
}

/* Counts the renames onto the settings file of the running test: every
 * rewrite is one (atomic_file_write renames a temporary file over it), so
 * the tests see rewrites as a reader of the directory does. */
static const char *watched_path;
static unsigned rewrites;

int renameat(int olddirfd, const char *oldpath, int newdirfd, const char *newpath) {
        const char *base = watched_path ? strrchr(watched_path, '/') : NULL;

        if (base && strcmp(newpath, base + 1) == 0)
                rewrites++;
        return (int) syscall(SYS_renameat2, olddirfd, oldpath, newdirfd, newpath, 0);
}

#define MARKER ".rabbitmq.ini.on_change-pending"

typedef struct Ctx {
        sd_event *event;
        Config cfg;
        char *argv[4];
        char dir[64];
        char path[256];
} Ctx;

static Committed committed(uint64_t epoch) {
        Committed c = {.epoch = epoch};

        strscpy(c.primary.id, sizeof(c.primary.id), "p2");
        strscpy(c.primary.api_url, sizeof(c.primary.api_url), "https://p2.example:8443");
        strscpy(c.broker.host, sizeof(c.broker.host), "p2.example");
        c.broker.port = 5671;
        strscpy(c.broker.vhost, sizeof(c.broker.vhost), "/dsm");
        c.broker.tls = true;
        return c;
}

static int setup(void **state) {
        Ctx *c = calloc(1, sizeof(Ctx));

        assert_non_null(c);
        log_setup(LOG_TARGET_STDERR, LOG_INFO);
        assert_int_equal(sd_event_new(&c->event), 0);
        strscpy(c->dir, sizeof(c->dir), "/tmp/test-settings-XXXXXX");
        assert_non_null(mkdtemp(c->dir));
        fail_dir_fsync = false;
        snprintf(c->path, sizeof(c->path), "%s/rabbitmq.ini", c->dir);
        c->cfg.settings_file = c->path;
        c->cfg.settings_mode = 0640;
        c->cfg.on_change_timeout = 10 * USEC_PER_SEC;
        watched_path = c->path;
        rewrites = 0;
        *state = c;
        return 0;
}

static int teardown(void **state) {
        Ctx *c = *state;
        char cmd[128];

        sd_event_unref(c->event);
        watched_path = NULL;
        snprintf(cmd, sizeof(cmd), "rm -rf '%s'", c->dir);
        assert_int_equal(system(cmd), 0);
        free(c);
        return 0;
}

/* on_change = /bin/sh -c SCRIPT, run with the test dir as $1. */
static void set_hook(Ctx *c, const char *script) {
        c->argv[0] = "/bin/sh";
        c->argv[1] = "-c";
        c->argv[2] = (char *) script;
        c->argv[3] = NULL;
        c->cfg.on_change_argv = c->argv;
}

static void run_for(Ctx *c, uint64_t usec) {
        uint64_t end = now_usec(CLOCK_MONOTONIC) + usec;
        while (now_usec(CLOCK_MONOTONIC) < end)
                assert_true(sd_event_run(c->event, 50 * USEC_PER_MSEC) >= 0);
}

/* Runs the loop until the writer is idle; fails after limit. */
static uint64_t run_until_idle(Ctx *c, SettingsWriter *w, uint64_t limit) {
        uint64_t start = now_usec(CLOCK_MONOTONIC);

        while (settings_writer_busy(w)) {
                assert_true(now_usec(CLOCK_MONOTONIC) - start < limit);
                assert_true(sd_event_run(c->event, 50 * USEC_PER_MSEC) >= 0);
        }
        return now_usec(CLOCK_MONOTONIC) - start;
}

static char *read_in_dir(Ctx *c, const char *name) {
        char p[192];
        char *buf = NULL;

        snprintf(p, sizeof(p), "%s/%s", c->dir, name);
        if (read_file_full(p, 1 << 20, &buf, NULL) < 0)
                return NULL;
        return buf;
}

static bool exists_in_dir(Ctx *c, const char *name) {
        char p[192];

        snprintf(p, sizeof(p), "%s/%s", c->dir, name);
        return access(p, F_OK) == 0;
}

static void touch_in_dir(Ctx *c, const char *name) {
        char p[192];
        int fd;

        snprintf(p, sizeof(p), "%s/%s", c->dir, name);
        fd = open(p, O_CREAT | O_WRONLY | O_CLOEXEC, 0600);
        assert_true(fd >= 0);
        close(fd);
}

static void test_render(void **state) {
        Committed k = committed(8);
        char buf[SETTINGS_MAX];

        assert_int_equal(settings_render(&k, buf, sizeof(buf)), (int) strlen(contract_example));
        assert_memory_equal(buf, contract_example, sizeof(contract_example));

        k.broker.tls = false;
        assert_true(settings_render(&k, buf, sizeof(buf)) > 0);
        assert_non_null(strstr(buf, "\ntls = false\n"));
        assert_int_equal(settings_render(&k, buf, 50), -ENOBUFS);
        strscpy(k.broker.vhost, sizeof(k.broker.vhost), "/dsm\nhost = evil");
        assert_int_equal(settings_render(&k, buf, sizeof(buf)), -EINVAL);
}

static void test_rewrite_only_on_change(void **state) {
        Ctx *c = *state;
        SettingsWriter *w = NULL;
        Committed k = committed(8);
        _cleanup_(freep) char *got = NULL;
        struct stat st1, st2;
        mode_t old = umask(077);

        assert_int_equal(settings_writer_new(c->event, &c->cfg, &w), 0);
        assert_int_equal(settings_writer_apply(w, &k), 0);
        assert_false(settings_writer_busy(w)); /* no hook */
        assert_int_equal(rewrites, 1);
        assert_int_equal(read_file_full(c->path, SETTINGS_MAX, &got, NULL), 0);
        assert_string_equal(got, contract_example);
        assert_int_equal(stat(c->path, &st1), 0);
        assert_int_equal(st1.st_mode & 07777, 0640);

        /* Same state: nothing written. */
        assert_int_equal(settings_writer_apply(w, &k), 0);
        assert_int_equal(stat(c->path, &st2), 0);
        assert_int_equal(st1.st_ino, st2.st_ino);
        assert_int_equal(st1.st_mtim.tv_nsec, st2.st_mtim.tv_nsec);
        assert_int_equal(rewrites, 1);

        /* A changed file on disk is put back (changed in place: no rename). */
        {
                FILE *f = fopen(c->path, "w");
                assert_non_null(f);
                assert_int_equal(fputs("x", f), 1);
                assert_int_equal(fclose(f), 0);
        }
        assert_int_equal(settings_writer_apply(w, &k), 0);
        assert_int_equal(rewrites, 2);

        /* A new mode (SIGHUP) is applied at once. */
        c->cfg.settings_mode = 0644;
        assert_int_equal(settings_writer_reconfigure(w, &c->cfg), 0);
        assert_int_equal(stat(c->path, &st2), 0);
        assert_int_equal(st2.st_mode & 07777, 0644);
        assert_int_equal(rewrites, 3);

        /* A new path too. */
        snprintf(c->path, sizeof(c->path), "%s/moved.ini", c->dir);
        assert_int_equal(settings_writer_reconfigure(w, &c->cfg), 0);
        free(got);
        got = NULL;
        assert_int_equal(read_file_full(c->path, SETTINGS_MAX, &got, NULL), 0);
        assert_string_equal(got, contract_example);
        assert_int_equal(settings_writer_error(w), 0);

        assert_null(settings_writer_free(w));
        umask(old);
}

static void test_sweep_at_start(void **state) {
        Ctx *c = *state;
        SettingsWriter *w = NULL;
        char p[192];
        int fd;

        snprintf(p, sizeof(p), "%s/.rabbitmq.ini.tmp-AbC123", c->dir);
        fd = open(p, O_CREAT | O_WRONLY | O_CLOEXEC, 0600);
        assert_true(fd >= 0);
        close(fd);
        assert_int_equal(settings_writer_new(c->event, &c->cfg, &w), 0);
        assert_int_equal(access(p, F_OK), -1);
        settings_writer_free(w);
}

static void test_on_change_env(void **state) {
        Ctx *c = *state;
        SettingsWriter *w = NULL;
        Committed k = committed(8);
        char script[256], want[512];
        _cleanup_(freep) char *got = NULL;

        snprintf(script, sizeof(script), "env | grep ^DSM_ | sort > %s/env", c->dir);
        set_hook(c, script);
        assert_int_equal(settings_writer_new(c->event, &c->cfg, &w), 0);
        assert_int_equal(settings_writer_apply(w, &k), 0);
        assert_true(settings_writer_busy(w));
        run_until_idle(c, w, 5 * USEC_PER_SEC);
        got = read_in_dir(c, "env");
        assert_non_null(got);
        snprintf(want, sizeof(want),
                 "DSM_BROKER_HOST=p2.example\nDSM_BROKER_PORT=5671\nDSM_BROKER_TLS=true\n"
                 "DSM_BROKER_VHOST=/dsm\nDSM_EPOCH=8\nDSM_PRIMARY_ID=p2\nDSM_SETTINGS_FILE=%s\n",
                 c->path);
        assert_string_equal(got, want);
        settings_writer_free(w);
}

/* Three changes while on_change runs: one more run, for the latest. */
static void test_coalescing(void **state) {
        Ctx *c = *state;
        SettingsWriter *w = NULL;
        Committed k;
        char script[256];
        _cleanup_(freep) char *got = NULL;

        snprintf(script, sizeof(script), "echo $DSM_EPOCH >> %s/runs; sleep 0.5", c->dir);
        set_hook(c, script);
        assert_int_equal(settings_writer_new(c->event, &c->cfg, &w), 0);
        k = committed(1);
        assert_int_equal(settings_writer_apply(w, &k), 0);
        run_for(c, 100 * USEC_PER_MSEC);
        for (uint64_t e = 2; e <= 4; e++) {
                k = committed(e);
                assert_int_equal(settings_writer_apply(w, &k), 0);
        }
        assert_int_equal(rewrites, 4);
        run_until_idle(c, w, 5 * USEC_PER_SEC);
        got = read_in_dir(c, "runs");
        assert_non_null(got);
        assert_string_equal(got, "1\n4\n");
        settings_writer_free(w);
}

/* A hook that hangs is killed at the timeout and retried; the retry
 * succeeds. */
static void test_on_change_timeout(void **state) {
        Ctx *c = *state;
        SettingsWriter *w = NULL;
        Committed k = committed(8);
        char script[512];
        _cleanup_(freep) char *got = NULL;
        uint64_t took;

        snprintf(script, sizeof(script),
                 "echo run >> %1$s/runs; test -e %1$s/marker && exit 0; touch %1$s/marker; sleep 30",
                 c->dir);
        set_hook(c, script);
        c->cfg.on_change_timeout = 300 * USEC_PER_MSEC;
        assert_int_equal(settings_writer_new(c->event, &c->cfg, &w), 0);
        assert_int_equal(settings_writer_apply(w, &k), 0);
        took = run_until_idle(c, w, 5 * USEC_PER_SEC);
        assert_true(took >= 1 * USEC_PER_SEC); /* the timeout plus 1 s of backoff */
        got = read_in_dir(c, "runs");
        assert_string_equal(got, "run\nrun\n");
        settings_writer_free(w);
}

/* Failing runs are retried with backoff (1 s, 2 s) until one succeeds. */
static void test_on_change_retry(void **state) {
        Ctx *c = *state;
        SettingsWriter *w = NULL;
        Committed k = committed(8);
        char script[256];
        _cleanup_(freep) char *got = NULL;
        uint64_t took;

        snprintf(script, sizeof(script),
                 "f=%s/count; n=$(cat $f 2>/dev/null || echo 0); n=$((n+1)); echo $n > $f; test $n -ge 3",
                 c->dir);
        set_hook(c, script);
        assert_int_equal(settings_writer_new(c->event, &c->cfg, &w), 0);
        assert_int_equal(settings_writer_apply(w, &k), 0);
        took = run_until_idle(c, w, 8 * USEC_PER_SEC);
        assert_true(took >= 3 * USEC_PER_SEC);
        got = read_in_dir(c, "count");
        assert_string_equal(got, "3\n");
        assert_int_equal(rewrites, 1);
        settings_writer_free(w);
}

/* The converged report (the acknowledgement's trigger, docs/acks.md): after
 * a rewrite and a successful on_change only; once at start when the file
 * already describes the commit and nothing is owed; and when a SIGHUP
 * drops the hook of a run still owed. */
static struct {
        unsigned n;
        uint64_t epoch, written_at;
} conv;

static void on_converged(const Committed *k, uint64_t written_at, void *userdata) {
        conv.n++;
        conv.epoch = k->epoch;
        conv.written_at = written_at;
}

static void test_converged_reports(void **state) {
        Ctx *c = *state;
        SettingsWriter *w = NULL;
        Committed k8 = committed(8), k9 = committed(9);
        char script[256], *missing[] = {"/nonexistent/hook", NULL};
        uint64_t t0 = now_usec(CLOCK_REALTIME);

        memset(&conv, 0, sizeof conv);
        /* A hook that fails until "ok" exists. */
        snprintf(script, sizeof(script), "test -e %s/ok", c->dir);
        set_hook(c, script);
        assert_int_equal(settings_writer_new(c->event, &c->cfg, &w), 0);
        settings_writer_set_converged(w, on_converged, NULL);
        assert_int_equal(settings_writer_apply(w, &k8), 0);
        run_for(c, 300 * USEC_PER_MSEC);
        assert_int_equal(conv.n, 0); /* written, but the Agent was not told */
        touch_in_dir(c, "ok");
        run_until_idle(c, w, 5 * USEC_PER_SEC);
        assert_int_equal(conv.n, 1);
        assert_int_equal(conv.epoch, 8);
        assert_true(conv.written_at >= t0 && conv.written_at <= now_usec(CLOCK_REALTIME));
        assert_int_equal(settings_writer_apply(w, &k8), 0); /* unchanged: nothing */
        assert_int_equal(conv.n, 1);
        settings_writer_free(w);

        /* A start with the file current and nothing owed: reported once. */
        assert_int_equal(settings_writer_new(c->event, &c->cfg, &w), 0);
        settings_writer_set_converged(w, on_converged, NULL);
        assert_int_equal(settings_writer_apply(w, &k8), 0);
        assert_int_equal(conv.n, 2);
        assert_int_equal(conv.epoch, 8);
        assert_true(conv.written_at <= now_usec(CLOCK_REALTIME)); /* the file's mtime */
        assert_int_equal(settings_writer_apply(w, &k8), 0);
        assert_int_equal(conv.n, 2);

        /* A hook that cannot run, then a SIGHUP without it: the written
         * file is the whole change. */
        c->cfg.on_change_argv = missing;
        assert_int_equal(settings_writer_reconfigure(w, &c->cfg), 0);
        assert_int_equal(settings_writer_apply(w, &k9), 0);
        assert_true(settings_writer_busy(w));
        assert_int_equal(conv.n, 2);
        c->cfg.on_change_argv = NULL;
        assert_int_equal(settings_writer_reconfigure(w, &c->cfg), 0);
        assert_int_equal(conv.n, 3);
        assert_int_equal(conv.epoch, 9);
        settings_writer_free(w);
}

/* A missing binary counts as a failed run (retried), not a crash. */
static void test_on_change_missing(void **state) {
        Ctx *c = *state;
        SettingsWriter *w = NULL;
        Committed k = committed(8);
        char *argv[] = {"/nonexistent/hook", NULL};

        c->cfg.on_change_argv = argv;
        assert_int_equal(settings_writer_new(c->event, &c->cfg, &w), 0);
        assert_int_equal(settings_writer_apply(w, &k), 0);
        assert_true(settings_writer_busy(w));
        /* Dropping the hook (SIGHUP) ends the retries. */
        c->cfg.on_change_argv = NULL;
        assert_int_equal(settings_writer_reconfigure(w, &c->cfg), 0);
        assert_false(settings_writer_busy(w));
        settings_writer_free(w);
}

/* A read-only file system: the old file stays, the error is reported and
 * the latest content is written once the file system is writable again. */
static void test_write_failure_retry(void **state) {
        Ctx *c = *state;
        SettingsWriter *w = NULL;
        Committed k = committed(8);
        char mnt[100], script[256], want[SETTINGS_MAX];
        _cleanup_(freep) char *got = NULL, *runs = NULL;

        snprintf(mnt, sizeof(mnt), "%s/mnt", c->dir);
        assert_int_equal(mkdir(mnt, 0755), 0);
        if (geteuid() != 0 || mount("tmpfs", mnt, "tmpfs", 0, "size=64k") < 0) {
                skip();
                return;
        }
        snprintf(c->path, sizeof(c->path), "%s/rabbitmq.ini", mnt);
        snprintf(script, sizeof(script), "echo $DSM_EPOCH >> %s/runs", c->dir);
        set_hook(c, script);
        assert_int_equal(settings_writer_new(c->event, &c->cfg, &w), 0);
        assert_int_equal(settings_writer_apply(w, &k), 0);
        run_until_idle(c, w, 5 * USEC_PER_SEC);

        assert_int_equal(mount(NULL, mnt, NULL, MS_REMOUNT | MS_RDONLY, NULL), 0);
        k = committed(9);
        assert_int_equal(settings_writer_apply(w, &k), -EROFS);
        k = committed(10);
        assert_int_equal(settings_writer_apply(w, &k), -EROFS);
        assert_int_equal(settings_writer_error(w), -EROFS);
        assert_true(settings_writer_busy(w));
        assert_int_equal(read_file_full(c->path, SETTINGS_MAX, &got, NULL), 0);
        assert_string_equal(got, contract_example);

        assert_int_equal(mount(NULL, mnt, NULL, MS_REMOUNT, NULL), 0);
        run_until_idle(c, w, 8 * USEC_PER_SEC);
        assert_int_equal(settings_writer_error(w), 0);
        free(got);
        got = NULL;
        assert_int_equal(read_file_full(c->path, SETTINGS_MAX, &got, NULL), 0);
        assert_true(settings_render(&k, want, sizeof(want)) > 0);
        assert_string_equal(got, want);
        runs = read_in_dir(c, "runs");
        assert_string_equal(runs, "8\n10\n");
        settings_writer_free(w);
        assert_int_equal(umount(mnt), 0);
}

/* The marker is on disk before on_change starts (the hook sees it) and
 * gone once it succeeded. */
static void test_marker_lifecycle(void **state) {
        Ctx *c = *state;
        SettingsWriter *w = NULL;
        Committed k = committed(8);
        char script[256];
        _cleanup_(freep) char *seen = NULL, *marker = NULL;

        snprintf(script, sizeof(script), "cat %1$s/" MARKER " >> %1$s/seen", c->dir);
        set_hook(c, script);
        assert_int_equal(settings_writer_new(c->event, &c->cfg, &w), 0);
        assert_int_equal(settings_writer_apply(w, &k), 0);
        assert_true(exists_in_dir(c, MARKER));
        marker = read_in_dir(c, MARKER);
        assert_string_equal(marker, "8\n");
        run_until_idle(c, w, 5 * USEC_PER_SEC);
        seen = read_in_dir(c, "seen");
        assert_string_equal(seen, "8\n");
        assert_false(exists_in_dir(c, MARKER));
        /* No hook: no marker either. */
        c->cfg.on_change_argv = NULL;
        assert_int_equal(settings_writer_reconfigure(w, &c->cfg), 0);
        k = committed(9);
        assert_int_equal(settings_writer_apply(w, &k), 0);
        assert_false(exists_in_dir(c, MARKER));
        settings_writer_free(w);
}

/* A failing on_change backing off when the daemon stops is run again after
 * the next start, although the file already matches the committed pair;
 * with the current content's variables. After it succeeded, a further
 * start runs nothing. */
static void test_owed_run_survives_restart(void **state) {
        Ctx *c = *state;
        SettingsWriter *w = NULL;
        Committed k = committed(8);
        char script[512], want[512];
        _cleanup_(freep) char *runs = NULL, *env = NULL;

        snprintf(script, sizeof(script),
                 "echo $DSM_EPOCH >> %1$s/runs; env | grep ^DSM_ | sort > %1$s/env; test -e %1$s/ok",
                 c->dir);
        set_hook(c, script);
        assert_int_equal(settings_writer_new(c->event, &c->cfg, &w), 0);
        assert_int_equal(settings_writer_apply(w, &k), 0);
        run_for(c, 300 * USEC_PER_MSEC); /* one failed run, now backing off */
        assert_true(settings_writer_busy(w));
        settings_writer_free(w);
        runs = read_in_dir(c, "runs");
        assert_string_equal(runs, "8\n");

        touch_in_dir(c, "ok");
        rewrites = 0;
        assert_int_equal(settings_writer_new(c->event, &c->cfg, &w), 0);
        assert_int_equal(settings_writer_apply(w, &k), 0);
        assert_int_equal(rewrites, 0); /* the file matched */
        assert_true(settings_writer_busy(w));
        run_until_idle(c, w, 5 * USEC_PER_SEC);
        free(runs);
        runs = read_in_dir(c, "runs");
        assert_string_equal(runs, "8\n8\n");
        env = read_in_dir(c, "env");
        snprintf(want, sizeof(want),
                 "DSM_BROKER_HOST=p2.example\nDSM_BROKER_PORT=5671\nDSM_BROKER_TLS=true\n"
                 "DSM_BROKER_VHOST=/dsm\nDSM_EPOCH=8\nDSM_PRIMARY_ID=p2\nDSM_SETTINGS_FILE=%s\n",
                 c->path);
        assert_string_equal(env, want);
        assert_false(exists_in_dir(c, MARKER));
        settings_writer_free(w);

        /* Nothing owed: the next start runs nothing. */
        assert_int_equal(settings_writer_new(c->event, &c->cfg, &w), 0);
        assert_int_equal(settings_writer_apply(w, &k), 0);
        assert_false(settings_writer_busy(w));
        settings_writer_free(w);
        free(runs);
        runs = read_in_dir(c, "runs");
        assert_string_equal(runs, "8\n8\n");
}

/* Stopped while on_change runs (it is terminated): run again after the
 * next start. */
static void test_interrupted_run_survives_restart(void **state) {
        Ctx *c = *state;
        SettingsWriter *w = NULL;
        Committed k = committed(8);
        char script[256];
        _cleanup_(freep) char *runs = NULL;

        snprintf(script, sizeof(script), "echo $DSM_EPOCH >> %1$s/runs; test -e %1$s/ok || sleep 30",
                 c->dir);
        set_hook(c, script);
        assert_int_equal(settings_writer_new(c->event, &c->cfg, &w), 0);
        assert_int_equal(settings_writer_apply(w, &k), 0);
        run_for(c, 200 * USEC_PER_MSEC);
        settings_writer_free(w);

        touch_in_dir(c, "ok");
        assert_int_equal(settings_writer_new(c->event, &c->cfg, &w), 0);
        assert_int_equal(settings_writer_apply(w, &k), 0);
        run_until_idle(c, w, 5 * USEC_PER_SEC);
        runs = read_in_dir(c, "runs");
        assert_string_equal(runs, "8\n8\n");
        assert_false(exists_in_dir(c, MARKER));
        settings_writer_free(w);
}

/* A marker found at start when on_change is no longer set: removed, no
 * run. A marker's leftover temporary files are swept, the marker kept. */
static void test_marker_without_hook(void **state) {
        Ctx *c = *state;
        SettingsWriter *w = NULL;
        Committed k = committed(8);

        touch_in_dir(c, "." MARKER ".tmp-AbC123");
        touch_in_dir(c, MARKER);
        assert_int_equal(settings_writer_new(c->event, &c->cfg, &w), 0);
        assert_false(exists_in_dir(c, "." MARKER ".tmp-AbC123"));
        assert_false(exists_in_dir(c, MARKER));
        assert_int_equal(settings_writer_apply(w, &k), 0);
        assert_false(settings_writer_busy(w));
        settings_writer_free(w);

        /* With a hook, the sweep at start keeps the marker. */
        set_hook(c, "true");
        touch_in_dir(c, MARKER);
        assert_int_equal(settings_writer_new(c->event, &c->cfg, &w), 0);
        assert_true(exists_in_dir(c, MARKER));
        /* Dropping the hook (SIGHUP) removes it. */
        c->cfg.on_change_argv = NULL;
        assert_int_equal(settings_writer_reconfigure(w, &c->cfg), 0);
        assert_false(exists_in_dir(c, MARKER));
        settings_writer_free(w);
}

/* The rename happened but the directory fsync failed: the agent sees the
 * new file, so it counts as written and on_change runs. */
static void test_dir_fsync_failure(void **state) {
        Ctx *c = *state;
        SettingsWriter *w = NULL;
        Committed k = committed(8);
        char script[256];
        _cleanup_(freep) char *runs = NULL, *got = NULL;

        snprintf(script, sizeof(script), "echo $DSM_EPOCH >> %s/runs", c->dir);
        set_hook(c, script);
        assert_int_equal(settings_writer_new(c->event, &c->cfg, &w), 0);
        fail_dir_fsync = true;
        assert_int_equal(settings_writer_apply(w, &k), 0);
        fail_dir_fsync = false;
        assert_int_equal(settings_writer_error(w), 0);
        assert_int_equal(rewrites, 1);
        run_until_idle(c, w, 5 * USEC_PER_SEC);
        runs = read_in_dir(c, "runs");
        assert_string_equal(runs, "8\n");
        assert_int_equal(read_file_full(c->path, SETTINGS_MAX, &got, NULL), 0);
        assert_string_equal(got, contract_example);
        settings_writer_free(w);
}

int main(void) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_render),
                cmocka_unit_test_setup_teardown(test_rewrite_only_on_change, setup, teardown),
                cmocka_unit_test_setup_teardown(test_sweep_at_start, setup, teardown),
                cmocka_unit_test_setup_teardown(test_on_change_env, setup, teardown),
                cmocka_unit_test_setup_teardown(test_coalescing, setup, teardown),
                cmocka_unit_test_setup_teardown(test_on_change_timeout, setup, teardown),
                cmocka_unit_test_setup_teardown(test_on_change_retry, setup, teardown),
                cmocka_unit_test_setup_teardown(test_on_change_missing, setup, teardown),
                cmocka_unit_test_setup_teardown(test_converged_reports, setup, teardown),
                cmocka_unit_test_setup_teardown(test_write_failure_retry, setup, teardown),
                cmocka_unit_test_setup_teardown(test_marker_lifecycle, setup, teardown),
                cmocka_unit_test_setup_teardown(test_owed_run_survives_restart, setup, teardown),
                cmocka_unit_test_setup_teardown(test_interrupted_run_survives_restart, setup, teardown),
                cmocka_unit_test_setup_teardown(test_marker_without_hook, setup, teardown),
                cmocka_unit_test_setup_teardown(test_dir_fsync_failure, setup, teardown),
        };
        return cmocka_run_group_tests(tests, NULL, NULL);
}
