/* Child processes with a timeout, for on_change and the update command:
 * fork/exec of an argv (no shell), extra environment variables, output
 * captured line by line into the log, SIGTERM at the timeout then SIGKILL
 * after a grace period. One child per Runner at a time. The child is
 * watched with sd_event_add_child; nothing blocks the loop. */
#pragma once

#include <stdbool.h>
#include <systemd/sd-event.h>

#include "config.h"

typedef struct Runner Runner;

/* status: the exit code (>= 0), or -SIGNUM when killed by a signal, or
 * -ETIMEDOUT when killed at the timeout. A child that could not be started
 * (fork or execve failed: -ENOENT, -EACCES, ...) is reported by
 * runner_start's return value instead, and done is not called. */
typedef void (*runner_done_t)(Runner *r, int status, void *userdata);

/* name is used in log lines ("on_change", "update"). */
int runner_new(sd_event *e, const char *name, Runner **ret);
/* Stops a running child for a graceful shutdown: SIGTERM to its process
 * group, then up to 5 s (blocking, polling every 10 ms, its output still
 * logged) for the child to exit, then SIGKILL to whatever is left of the
 * group. The child is always reaped (no zombie) and done is never called.
 * Blocks: call it only when the daemon is stopping. */
Runner *runner_free(Runner *r);

/* Starts argv[0] with argv (searched in PATH only when it has no '/'),
 * the daemon's environment plus env (NULL-terminated "KEY=value" strings,
 * may be NULL; they replace variables of the same name). stdin is
 * /dev/null; stdout and stderr are logged at info as "<name>: <line>".
 * timeout 0 means none. Returns 0 once execve() succeeded; -EBUSY when
 * running; the errno of a failed fork/execve otherwise. Blocks SIGCHLD
 * (runner_new) as sd_event_add_child() requires. */
int runner_start(Runner *r, char *const argv[], char *const env[], usec_t timeout, runner_done_t done,
                 void *userdata);
bool runner_busy(const Runner *r);
