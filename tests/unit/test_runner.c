/* runner: real children on a real sd-event loop. */
#include <dirent.h>
#include <fcntl.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>
#include <sys/wait.h>
#include <time.h>

#include <cmocka.h>

#include "atomic_file.h"
#include "log.h"
#include "macro.h"
#include "runner.h"

typedef struct Ctx {
        sd_event *event;
        Runner *runner;
        bool done;
        int status;
        char dir[64];
} Ctx;

static int setup(void **state) {
        Ctx *c = calloc(1, sizeof(Ctx));

        assert_non_null(c);
        log_setup(LOG_TARGET_STDERR, LOG_DEBUG);
        assert_int_equal(sd_event_new(&c->event), 0);
        assert_int_equal(runner_new(c->event, "t", &c->runner), 0);
        strscpy(c->dir, sizeof(c->dir), "/tmp/test-runner-XXXXXX");
        assert_non_null(mkdtemp(c->dir));
        *state = c;
        return 0;
}

static int teardown(void **state) {
        Ctx *c = *state;
        char cmd[128];

        assert_null(runner_free(c->runner));
        sd_event_unref(c->event);
        snprintf(cmd, sizeof(cmd), "rm -rf '%s'", c->dir);
        assert_int_equal(system(cmd), 0);
        free(c);
        return 0;
}

static void on_done(Runner *r, int status, void *userdata) {
        Ctx *c = userdata;
        c->done = true;
        c->status = status;
}

/* Runs the loop until the child finished; fails after limit. Returns the
 * time it took. */
static uint64_t run_until_done(Ctx *c, uint64_t limit) {
        uint64_t start = now_usec(CLOCK_MONOTONIC);

        while (!c->done) {
                assert_true(now_usec(CLOCK_MONOTONIC) - start < limit);
                assert_true(sd_event_run(c->event, 100 * USEC_PER_MSEC) >= 0);
        }
        return now_usec(CLOCK_MONOTONIC) - start;
}

static int run_sh(Ctx *c, const char *script, char *const env[], usec_t timeout) {
        char *argv[] = {"/bin/sh", "-c", (char *) script, NULL};
        int r;

        c->done = false;
        c->status = 12345;
        r = runner_start(c->runner, argv, env, timeout, on_done, c);
        if (r < 0)
                return r;
        run_until_done(c, 15 * USEC_PER_SEC);
        return c->status;
}

static void test_exit_status(void **state) {
        Ctx *c = *state;

        assert_int_equal(run_sh(c, "exit 0", NULL, 0), 0);
        assert_int_equal(run_sh(c, "exit 3", NULL, 5 * USEC_PER_SEC), 3);
        assert_int_equal(run_sh(c, "kill -9 $$", NULL, 0), -SIGKILL);
        assert_false(runner_busy(c->runner));
        /* Every child was reaped: no zombies left behind. */
        assert_int_equal(waitpid(-1, NULL, WNOHANG), -1);
        assert_int_equal(errno, ECHILD);
}

static void test_missing_binary(void **state) {
        Ctx *c = *state;
        char *argv[] = {"/nonexistent/binary", NULL};
        char *argv2[] = {"no-such-command-on-path-xyz", NULL};
        char *argv3[] = {"/etc/passwd", NULL};

        assert_int_equal(runner_start(c->runner, argv, NULL, 0, on_done, c), -ENOENT);
        assert_false(runner_busy(c->runner));
        assert_int_equal(runner_start(c->runner, argv2, NULL, 0, on_done, c), -ENOENT);
        assert_int_equal(runner_start(c->runner, argv3, NULL, 0, on_done, c), -EACCES);
        assert_false(c->done);
}

static void test_busy(void **state) {
        Ctx *c = *state;
        char *argv[] = {"/bin/sleep", "0.2", NULL};

        assert_int_equal(runner_start(c->runner, argv, NULL, 0, on_done, c), 0);
        assert_true(runner_busy(c->runner));
        assert_int_equal(runner_start(c->runner, argv, NULL, 0, on_done, c), -EBUSY);
        run_until_done(c, 5 * USEC_PER_SEC);
        assert_int_equal(c->status, 0);
}

/* Freeing a Runner stops and reaps its child; one that exits on SIGTERM
 * (sleep does) goes at once. */
static void test_free_kills(void **state) {
        Ctx *c = *state;
        char *argv[] = {"/bin/sleep", "30", NULL};
        uint64_t start = now_usec(CLOCK_MONOTONIC);

        assert_int_equal(runner_start(c->runner, argv, NULL, 0, on_done, c), 0);
        c->runner = runner_free(c->runner);
        assert_true(now_usec(CLOCK_MONOTONIC) - start < 2 * USEC_PER_SEC);
        assert_int_equal(waitpid(-1, NULL, WNOHANG), -1);
        assert_false(c->done);
}

/* Number of processes of group pgid that are not zombies (a killed
 * grandchild may stay a zombie for a while when it was reparented to an
 * init that reaps slowly, or not at all in a container). */
static int group_alive(pid_t pgid) {
        DIR *d = opendir("/proc");
        struct dirent *de;
        int n = 0;

        assert_non_null(d);
        while ((de = readdir(d))) {
                char p[300], buf[512], state;
                const char *rp;
                int pgrp = 0, ppid, fd;
                ssize_t len;

                if (de->d_name[0] < '0' || de->d_name[0] > '9')
                        continue;
                snprintf(p, sizeof(p), "/proc/%s/stat", de->d_name);
                fd = open(p, O_RDONLY | O_CLOEXEC);
                if (fd < 0)
                        continue;
                len = read(fd, buf, sizeof(buf) - 1);
                close(fd);
                if (len <= 0)
                        continue;
                buf[len] = 0;
                rp = strrchr(buf, ')');
                if (rp && sscanf(rp + 1, " %c %d %d", &state, &ppid, &pgrp) == 3 && pgrp == pgid &&
                    state != 'Z' && state != 'X')
                        n++;
        }
        closedir(d);
        return n;
}

/* Waits (without the loop: the child needs nothing from it) until the
 * child created dir/name. */
static void wait_for_file(Ctx *c, const char *name) {
        char p[128];
        uint64_t start = now_usec(CLOCK_MONOTONIC);

        snprintf(p, sizeof(p), "%s/%s", c->dir, name);
        while (access(p, F_OK) < 0) {
                assert_true(now_usec(CLOCK_MONOTONIC) - start < 5 * USEC_PER_SEC);
                usleep(10000);
        }
}

/* A graceful stop: the child gets SIGTERM and time to clean up; so does
 * the rest of its group (the background sleep). */
static void test_free_terminates(void **state) {
        Ctx *c = *state;
        char script[512], path[128];
        char *argv[] = {"/bin/sh", "-c", script, NULL};
        _cleanup_(freep) char *got = NULL;
        uint64_t start;
        pid_t pid;

        snprintf(script, sizeof(script),
                 "trap 'echo cleaned-up > %1$s/bye; exit 0' TERM; echo $$ > %1$s/pid; sleep 30 & "
                 "touch %1$s/ready; wait",
                 c->dir);
        assert_int_equal(runner_start(c->runner, argv, NULL, 0, on_done, c), 0);
        wait_for_file(c, "ready");
        snprintf(path, sizeof(path), "%s/pid", c->dir);
        assert_int_equal(read_file_full(path, 64, &got, NULL), 0);
        pid = (pid_t) atoi(got);
        assert_true(pid > 1);
        start = now_usec(CLOCK_MONOTONIC);
        c->runner = runner_free(c->runner);
        assert_true(now_usec(CLOCK_MONOTONIC) - start < 3 * USEC_PER_SEC);
        free(got);
        got = NULL;
        snprintf(path, sizeof(path), "%s/bye", c->dir);
        assert_int_equal(read_file_full(path, 64, &got, NULL), 0);
        assert_string_equal(got, "cleaned-up\n");
        assert_false(c->done);
        /* Reaped, and nothing of its group is left. */
        assert_int_equal(waitpid(-1, NULL, WNOHANG), -1);
        assert_int_equal(errno, ECHILD);
        assert_int_equal(group_alive(pid), 0);
}

/* A child (and group) ignoring SIGTERM gets 5 s, then SIGKILL. */
static void test_free_kills_after_grace(void **state) {
        Ctx *c = *state;
        char script[512], path[128];
        char *argv[] = {"/bin/sh", "-c", script, NULL};
        _cleanup_(freep) char *got = NULL;
        uint64_t start, took;
        pid_t pid;

        snprintf(script, sizeof(script), "trap '' TERM; echo $$ > %1$s/pid; touch %1$s/ready; sleep 30",
                 c->dir);
        assert_int_equal(runner_start(c->runner, argv, NULL, 0, on_done, c), 0);
        wait_for_file(c, "ready");
        snprintf(path, sizeof(path), "%s/pid", c->dir);
        assert_int_equal(read_file_full(path, 64, &got, NULL), 0);
        pid = (pid_t) atoi(got);
        assert_true(pid > 1);
        start = now_usec(CLOCK_MONOTONIC);
        c->runner = runner_free(c->runner);
        took = now_usec(CLOCK_MONOTONIC) - start;
        assert_true(took >= 4500 * USEC_PER_MSEC);
        assert_true(took < 8 * USEC_PER_SEC);
        assert_false(c->done);
        assert_int_equal(waitpid(-1, NULL, WNOHANG), -1);
        assert_int_equal(errno, ECHILD);
        assert_int_equal(group_alive(pid), 0);
}

static void test_environment(void **state) {
        Ctx *c = *state;
        char *env[] = {"DSM_TEST_NEW=a b", "DSM_TEST_OVERRIDE=new", NULL};
        char script[256], path[128];
        _cleanup_(freep) char *got = NULL;

        setenv("DSM_TEST_OVERRIDE", "old", 1);
        setenv("DSM_TEST_KEPT", "kept", 1);
        /* systemd's variables for the daemon itself never reach a child. */
        setenv("NOTIFY_SOCKET", "/run/test-notify", 1);
        setenv("WATCHDOG_USEC", "1000000", 1);
        setenv("LISTEN_FDS", "1", 1);
        snprintf(path, sizeof(path), "%s/env", c->dir);
        snprintf(script, sizeof(script),
                 "env | grep -E '^(DSM_TEST_|NOTIFY_SOCKET|WATCHDOG_|LISTEN_)' | sort > %s", path);
        assert_int_equal(run_sh(c, script, env, 0), 0);
        assert_int_equal(read_file_full(path, 4096, &got, NULL), 0);
        assert_string_equal(got, "DSM_TEST_KEPT=kept\nDSM_TEST_NEW=a b\nDSM_TEST_OVERRIDE=new\n");
        unsetenv("DSM_TEST_OVERRIDE");
        unsetenv("DSM_TEST_KEPT");
        unsetenv("NOTIFY_SOCKET");
        unsetenv("WATCHDOG_USEC");
        unsetenv("LISTEN_FDS");
}

/* A fresh signal mask (the daemon blocks SIGCHLD) and default
 * dispositions, stdin /dev/null, no inherited descriptors, its own process
 * group. The shell execs grep so that grep reads the mask it got (dash
 * blocks every signal while it waits for a child). */
static void test_child_context(void **state) {
        Ctx *c = *state;
        char script[512], path[128];
        _cleanup_(freep) char *got = NULL;
        int leak = open("/dev/null", O_RDONLY); /* no O_CLOEXEC on purpose */
        struct sigaction sa = {.sa_handler = SIG_IGN}, old;

        assert_true(leak > 2);
        assert_int_equal(sigaction(SIGUSR1, &sa, &old), 0);
        snprintf(path, sizeof(path), "%s/ctx", c->dir);
        snprintf(script, sizeof(script),
                 "{ readlink /proc/$$/fd/0; test -e /proc/$$/fd/%d && echo leaked; "
                 "test \"$(ps -o pgid= -p $$ | tr -d ' ')\" = $$ && echo own-group; } > %s; "
                 "exec grep -E '^Sig(Blk|Ign)' /proc/self/status >> %s",
                 leak, path, path);
        assert_int_equal(run_sh(c, script, NULL, 0), 0);
        close(leak);
        assert_int_equal(sigaction(SIGUSR1, &old, NULL), 0);
        assert_int_equal(read_file_full(path, 4096, &got, NULL), 0);
        if (!strstr(got, "/dev/null\n") || !strstr(got, "SigBlk:\t0000000000000000\n") ||
            strstr(got, "leaked"))
                fail_msg("child context: %s", got);
        /* Signals 32 and 33 belong to glibc's threads: sigaction() refuses
         * them, so an ignored state inherited from whoever started the test
         * passes through. Every ordinary signal must be back at default. */
        const char *ign = strstr(got, "SigIgn:\t");
        assert_non_null(ign);
        unsigned long long ignored = strtoull(ign + strlen("SigIgn:\t"), NULL, 16);
        if (ignored & 0x7fffffffULL)
                fail_msg("child context: ignored signals %llx", ignored);
        if (access("/bin/ps", X_OK) == 0 && !strstr(got, "own-group"))
                fail_msg("child context: %s", got);
}

static void test_timeout(void **state) {
        Ctx *c = *state;
        char *argv[] = {"/bin/sh", "-c", "sleep 30 & wait", NULL};
        uint64_t took;

        c->done = false;
        assert_int_equal(runner_start(c->runner, argv, NULL, 200 * USEC_PER_MSEC, on_done, c), 0);
        took = run_until_done(c, 5 * USEC_PER_SEC);
        assert_int_equal(c->status, -ETIMEDOUT);
        assert_true(took < 2 * USEC_PER_SEC);
}

/* A child that ignores SIGTERM is killed 5 s later. */
static void test_timeout_sigkill(void **state) {
        Ctx *c = *state;
        char *argv[] = {"/bin/sh", "-c", "trap '' TERM; sleep 30", NULL};
        uint64_t took;

        c->done = false;
        assert_int_equal(runner_start(c->runner, argv, NULL, 100 * USEC_PER_MSEC, on_done, c), 0);
        took = run_until_done(c, 10 * USEC_PER_SEC);
        assert_int_equal(c->status, -ETIMEDOUT);
        assert_true(took >= 5 * USEC_PER_SEC);
}

/* Output goes to the log as "<name>: <line>", capped. */
static void test_output(void **state) {
        Ctx *c = *state;
        char logpath[128];
        _cleanup_(freep) char *got = NULL;
        int saved, fd;

        snprintf(logpath, sizeof(logpath), "%s/log", c->dir);
        fd = open(logpath, O_CREAT | O_WRONLY | O_TRUNC | O_CLOEXEC, 0600);
        assert_true(fd >= 0);
        saved = dup(STDERR_FILENO);
        dup2(fd, STDERR_FILENO);
        close(fd);
        assert_int_equal(run_sh(c, "echo hello; echo world >&2; printf 'no newline'", NULL, 0), 0);
        assert_int_equal(run_sh(c, "head -c 200000 /dev/zero | tr '\\0' x | fold -w 100", NULL, 0), 0);
        dup2(saved, STDERR_FILENO);
        close(saved);

        assert_int_equal(read_file_full(logpath, 1 << 20, &got, NULL), 0);
        assert_non_null(strstr(got, "t: hello"));
        assert_non_null(strstr(got, "t: world"));
        assert_non_null(strstr(got, "t: no newline"));
        assert_non_null(strstr(got, "t: (output truncated)"));
        assert_true(strlen(got) < 200000);
}

int main(void) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test_setup_teardown(test_exit_status, setup, teardown),
                cmocka_unit_test_setup_teardown(test_missing_binary, setup, teardown),
                cmocka_unit_test_setup_teardown(test_busy, setup, teardown),
                cmocka_unit_test_setup_teardown(test_free_kills, setup, teardown),
                cmocka_unit_test_setup_teardown(test_free_terminates, setup, teardown),
                cmocka_unit_test_setup_teardown(test_free_kills_after_grace, setup, teardown),
                cmocka_unit_test_setup_teardown(test_environment, setup, teardown),
                cmocka_unit_test_setup_teardown(test_child_context, setup, teardown),
                cmocka_unit_test_setup_teardown(test_timeout, setup, teardown),
                cmocka_unit_test_setup_teardown(test_timeout_sigkill, setup, teardown),
                cmocka_unit_test_setup_teardown(test_output, setup, teardown),
        };
        return cmocka_run_group_tests(tests, NULL, NULL);
}
