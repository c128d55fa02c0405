/* The notify listener (contract section 6) on libmicrohttpd, driven by the
 * sd-event loop through MHD's epoll fd and a timer. Owns the listening
 * socket (or the one passed by systemd socket activation), the per-peer
 * and total connection limits (notify-conn.h), the token buckets, the
 * request and body limits, and rate-limited logging of rejections. What a
 * request gets is decided by the pure logic in notify-request.h. It never
 * commits anything: a valid notify only asks the manager for a poll
 * round. */
#pragma once

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <systemd/sd-event.h>

#include "config.h"
#include "metrics.h"
#include "notify-request.h"

typedef struct NotifyServer NotifyServer;

typedef struct NotifyCallbacks {
        /* A valid, authenticated notify (or the endpoints PATCH). */
        void (*notify)(NotifyServer *s, const char *peer, const char *summary, void *userdata);
        /* Builds the status document (a new reference). */
        json_t *(*status)(NotifyServer *s, void *userdata);
        /* Renders GET /metrics (metrics.h): a malloc'd string, NULL when
         * it cannot. */
        char *(*metrics)(NotifyServer *s, void *userdata);
} NotifyCallbacks;

/* Listens as configured ([notify] listen; or the socket passed by systemd
 * when sd_listen_fds() gives one). Returns 0 with *ret NULL when the
 * listener is off. The old server must be freed before a new one binds the
 * same address (a restart after notify_server_needs_restart()). */
int notify_server_new(sd_event *e, const Config *cfg, const NotifyCallbacks *cb, void *userdata,
                      NotifyServer **ret);
/* Serves the same routes on fd, a listening AF_UNIX socket the caller
 * made (control.h), taking it over (closed on failure too). Its peers are
 * trusted: no token and no allow list; the body cap, the connection
 * limits (all local peers count as one), the timeouts and the request
 * rate limits apply, with buckets of its own. */
int notify_server_new_local(sd_event *e, int fd, const NotifyCallbacks *cb, void *userdata,
                            NotifyServer **ret);
NotifyServer *notify_server_free(NotifyServer *s);

/* True when the listener must be reopened for the new config: listen
 * address, on/off, TLS files (always when TLS is on, so that a SIGHUP picks
 * up a renewed certificate). */
bool notify_server_needs_restart(const Config *old_cfg, const Config *new_cfg);
/* Token and allow list: they do not need a new socket. */
int notify_server_reconfigure(NotifyServer *s, const Config *cfg);

/* The requests refused so far by every listener of the process (the
 * control socket's too), by reason, for GET /metrics. */
void notify_rejected_totals(uint64_t ret[METRICS_REJECT_N]);

/* Test seam, defined only by tests/tools/notify_drive (a weak symbol, NULL
 * in the daemon): maps the fd MHD reports for a new connection, so that a
 * test can make it unknown (-1). */
int notify_test_connection_fd(int fd) __attribute__((weak));
