/* The notify listener's connections and their limits: a total and a
 * per-peer limit, both evicting the oldest idle connection (one between
 * requests) before refusing, so that idle sockets cannot lock a peer or
 * everyone out; and a whole-request deadline against slow clients. The
 * listener tells it when a connection starts, begins a request, ends one
 * and closes; it passes the loop's time in (CLOCK_MONOTONIC usec). An
 * evicted connection is shut down under the HTTP server's feet, which
 * sees EOF and closes it through its normal path. */
#pragma once

#include <netinet/in.h>
#include <stdbool.h>
#include <stdint.h>
#include <sys/socket.h>

#define NOTIFY_MAX_CONNECTIONS      64
#define NOTIFY_PER_PEER_CONNECTIONS 8

/* One TCP connection, from the server's "started" to its "closed". */
typedef struct NotifyConn {
        struct NotifyConn *prev, *next; /* oldest first */
        int fd;                         /* -1 when the server did not say: never evicted by us */
        struct in6_addr peer;           /* IPv4 as v4-mapped */
        bool busy;                      /* a request's headers are in; not evictable */
        bool evicted;                   /* shut down by us, the server closes it on its next run */
        uint64_t since_usec;            /* accept, or end of the last request */
        uint64_t rx_idle;               /* bytes received when it last became idle */
} NotifyConn;

typedef struct NotifyConns {
        NotifyConn *head, *tail;
        unsigned n_conns, n_evicted;
        /* Over TLS the handshake bytes hide whether a request has begun. */
        bool tls;
} NotifyConns;

/* A peer for a log line: the address of sa ("?" when none), IPv4 also
 * when v4-mapped. */
void notify_peer_string(const struct sockaddr *sa, char *buf, size_t size);
/* A control socket peer as the kernel vouches for it (SO_PEERCRED):
 * "local uid U pid P". */
void notify_local_peer_string(int fd, char *buf, size_t size);

/* The address of sa as IPv6, IPv4 v4-mapped; false for other families. */
bool notify_peer_key(const struct sockaddr *sa, struct in6_addr *ret);

/* Makes room for a new connection from peer: NULL when it may come in
 * (after evicting the oldest idle connection at a limit), else why not. */
const char *notify_conns_admit(NotifyConns *t, const struct in6_addr *peer);

/* Tracks a connection the server started; NULL when out of memory (it is
 * then bounded by the server's own limit only). */
NotifyConn *notify_conns_add(NotifyConns *t, int fd, const struct sockaddr *peer, uint64_t now);
/* Forgets a connection the server closed, and frees it. */
void notify_conns_remove(NotifyConns *t, NotifyConn *c);

/* A request's headers are in: not evictable until it ends. */
void notify_conn_busy(NotifyConn *c);
/* The request ended (keep-alive): idle again, and its deadline restarts. */
void notify_conns_request_done(NotifyConns *t, NotifyConn *c, uint64_t now);

/* Drops connections whose request has been going on for too long, and
 * returns the earliest deadline still pending (USEC_INFINITY: none). */
uint64_t notify_conns_sweep(NotifyConns *t, uint64_t now);
