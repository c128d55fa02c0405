/* The single-instance lock next to the state file; see lockfile.h. flock()
 * rather than POSIX record locks: it belongs to the open file description,
 * so nothing else the process does with other fds can drop it. */
#include "lockfile.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/file.h>
#include <unistd.h>

#include "macro.h"

static pid_t read_holder(int fd) {
        char buf[32];
        ssize_t n = pread(fd, buf, sizeof(buf) - 1, 0);
        char *end;
        long pid;

        if (n <= 0)
                return 0;
        buf[n] = 0;
        pid = strtol(buf, &end, 10);
        return pid > 0 && (*end == '\n' || *end == 0) ? (pid_t) pid : 0;
}

int lockfile_acquire(const char *state_path, char *lock_path, size_t size, pid_t *ret_holder) {
        char pid[32];
        int fd, n;

        if (ret_holder)
                *ret_holder = 0;
        if (snprintf(lock_path, size, "%s.lock", state_path) >= (int) size)
                return -ENAMETOOLONG;
        fd = open(lock_path, O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0600);
        if (fd < 0)
                return negative_errno();
        if (flock(fd, LOCK_EX | LOCK_NB) < 0) {
                int r = negative_errno();
                if (r == -EWOULDBLOCK && ret_holder)
                        *ret_holder = read_holder(fd);
                close(fd);
                return r;
        }
        /* Ours now: say who holds it. A failure here costs only the PID in
         * the other instance's message. */
        n = snprintf(pid, sizeof(pid), "%ld\n", (long) getpid());
        if (ftruncate(fd, 0) == 0)
                (void) !pwrite(fd, pid, (size_t) n, 0);
        return fd;
}
