/* The poller: one poll round asks every target node concurrently over the
 * libcurl multi interface on the sd-event loop (agent/curl-glue.c). Owns
 * the targets, and per target the ETag, the last good answer, the last
 * error and when it was seen; the manager reads a round as plain data. */
#pragma once

#include <stdbool.h>
#include <systemd/sd-event.h>

#include "config.h"
#include "provider.h"

#define POLL_ERROR_MAX     256
#define POLLER_MAX_TARGETS (CONFIG_MAX_ENDPOINTS + 1 + 2 * PROVIDER_NODES_MAX)

typedef enum PollOutcome {
        POLL_PENDING, /* being asked, or not asked yet */
        POLL_OK,
        POLL_NOT_MODIFIED, /* 304: the kept state still holds */
        POLL_ERROR,
} PollOutcome;

/* One target in the latest round: plain data. */
typedef struct PollAnswer {
        char url[PROVIDER_URL_MAX + 1]; /* API base URL */
        bool via_load_balancer;
        bool configured;     /* from [provider] endpoints or load_balancer */
        PollOutcome outcome; /* of the latest round; PENDING while it is asked */
        bool ok;             /* OK or NOT_MODIFIED: state is valid and fresh */
        ProviderState state; /* last good answer (kept for 304s) */
        bool have_state;
        char error[POLL_ERROR_MAX]; /* "" when ok */
        uint64_t last_seen_usec;    /* CLOCK_REALTIME of the last good answer, 0 never */
} PollAnswer;

typedef struct PollRound {
        const PollAnswer *answers; /* one per target, in target order */
        size_t n_answers;
        size_t n_pending; /* not answered yet (0 once the round is complete or aborted) */
        bool in_flight;
} PollRound;

typedef struct Poller Poller;

typedef struct PollerCallbacks {
        /* One target of the round in flight finished (ok, 304 or error); the
         * round may still be in flight. May be NULL. */
        void (*answer)(Poller *p, size_t index, void *userdata);
        /* Every target answered, failed or timed out. */
        void (*done)(Poller *p, void *userdata);
} PollerCallbacks;

int poller_new(sd_event *e, const Config *cfg, Poller **ret);
Poller *poller_free(Poller *p);
int poller_reconfigure(Poller *p, const Config *cfg);

/* Replaces the target set: the configured endpoints and load balancer plus
 * `extra` discovered node URLs (they may point into the current round's
 * answers; they are not used after this returns). Targets keep their ETag
 * and last answer when they stay. Returns how many of extra were not
 * targets before and are now (under the cap), or a negative errno. Must
 * not be called while a round is in flight (-EBUSY). */
int poller_set_targets(Poller *p, const char *const *extra, size_t n_extra);

/* Starts a round over every target. The callbacks (copied) are called from
 * the loop: answer as each target ends, done once all targets answered,
 * failed or timed out. -EBUSY while in flight. */
int poller_start_round(Poller *p, const PollerCallbacks *cb, void *userdata);
bool poller_in_flight(const Poller *p);
/* Aborts a round in flight without calling done (shutdown, reload, the
 * manager's deadline); the targets not answered stay POLL_PENDING. */
void poller_abort(Poller *p);

size_t poller_n_targets(const Poller *p);
/* The latest round (in flight or finished) as plain data; valid until the
 * next poller call that changes targets or starts a round. */
void poller_get_round(const Poller *p, PollRound *ret);
