/* The poller: one poll round asks every target node concurrently over the
 * libcurl multi interface driven by the sd-event loop (curl's sockets are
 * I/O sources, its timer a time source). Owns the targets, and per target
 * the ETag, the last good answer, the last error and when it was seen. */
#pragma once

#include <stdbool.h>
#include <systemd/sd-event.h>

#include "config.h"
#include "provider.h"

#define POLL_ERROR_MAX 256

typedef struct PollTarget {
        char url[PROVIDER_URL_MAX + 1]; /* API base URL */
        bool via_load_balancer;
        bool configured; /* from [provider] endpoints or load_balancer */

        /* Result of the latest round that asked this target. */
        bool ok;             /* state is valid and fresh */
        ProviderState state; /* last good answer (kept for 304s) */
        bool have_state;
        char etag[256];                      /* of the last good 200: sent as If-None-Match */
        char error[POLL_ERROR_MAX];          /* "" when ok */
        uint64_t last_seen_usec;             /* CLOCK_REALTIME of the last good answer, 0 never */
        char reported_error[POLL_ERROR_MAX]; /* owned by the manager: last error it logged */

        /* private to the poller */
        void *easy;             /* CURL *, reused across rounds */
        void *headers;          /* struct curl_slist * of the request in flight */
        char pending_etag[256]; /* ETag of the answer in flight, adopted only if its body is good */
        char *body;
        size_t body_len;
        bool in_flight;
} PollTarget;

typedef struct Poller Poller;
typedef void (*poller_done_t)(Poller *p, void *userdata);

int poller_new(sd_event *e, const Config *cfg, Poller **ret);
Poller *poller_free(Poller *p);
int poller_reconfigure(Poller *p, const Config *cfg);

/* Replaces the target set: the configured endpoints and load balancer plus
 * `extra` discovered node URLs. Targets keep their ETag and last answer when
 * they stay. Must not be called while a round is in flight. */
int poller_set_targets(Poller *p, const char *const *extra, size_t n_extra);

/* Starts a round over every target. done is called (from the loop) once
 * all targets answered, failed or timed out. -EBUSY while in flight. */
int poller_start_round(Poller *p, poller_done_t done, void *userdata);
bool poller_in_flight(const Poller *p);
/* Aborts a round in flight without calling done (shutdown). */
void poller_abort(Poller *p);

size_t poller_n_targets(const Poller *p);
PollTarget *poller_target(Poller *p, size_t i);
PollTarget *poller_find(Poller *p, const char *url);
