/* libcurl's multi interface driven by sd-event (after systemd's
 * src/shared/curl-util.c).
 *
 * curl tells us which sockets to watch (CURLMOPT_SOCKETFUNCTION: each one
 * becomes an I/O source, kept as curl's socketp) and when to call it back
 * (CURLMOPT_TIMERFUNCTION: one time source). Whenever curl has acted on a
 * socket or on its timer, the transfers it finished are drained and their
 * callbacks run. Each added transfer carries a small record (its callback
 * and userdata) in CURLOPT_PRIVATE; the records are also on a list, so
 * curl_glue_free can stop whatever is still running. */
#include "curl-glue.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <time.h>

#include "log.h"
#include "macro.h"

typedef struct Transfer {
        struct Transfer *prev, *next;
        CURL *easy;
        curl_glue_done_t done;
        void *userdata;
} Transfer;

struct CurlGlue {
        sd_event *event;
        CURLM *multi;
        sd_event_source *timer;
        sd_event_source **ios; /* one per socket curl watches: freed with the glue */
        size_t n_ios;
        Transfer *transfers;
        char name[32];
};

static void io_forget(CurlGlue *g, sd_event_source *io) {
        for (size_t i = 0; i < g->n_ios; i++)
                if (g->ios[i] == io) {
                        g->ios[i] = g->ios[--g->n_ios];
                        break;
                }
        sd_event_source_disable_unref(io);
}

/* ---- finished transfers ---- */

static Transfer *transfer_of(CURL *easy) {
        Transfer *t = NULL;

        (void) curl_easy_getinfo(easy, CURLINFO_PRIVATE, (char **) &t);
        return t;
}

/* Takes easy out of the multi handle and unlinks t, its record (NULL:
 * none), for the caller to free. */
static Transfer *transfer_detach(CurlGlue *g, CURL *easy, Transfer *t) {
        (void) curl_multi_remove_handle(g->multi, easy);
        if (!t)
                return NULL;
        (void) curl_easy_setopt(easy, CURLOPT_PRIVATE, NULL);
        if (t->prev)
                t->prev->next = t->next;
        else
                g->transfers = t->next;
        if (t->next)
                t->next->prev = t->prev;
        return t;
}

/* A callback may add and remove transfers: curl drops the messages of a
 * removed handle from its queue, and each message is read whole before its
 * callback runs, so the loop only ever sees live handles. */
static void drain_finished(CurlGlue *g) {
        CURLMsg *msg;
        int left;

        while ((msg = curl_multi_info_read(g->multi, &left))) {
                if (msg->msg != CURLMSG_DONE)
                        continue;
                CURL *easy = msg->easy_handle;
                CURLcode result = msg->data.result;
                Transfer *t = transfer_detach(g, easy, transfer_of(easy));

                if (!t)
                        continue;
                curl_glue_done_t done = t->done;
                void *userdata = t->userdata;
                free(t);
                done(easy, result, userdata);
        }
}

/* ---- curl's sockets and timer ---- */

static int on_io(sd_event_source *s, int fd, uint32_t revents, void *userdata) {
        CurlGlue *g = userdata;
        int action = 0, running;

        /* A hang-up or an error is passed on as "readable", as curl's own
         * poll loop does (Curl_socket_check): curl's next read then returns
         * the end of the stream or the socket's error, so the bytes sent
         * before a hang-up are kept and a failure names its real cause. A
         * bare CURL_CSELECT_ERR would end the transfer with "select/poll
         * returned error" without reading. EPOLLERR adds CURL_CSELECT_ERR
         * for a socket curl only writes to (a connect in progress). */
        if (revents & (EPOLLIN | EPOLLHUP | EPOLLERR))
                action |= CURL_CSELECT_IN;
        if (revents & EPOLLOUT)
                action |= CURL_CSELECT_OUT;
        if (revents & EPOLLERR)
                action |= CURL_CSELECT_ERR;
        (void) curl_multi_socket_action(g->multi, fd, action, &running);
        drain_finished(g);
        return 0;
}

static int on_timer(sd_event_source *s, uint64_t usec, void *userdata) {
        CurlGlue *g = userdata;
        int running;

        (void) curl_multi_socket_action(g->multi, CURL_SOCKET_TIMEOUT, 0, &running);
        drain_finished(g);
        return 0;
}

static int io_add(CurlGlue *g, curl_socket_t fd, uint32_t events) {
        char desc[sizeof(g->name) + sizeof("-curl-io")];
        sd_event_source **ios, *io = NULL;
        int r;

        ios = reallocarray(g->ios, g->n_ios + 1, sizeof(*ios));
        if (!ios)
                return -ENOMEM;
        g->ios = ios;
        r = sd_event_add_io(g->event, &io, fd, events, on_io, g);
        if (r < 0)
                return r;
        g->ios[g->n_ios++] = io;
        snprintf(desc, sizeof(desc), "%s-curl-io", g->name);
        (void) sd_event_source_set_description(io, desc);
        return curl_multi_assign(g->multi, fd, io) == CURLM_OK ? 0 : -ENOMEM;
}

/* CURLMOPT_SOCKETFUNCTION: curl says which events it wants on fd. */
static int on_curl_socket(CURL *easy, curl_socket_t fd, int what, void *userdata, void *socketp) {
        CurlGlue *g = userdata;
        sd_event_source *io = socketp;
        uint32_t events = 0;
        int r;

        if (what == CURL_POLL_REMOVE) {
                /* curl forgets the socket (and its socketp) itself. */
                if (io)
                        io_forget(g, io);
                return 0;
        }
        if (what & CURL_POLL_IN)
                events |= EPOLLIN;
        if (what & CURL_POLL_OUT)
                events |= EPOLLOUT;

        if (io)
                r = sd_event_source_set_io_events(io, events);
        else
                r = io_add(g, fd, events);
        if (r < 0) {
                log_warning_errno(r, "Cannot watch a connection of the %s", g->name);
                return -1;
        }
        return 0;
}

/* CURLMOPT_TIMERFUNCTION: curl wants to be called after timeout_ms (-1:
 * not at all). */
static int on_curl_timer(CURLM *multi, long timeout_ms, void *userdata) {
        CurlGlue *g = userdata;
        uint64_t when;
        int r;

        if (timeout_ms < 0)
                return sd_event_source_set_enabled(g->timer, SD_EVENT_OFF) < 0 ? -1 : 0;

        /* 0 means "as soon as possible"; curl must not be re-entered from
         * here, so the loop's next iteration does it. A time already past
         * (1 us after boot) makes that iteration poll without sleeping;
         * "now" plus the timer's accuracy would cost an extra wakeup a
         * millisecond later at the start of every round. */
        when = timeout_ms == 0 ? 1 : now_usec(CLOCK_MONOTONIC) + (uint64_t) timeout_ms * USEC_PER_MSEC;
        r = sd_event_source_set_time(g->timer, when);
        if (r >= 0)
                r = sd_event_source_set_enabled(g->timer, SD_EVENT_ONESHOT);
        return r < 0 ? -1 : 0;
}

/* ---- public ---- */

int curl_glue_new(sd_event *e, const char *name, CurlGlue **ret) {
        char desc[sizeof(((CurlGlue *) NULL)->name) + sizeof("-curl-timer")];
        CurlGlue *g;
        int r;

        g = calloc(1, sizeof(*g));
        if (!g)
                return -ENOMEM;
        g->event = sd_event_ref(e);
        (void) strscpy(g->name, sizeof(g->name), name);
        r = sd_event_add_time(e, &g->timer, CLOCK_MONOTONIC, USEC_INFINITY, USEC_PER_MSEC, on_timer, g);
        if (r < 0) {
                curl_glue_free(g);
                return r;
        }
        (void) sd_event_source_set_enabled(g->timer, SD_EVENT_OFF);
        snprintf(desc, sizeof(desc), "%s-curl-timer", g->name);
        (void) sd_event_source_set_description(g->timer, desc);

        g->multi = curl_multi_init();
        if (!g->multi || curl_multi_setopt(g->multi, CURLMOPT_SOCKETFUNCTION, on_curl_socket) != CURLM_OK ||
            curl_multi_setopt(g->multi, CURLMOPT_SOCKETDATA, g) != CURLM_OK ||
            curl_multi_setopt(g->multi, CURLMOPT_TIMERFUNCTION, on_curl_timer) != CURLM_OK ||
            curl_multi_setopt(g->multi, CURLMOPT_TIMERDATA, g) != CURLM_OK) {
                curl_glue_free(g);
                return -ENOMEM;
        }
        *ret = g;
        return 0;
}

CurlGlue *curl_glue_free(CurlGlue *g) {
        if (!g)
                return NULL;
        while (g->transfers)
                free(transfer_detach(g, g->transfers->easy, g->transfers));
        /* curl may still call back (sockets removed, timer off) while it
         * closes its connections: the sources go after it. */
        if (g->multi)
                curl_multi_cleanup(g->multi);
        for (size_t i = 0; i < g->n_ios; i++)
                sd_event_source_disable_unref(g->ios[i]);
        free(g->ios);
        sd_event_source_disable_unref(g->timer);
        sd_event_unref(g->event);
        free(g);
        return NULL;
}

CURLM *curl_glue_multi(CurlGlue *g) {
        return g->multi;
}

int curl_glue_add(CurlGlue *g, CURL *easy, curl_glue_done_t done, void *userdata) {
        Transfer *t, *old = transfer_of(easy);
        CURLMcode m;

        t = calloc(1, sizeof(*t));
        if (!t)
                return -ENOMEM;
        *t = (Transfer){.next = g->transfers, .easy = easy, .done = done, .userdata = userdata};
        if (curl_easy_setopt(easy, CURLOPT_PRIVATE, t) != CURLE_OK) {
                free(t);
                return -ENOMEM;
        }
        m = curl_multi_add_handle(g->multi, easy);
        if (m != CURLM_OK) {
                /* Added already: its record stays. */
                (void) curl_easy_setopt(easy, CURLOPT_PRIVATE, old);
                free(t);
                return m == CURLM_OUT_OF_MEMORY ? -ENOMEM : -EINVAL;
        }
        if (g->transfers)
                g->transfers->prev = t;
        g->transfers = t;
        return 0;
}

void curl_glue_remove(CurlGlue *g, CURL *easy) {
        if (g && easy)
                free(transfer_detach(g, easy, transfer_of(easy)));
}
