/* The local control socket: see control.h. This file owns the socket
 * file; the HTTP side is the notify listener's (notify.c), run with
 * trusted peers. */
#include <errno.h>
#include <stddef.h>
#include <stdio.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>

#include "control.h"
#include "log.h"
#include "macro.h"

#define CONTROL_SOCKET_MODE    0660
#define CONTROL_LISTEN_BACKLOG 16

struct ControlServer {
        NotifyServer *http;
        char *path;
        /* The file we bound, to remove it only while it is ours. */
        bool bound;
        dev_t dev;
        ino_t ino;
        struct timespec ctime; /* an inode number may be reused, its ctime hardly */
};

static int sockaddr_for(const char *path, struct sockaddr_un *ret, socklen_t *ret_len) {
        *ret = (struct sockaddr_un){.sun_family = AF_UNIX};
        if (strscpy(ret->sun_path, sizeof(ret->sun_path), path) < 0)
                return -ENAMETOOLONG;
        *ret_len = (socklen_t) (offsetof(struct sockaddr_un, sun_path) + strlen(path) + 1);
        return 0;
}

static bool still_ours(const ControlServer *s) {
        struct stat st;

        return s->bound && lstat(s->path, &st) == 0 && st.st_dev == s->dev && st.st_ino == s->ino &&
               st.st_ctim.tv_sec == s->ctime.tv_sec && st.st_ctim.tv_nsec == s->ctime.tv_nsec;
}

/* Removes what a crashed daemon left at the path: a socket nobody listens
 * on. Anything else stays: a live daemon's socket (-EADDRINUSE), a file
 * that is not a socket (-EEXIST). */
static int remove_stale(const char *path, const struct sockaddr_un *sa, socklen_t len) {
        _cleanup_(closep) int fd = -1;
        struct stat st;

        if (lstat(path, &st) < 0)
                return errno == ENOENT ? 0 : negative_errno();
        if (!S_ISSOCK(st.st_mode))
                return -EEXIST;
        fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
        if (fd < 0)
                return negative_errno();
        /* EAGAIN: a listener with a full backlog is a live one too. */
        if (connect(fd, (const struct sockaddr *) sa, len) == 0 || errno == EAGAIN)
                return -EADDRINUSE;
        if (errno != ECONNREFUSED)
                return negative_errno();
        if (unlink(path) < 0 && errno != ENOENT)
                return negative_errno();
        log_info("control: removed the stale socket %s (its daemon did not stop cleanly)", path);
        return 0;
}

/* Binds and listens; the mode is set before listen(), so nobody connects
 * while the file has what the umask gave it. */
static int control_listen(ControlServer *s, int *ret) {
        _cleanup_(closep) int fd = -1;
        struct sockaddr_un sa;
        struct stat st;
        socklen_t len;
        int r;

        r = sockaddr_for(s->path, &sa, &len);
        if (r < 0)
                return log_error_errno(r, "control: socket path %s is too long", s->path);
        r = remove_stale(s->path, &sa, len);
        if (r == -EADDRINUSE)
                return log_error_errno(r, "control: %s is in use: another daemon listens on it", s->path);
        if (r == -EEXIST)
                return log_error_errno(r, "control: %s exists and is not a socket; not removing it",
                                       s->path);
        if (r < 0)
                return log_error_errno(r, "control: cannot check the old socket %s", s->path);

        fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
        if (fd < 0)
                return log_error_errno(negative_errno(), "control: cannot create a socket");
        if (bind(fd, (const struct sockaddr *) &sa, len) < 0)
                return log_error_errno(negative_errno(), "control: cannot bind %s", s->path);
        if (chmod(s->path, CONTROL_SOCKET_MODE) < 0 || lstat(s->path, &st) < 0) {
                r = negative_errno();
                (void) unlink(s->path);
                return log_error_errno(r, "control: cannot set the mode of %s", s->path);
        }
        s->bound = true;
        s->dev = st.st_dev;
        s->ino = st.st_ino;
        s->ctime = st.st_ctim;
        if (listen(fd, CONTROL_LISTEN_BACKLOG) < 0)
                return log_error_errno(negative_errno(), "control: cannot listen on %s", s->path);
        log_info("control: listening on %s (mode %04o, owner %u, group %u)", s->path,
                 (unsigned) CONTROL_SOCKET_MODE, (unsigned) st.st_uid, (unsigned) st.st_gid);
        *ret = fd;
        fd = -1;
        return 0;
}

int control_server_new(sd_event *e, const Config *cfg, const NotifyCallbacks *cb, void *userdata,
                       ControlServer **ret) {
        ControlServer *s;
        int fd = -1, r;

        if (!cfg->control_socket) {
                *ret = NULL;
                return 0;
        }
        s = calloc(1, sizeof(*s));
        if (!s || !(s->path = strdup(cfg->control_socket))) {
                free(s);
                return log_error_errno(-ENOMEM, "control: out of memory");
        }
        r = control_listen(s, &fd);
        if (r >= 0)
                r = notify_server_new_local(e, fd, cb, userdata, &s->http);
        if (r < 0) {
                control_server_free(s);
                return r;
        }
        *ret = s;
        return 0;
}

ControlServer *control_server_free(ControlServer *s) {
        if (!s)
                return NULL;
        s->http = notify_server_free(s->http);
        if (still_ours(s) && unlink(s->path) < 0)
                log_warning_errno(negative_errno(), "control: cannot remove %s", s->path);
        free(s->path);
        free(s);
        return NULL;
}

bool control_server_needs_restart(const ControlServer *s, const Config *old_cfg, const Config *new_cfg) {
        if (!streq_ptr(old_cfg->control_socket, new_cfg->control_socket))
                return true;
        return s && !still_ours(s);
}
