/* One daemon per state file (contract section 2): an exclusive lock on
 * "<state_file>.lock", held for the whole life of the process (the daemon
 * and --once alike), with the holder's PID written into it so that a
 * second instance can say who holds it. The kernel drops the lock when the
 * process dies, so a crash never leaves a stale lock behind. */
#pragma once

#include <stddef.h>
#include <sys/types.h>

/* Takes the lock for state_path. Returns the lock's fd (>= 0; close it to
 * release), -EWOULDBLOCK when another process holds it (its PID in
 * *ret_holder when it could be read, else 0), or another negative errno.
 * The lock's path is written into lock_path. Never waits. */
int lockfile_acquire(const char *state_path, char *lock_path, size_t size, pid_t *ret_holder);
