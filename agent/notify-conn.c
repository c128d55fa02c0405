/* The notify listener's connection limits: see notify-conn.h. */
#include <arpa/inet.h>
#include <linux/tcp.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "macro.h"
#include "notify-conn.h"

/* Over TLS the handshake bytes hide whether a request has begun: such a
 * connection counts as idle once nothing has arrived for this long. */
#define NOTIFY_TLS_QUIET_MSEC 1000
/* The server's idle timeout restarts at every byte; this one does not. */
#define NOTIFY_REQUEST_DEADLINE_USEC (10 * USEC_PER_SEC)

bool notify_peer_key(const struct sockaddr *sa, struct in6_addr *ret) {
        if (!sa)
                return false;
        if (sa->sa_family == AF_INET) {
                *ret = (struct in6_addr){};
                ret->s6_addr[10] = ret->s6_addr[11] = 0xff;
                memcpy(&ret->s6_addr[12], &((const struct sockaddr_in *) sa)->sin_addr, 4);
                return true;
        }
        if (sa->sa_family == AF_INET6) {
                *ret = ((const struct sockaddr_in6 *) sa)->sin6_addr;
                return true;
        }
        return false;
}

void notify_peer_string(const struct sockaddr *sa, char *buf, size_t size) {
        const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *) sa;

        buf[0] = 0;
        if (!sa)
                (void) strscpy(buf, size, "?");
        else if (sa->sa_family == AF_INET)
                (void) inet_ntop(AF_INET, &((const struct sockaddr_in *) sa)->sin_addr, buf, size);
        else if (sa->sa_family == AF_INET6 && IN6_IS_ADDR_V4MAPPED(&in6->sin6_addr))
                (void) inet_ntop(AF_INET, &in6->sin6_addr.s6_addr[12], buf, size);
        else if (sa->sa_family == AF_INET6)
                (void) inet_ntop(AF_INET6, &in6->sin6_addr, buf, size);
        else
                (void) strscpy(buf, size, "?");
}

void notify_local_peer_string(int fd, char *buf, size_t size) {
        struct ucred cred = {};
        socklen_t len = sizeof(cred);

        if (fd < 0 || getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) < 0)
                (void) strscpy(buf, size, "local peer");
        else
                (void) snprintf(buf, size, "local uid %u pid %ld", (unsigned) cred.uid, (long) cred.pid);
}

static void conn_unlink(NotifyConns *t, NotifyConn *c) {
        if (c->prev)
                c->prev->next = c->next;
        else
                t->head = c->next;
        if (c->next)
                c->next->prev = c->prev;
        else
                t->tail = c->prev;
        c->prev = c->next = NULL;
}

static void conn_append(NotifyConns *t, NotifyConn *c) {
        c->prev = t->tail;
        c->next = NULL;
        if (t->tail)
                t->tail->next = c;
        else
                t->head = c;
        t->tail = c;
}

/* Shuts the socket down under the server's feet: it sees EOF on its next
 * run and closes the connection through its normal path. Returns false,
 * and counts nothing, when the socket could not be shut down (no fd
 * known): such a connection is left to the server's idle timeout. */
static bool conn_evict(NotifyConns *t, NotifyConn *c) {
        if (c->evicted)
                return true;
        if (c->fd < 0 || shutdown(c->fd, SHUT_RDWR) < 0)
                return false;
        c->evicted = true;
        t->n_evicted++;
        return true;
}

/* What the kernel says about the connection: bytes received so far and
 * milliseconds since the last data came in. */
static bool conn_tcp_info(const NotifyConn *c, uint64_t *ret_bytes, uint32_t *ret_quiet_ms) {
        struct tcp_info ti = {};
        socklen_t len = sizeof(ti);

        if (c->fd < 0 || getsockopt(c->fd, IPPROTO_TCP, TCP_INFO, &ti, &len) < 0 ||
            len < offsetof(struct tcp_info, tcpi_bytes_received) + sizeof(ti.tcpi_bytes_received))
                return false;
        *ret_bytes = ti.tcpi_bytes_received;
        *ret_quiet_ms = ti.tcpi_last_data_recv;
        return true;
}

/* True when the connection sits between requests: no request's headers
 * are in and not one byte of the next request has arrived (over TLS,
 * where handshake bytes count too: nothing has arrived for a while).
 * Only such a connection is evicted to make room for another. */
static bool conn_idle(const NotifyConns *t, const NotifyConn *c) {
        uint64_t bytes;
        uint32_t quiet_ms;

        if (c->busy || c->evicted || !conn_tcp_info(c, &bytes, &quiet_ms))
                return false;
        if (t->tls)
                return quiet_ms >= NOTIFY_TLS_QUIET_MSEC;
        return bytes == c->rx_idle;
}

/* Makes room under the total limit: the oldest idle connection, else the
 * oldest one still sending its headers (the deadline would drop it soon
 * anyway); never one whose request is being handled. */
static bool evict_for_total(NotifyConns *t) {
        for (NotifyConn *c = t->head; c; c = c->next)
                if (conn_idle(t, c) && conn_evict(t, c))
                        return true;
        for (NotifyConn *c = t->head; c; c = c->next)
                if (!c->busy && !c->evicted && conn_evict(t, c))
                        return true;
        return false;
}

/* Makes room under the per-peer limit: true when peer has fewer than
 * NOTIFY_PER_PEER_CONNECTIONS connections, or had its oldest idle one
 * evicted. A peer whose connections are all inside a request is refused. */
static bool evict_for_peer(NotifyConns *t, const struct in6_addr *peer) {
        NotifyConn *idle = NULL;
        unsigned n = 0;

        for (NotifyConn *c = t->head; c; c = c->next) {
                if (c->evicted || memcmp(&c->peer, peer, sizeof(*peer)) != 0)
                        continue;
                n++;
                if (!idle && conn_idle(t, c))
                        idle = c;
        }
        if (n < NOTIFY_PER_PEER_CONNECTIONS)
                return true;
        return idle && conn_evict(t, idle);
}

/* At a limit, the oldest connection that has not sent a request makes
 * room: idle sockets cannot lock out a peer with something to say. */
const char *notify_conns_admit(NotifyConns *t, const struct in6_addr *peer) {
        if (!evict_for_peer(t, peer))
                return "per-peer connection limit reached";
        if (t->n_conns - t->n_evicted >= NOTIFY_MAX_CONNECTIONS && !evict_for_total(t))
                return "connection limit reached";
        return NULL;
}

NotifyConn *notify_conns_add(NotifyConns *t, int fd, const struct sockaddr *peer, uint64_t now) {
        NotifyConn *c = calloc(1, sizeof(*c));

        if (!c)
                return NULL;
        c->fd = fd;
        if (!notify_peer_key(peer, &c->peer))
                c->peer = in6addr_any;
        /* Whatever arrived before the server got to this notification is
         * the start of a request already: 0 bytes marks idle. */
        c->since_usec = now;
        c->rx_idle = 0;
        conn_append(t, c);
        t->n_conns++;
        return c;
}

void notify_conns_remove(NotifyConns *t, NotifyConn *c) {
        conn_unlink(t, c);
        t->n_conns--;
        if (c->evicted)
                t->n_evicted--;
        free(c);
}

void notify_conn_busy(NotifyConn *c) {
        c->busy = true;
}

void notify_conns_request_done(NotifyConns *t, NotifyConn *c, uint64_t now) {
        uint32_t quiet_ms;

        if (c->evicted)
                return;
        c->busy = false;
        c->since_usec = now;
        if (!conn_tcp_info(c, &c->rx_idle, &quiet_ms))
                c->rx_idle = UINT64_MAX;
        conn_unlink(t, c);
        conn_append(t, c);
}

uint64_t notify_conns_sweep(NotifyConns *t, uint64_t now) {
        uint64_t next = USEC_INFINITY;

        for (NotifyConn *c = t->head; c; c = c->next) {
                uint64_t deadline = c->since_usec + NOTIFY_REQUEST_DEADLINE_USEC;

                if (c->evicted)
                        continue;
                if (deadline <= now) {
                        /* Not evictable (no fd): left to the server's idle
                         * timeout, and no timer for it, or the timer would
                         * spin. */
                        (void) conn_evict(t, c);
                } else if (deadline < next)
                        next = deadline;
        }
        return next;
}
