/* Child processes with a timeout. See runner.h.
 *
 * The child gets its own process group, so the timeout's SIGTERM/SIGKILL
 * also reach whatever it started (systemctl, a script's children). Its
 * output goes through a pipe into the log, line by line, with a cap so a
 * chatty or hostile command cannot flood the journal. */
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <sys/wait.h>
#include <time.h>

#include "log.h"
#include "macro.h"
#include "runner.h"

#define RUNNER_KILL_GRACE_USEC (5 * USEC_PER_SEC)
#define RUNNER_STOP_GRACE_USEC (5 * USEC_PER_SEC)
#define RUNNER_STOP_POLL_USEC  (10 * USEC_PER_MSEC)
#define RUNNER_LINE_MAX        1024
#define RUNNER_OUTPUT_MAX      (64 * 1024)

extern char **environ;

struct Runner {
        sd_event *event;
        char *name;

        pid_t pid; /* > 0 while a child runs */
        sd_event_source *child_source;
        sd_event_source *timeout_source; /* SIGTERM at the timeout, then SIGKILL */
        bool timed_out;

        int out_fd;
        sd_event_source *out_source;
        char line[RUNNER_LINE_MAX + 1];
        size_t line_len;
        size_t logged;
        bool truncated;

        runner_done_t done;
        void *userdata;
};

/* sd_event_add_child() refuses to work unless SIGCHLD is blocked. */
static int block_sigchld(void) {
        sigset_t ss;

        sigemptyset(&ss);
        sigaddset(&ss, SIGCHLD);
        return sigprocmask(SIG_BLOCK, &ss, NULL) < 0 ? negative_errno() : 0;
}

int runner_new(sd_event *e, const char *name, Runner **ret) {
        Runner *r;
        int k;

        if (!e || !name || !ret)
                return -EINVAL;
        k = block_sigchld();
        if (k < 0)
                return k;
        r = calloc(1, sizeof(*r));
        if (!r)
                return -ENOMEM;
        r->name = strdup(name);
        if (!r->name) {
                free(r);
                return -ENOMEM;
        }
        r->event = sd_event_ref(e);
        r->out_fd = -1;
        *ret = r;
        return 0;
}

/* Logs one line of output, keeping the per-run cap. Control characters
 * are replaced so a line stays one line on stderr too. */
static void output_line(Runner *r, char *s, size_t n) {
        if (r->truncated)
                return;
        if (r->logged + n > RUNNER_OUTPUT_MAX) {
                r->truncated = true;
                log_info("%s: (output truncated)", r->name);
                return;
        }
        r->logged += n;
        for (size_t i = 0; i < n; i++)
                if ((unsigned char) s[i] < 0x20 && s[i] != '\t')
                        s[i] = '?';
        s[n] = 0;
        log_info("%s: %s", r->name, s);
}

static void output_flush(Runner *r) {
        if (r->line_len > 0)
                output_line(r, r->line, r->line_len);
        r->line_len = 0;
}

static void output_feed(Runner *r, const char *buf, size_t n) {
        for (size_t i = 0; i < n; i++) {
                if (buf[i] == '\n') {
                        output_flush(r);
                        continue;
                }
                r->line[r->line_len++] = buf[i];
                if (r->line_len == RUNNER_LINE_MAX)
                        output_flush(r);
        }
}

static void output_close(Runner *r) {
        output_flush(r);
        r->out_source = sd_event_source_disable_unref(r->out_source);
        if (r->out_fd >= 0)
                close(r->out_fd);
        r->out_fd = -1;
}

/* Reads what is there; closes the pipe at EOF. Returns false at EOF. */
static bool output_drain(Runner *r) {
        char buf[4096];

        for (;;) {
                ssize_t n = read(r->out_fd, buf, sizeof(buf));
                if (n > 0) {
                        output_feed(r, buf, (size_t) n);
                        continue;
                }
                if (n < 0 && errno == EINTR)
                        continue;
                if (n < 0 && errno == EAGAIN)
                        return true;
                output_close(r);
                return false;
        }
}

static int on_output(sd_event_source *s, int fd, uint32_t revents, void *userdata) {
        output_drain(userdata);
        return 0;
}

static void kill_group(Runner *r, int sig) {
        if (r->pid > 0)
                (void) kill(-r->pid, sig);
}

static int on_timeout(sd_event_source *s, uint64_t usec, void *userdata) {
        Runner *r = userdata;

        if (!r->timed_out) {
                r->timed_out = true;
                log_warning("%s: timed out, sending SIGTERM", r->name);
                kill_group(r, SIGTERM);
                (void) sd_event_source_set_time_relative(s, RUNNER_KILL_GRACE_USEC);
                (void) sd_event_source_set_enabled(s, SD_EVENT_ONESHOT);
                return 0;
        }
        log_warning("%s: still running %llus after SIGTERM, sending SIGKILL", r->name,
                    (unsigned long long) (RUNNER_KILL_GRACE_USEC / USEC_PER_SEC));
        kill_group(r, SIGKILL);
        return 0;
}

static int status_of(const Runner *r, const siginfo_t *si) {
        if (r->timed_out)
                return -ETIMEDOUT;
        if (si->si_code == CLD_EXITED)
                return si->si_status;
        return -si->si_status;
}

/* Forgets the child (the event loop reaps it after this callback), then
 * reports. done may start the next run or free the Runner: r is not
 * touched after the call. */
static int on_child(sd_event_source *s, const siginfo_t *si, void *userdata) {
        Runner *r = userdata;
        runner_done_t done = r->done;
        void *done_userdata = r->userdata;
        int status = status_of(r, si);

        /* What it printed before exiting is already in the pipe; whatever
         * its leftover children still print is not waited for. */
        if (r->out_fd >= 0 && output_drain(r))
                output_close(r);
        if (r->timed_out)
                kill_group(r, SIGKILL); /* leftovers of the group */
        r->child_source = sd_event_source_unref(r->child_source);
        r->timeout_source = sd_event_source_disable_unref(r->timeout_source);
        r->pid = 0;
        r->done = NULL;
        r->userdata = NULL;
        log_debug("%s: finished with status %d", r->name, status);
        if (done)
                done(r, status, done_userdata);
        return 0;
}

/* environ plus env, an entry of env replacing the same name in environ.
 * The array points into both; only the array is allocated. */
/* Variables systemd gives the daemon itself: a child that saw them could
 * send READY/WATCHDOG in the daemon's name or grab its listening socket. */
static bool daemon_only(const char *entry) {
        static const char *const names[] = {"NOTIFY_SOCKET=", "WATCHDOG_PID=", "WATCHDOG_USEC=",
                                            "LISTEN_PID=",    "LISTEN_FDS=",   "LISTEN_FDNAMES="};
        for (size_t i = 0; i < ELEMENTSOF(names); i++)
                if (strncmp(entry, names[i], strlen(names[i])) == 0)
                        return true;
        return false;
}

static char **build_envp(char *const env[]) {
        size_t n_env = 0, n_extra = 0, k = 0;
        char **envp;

        while (environ && environ[n_env])
                n_env++;
        while (env && env[n_extra])
                n_extra++;
        envp = calloc(n_env + n_extra + 1, sizeof(char *));
        if (!envp)
                return NULL;
        for (size_t i = 0; i < n_env; i++) {
                const char *eq = strchr(environ[i], '=');
                size_t len = eq ? (size_t) (eq - environ[i]) + 1 : strlen(environ[i]);
                bool overridden = false;

                for (size_t j = 0; j < n_extra && !overridden; j++)
                        overridden = strncmp(env[j], environ[i], len) == 0;
                if (!overridden && !daemon_only(environ[i]))
                        envp[k++] = environ[i];
        }
        for (size_t j = 0; j < n_extra; j++)
                envp[k++] = env[j];
        return envp;
}

static void close_all_but(int keep) {
        if ((keep == 3 || close_range(3, (unsigned) keep - 1, 0) == 0) &&
            close_range((unsigned) keep + 1, ~0U, 0) == 0)
                return;
        /* Kernels before 5.9: the slow way, still async-signal-safe. */
        for (int fd = 3; fd < 65536; fd++)
                if (fd != keep)
                        (void) close(fd);
}

/* In the child, between fork and exec: only async-signal-safe calls. On
 * failure the errno goes back through err_fd (closed by a successful exec). */
_Noreturn static void child_exec(char *const argv[], char **envp, int out_fd, int err_fd) {
        struct sigaction sa = {.sa_handler = SIG_DFL};
        sigset_t ss;
        int null_fd, e;

        (void) setpgid(0, 0);
        for (int sig = 1; sig < _NSIG; sig++)
                (void) sigaction(sig, &sa, NULL);
        sigemptyset(&ss);
        (void) sigprocmask(SIG_SETMASK, &ss, NULL);

        null_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
        if (null_fd < 0 || dup2(null_fd, STDIN_FILENO) < 0 || dup2(out_fd, STDOUT_FILENO) < 0 ||
            dup2(out_fd, STDERR_FILENO) < 0)
                goto fail;
        close_all_but(err_fd);

        if (strchr(argv[0], '/'))
                execve(argv[0], argv, envp);
        else
                execvpe(argv[0], argv, envp);
fail:
        e = errno;
        (void) !write(err_fd, &e, sizeof(e));
        _exit(127);
}

/* Moves fd above stdio, so dup2() onto 0-2 in the child cannot clobber it
 * (a daemon may be started with stdio closed). */
static int fd_above_stdio(int fd) {
        int nfd;

        if (fd > STDERR_FILENO)
                return fd;
        nfd = fcntl(fd, F_DUPFD_CLOEXEC, 3);
        close(fd);
        return nfd < 0 ? negative_errno() : nfd;
}

static int make_pipe(int fds[2]) {
        if (pipe2(fds, O_CLOEXEC) < 0)
                return negative_errno();
        fds[0] = fd_above_stdio(fds[0]);
        fds[1] = fd_above_stdio(fds[1]);
        if (fds[0] < 0 || fds[1] < 0) {
                int r = fds[0] < 0 ? fds[0] : fds[1];
                if (fds[0] >= 0)
                        close(fds[0]);
                if (fds[1] >= 0)
                        close(fds[1]);
                return r;
        }
        return 0;
}

/* Waits for the exec verdict: EOF means execve() succeeded. */
static int read_exec_error(int fd) {
        int e;
        ssize_t n;

        do
                n = read(fd, &e, sizeof(e));
        while (n < 0 && errno == EINTR);
        if (n == (ssize_t) sizeof(e))
                return e > 0 ? -e : -EIO;
        return 0;
}

static int spawn(char *const argv[], char **envp, pid_t *ret_pid, int *ret_out) {
        int out[2], err[2], r;
        pid_t pid;

        r = make_pipe(out);
        if (r < 0)
                return r;
        r = make_pipe(err);
        if (r < 0) {
                close(out[0]);
                close(out[1]);
                return r;
        }
        pid = fork();
        if (pid == 0)
                child_exec(argv, envp, out[1], err[1]);
        r = pid < 0 ? negative_errno() : 0;
        close(out[1]);
        close(err[1]);
        if (r == 0)
                r = read_exec_error(err[0]);
        close(err[0]);
        if (r < 0) {
                if (pid > 0)
                        (void) waitpid(pid, NULL, 0);
                close(out[0]);
                return r;
        }
        (void) fcntl(out[0], F_SETFL, O_NONBLOCK);
        *ret_pid = pid;
        *ret_out = out[0];
        return 0;
}

/* Event sources for a freshly spawned child. */
static int watch(Runner *r, usec_t timeout) {
        int k;

        k = sd_event_add_child(r->event, &r->child_source, r->pid, WEXITED, on_child, r);
        if (k < 0)
                return k;
        k = sd_event_add_io(r->event, &r->out_source, r->out_fd, EPOLLIN, on_output, r);
        if (k < 0)
                return k;
        if (timeout > 0 && timeout != USEC_INFINITY) {
                k = sd_event_add_time_relative(r->event, &r->timeout_source, CLOCK_MONOTONIC, timeout, 0,
                                               on_timeout, r);
                if (k < 0)
                        return k;
        }
        return 0;
}

static usec_t monotonic_usec(void) {
        struct timespec ts;

        (void) clock_gettime(CLOCK_MONOTONIC, &ts);
        return (usec_t) ts.tv_sec * USEC_PER_SEC + (usec_t) ts.tv_nsec / NSEC_PER_USEC;
}

/* True once the child has exited (or is no child of ours any more). It is
 * not reaped: while it is a zombie its pid cannot be reused, so a signal
 * to its process group cannot hit a stranger. */
static bool exited_nohang(pid_t pid) {
        siginfo_t si = {};
        int k;

        do
                k = waitid(P_PID, (id_t) pid, &si, WEXITED | WNOHANG | WNOWAIT);
        while (k < 0 && errno == EINTR);
        return k < 0 ? errno == ECHILD : si.si_pid == pid;
}

/* A graceful stop: SIGTERM to the group, then up to RUNNER_STOP_GRACE_USEC
 * for the child to exit. This blocks the loop, which is acceptable only
 * because the caller is shutting down. Output keeps being drained so a
 * child logging while it exits cannot fill the pipe and stall. */
static void stop_gracefully(Runner *r) {
        usec_t deadline = monotonic_usec() + RUNNER_STOP_GRACE_USEC;

        log_info("%s: stopping pid %d (SIGTERM)", r->name, (int) r->pid);
        kill_group(r, SIGTERM);
        for (;;) {
                if (r->out_fd >= 0)
                        (void) output_drain(r);
                if (exited_nohang(r->pid))
                        return;
                if (monotonic_usec() >= deadline)
                        break;
                (void) usleep(RUNNER_STOP_POLL_USEC);
        }
        log_warning("%s: still running %llus after SIGTERM, sending SIGKILL", r->name,
                    (unsigned long long) (RUNNER_STOP_GRACE_USEC / USEC_PER_SEC));
}

/* Forgets the child without calling done. graceful (runner_free): SIGTERM
 * first; otherwise (a start that failed half-way) SIGKILL at once. Either
 * way whatever is left of the group then gets SIGKILL (the child is not
 * reaped before, so the group id is still its) and the child is reaped:
 * no zombie. */
static void reset(Runner *r, bool graceful) {
        r->child_source = sd_event_source_disable_unref(r->child_source);
        r->timeout_source = sd_event_source_disable_unref(r->timeout_source);
        if (r->pid > 0) {
                if (graceful)
                        stop_gracefully(r);
                kill_group(r, SIGKILL);
                (void) waitpid(r->pid, NULL, 0);
        }
        r->pid = 0;
        if (r->out_fd >= 0 || r->out_source)
                output_close(r);
        r->done = NULL;
        r->userdata = NULL;
}

int runner_start(Runner *r, char *const argv[], char *const env[], usec_t timeout, runner_done_t done,
                 void *userdata) {
        _cleanup_(freep) char **envp = NULL;
        int k;

        if (!r || !argv || !argv[0])
                return -EINVAL;
        if (runner_busy(r))
                return -EBUSY;
        envp = build_envp(env);
        if (!envp)
                return -ENOMEM;
        k = spawn(argv, envp, &r->pid, &r->out_fd);
        if (k < 0)
                return k;
        r->timed_out = false;
        r->line_len = 0;
        r->logged = 0;
        r->truncated = false;
        k = watch(r, timeout);
        if (k < 0) {
                reset(r, false);
                return k;
        }
        r->done = done;
        r->userdata = userdata;
        log_debug("%s: started %s as pid %d", r->name, argv[0], (int) r->pid);
        return 0;
}

bool runner_busy(const Runner *r) {
        return r && r->pid > 0;
}

Runner *runner_free(Runner *r) {
        if (!r)
                return NULL;
        reset(r, true);
        sd_event_unref(r->event);
        free(r->name);
        free(r);
        return NULL;
}
