/* The poller: one round asks every target at once over the libcurl multi
 * interface, driven by the sd-event loop.
 *
 * curl tells us which sockets to watch (CURLMOPT_SOCKETFUNCTION: each one
 * becomes an sd-event I/O source) and when to call it back
 * (CURLMOPT_TIMERFUNCTION: one relative timer). Finished transfers are
 * drained after every socket action; when the last target of a round is
 * done, the round's callback runs from the loop. Each target keeps its
 * ETag and its last good answer, so a 304 costs no parsing. */
#include "poller.h"

#include <curl/curl.h>
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "log.h"
#include "macro.h"

#define STATE_PATH  "/api/v1/ha/state"
#define MAX_TARGETS (CONFIG_MAX_ENDPOINTS + 1 + 2 * PROVIDER_NODES_MAX)

struct Poller {
        sd_event *event;
        const Config *config;
        CURLM *multi;
        sd_event_source *timer;

        PollTarget *targets[MAX_TARGETS];
        size_t n_targets;

        size_t in_flight;
        bool round_active;
        poller_done_t done;
        void *userdata;
};

static void target_set_error(PollTarget *t, const char *fmt, ...) _printf_(2, 3);
static void target_set_error(PollTarget *t, const char *fmt, ...) {
        va_list ap;

        va_start(ap, fmt);
        vsnprintf(t->error, sizeof(t->error), fmt, ap);
        va_end(ap);
        t->ok = false;
}

static PollTarget *target_free(PollTarget *t) {
        if (!t)
                return NULL;
        if (t->easy)
                curl_easy_cleanup(t->easy);
        free(t->body);
        free(t);
        return NULL;
}

/* ---- curl callbacks ---- */

static size_t on_body(char *data, size_t size, size_t nmemb, void *userdata) {
        PollTarget *t = userdata;
        size_t n = size * nmemb;
        char *p;

        /* Returning less than n makes curl fail the transfer: that is how
         * the 1 MiB limit is enforced without reading the rest. */
        if (t->body_len + n > PROVIDER_BODY_MAX) {
                target_set_error(t, "body over %d bytes", PROVIDER_BODY_MAX);
                return 0;
        }
        p = realloc(t->body, t->body_len + n + 1);
        if (!p)
                return 0;
        memcpy(p + t->body_len, data, n);
        t->body = p;
        t->body_len += n;
        t->body[t->body_len] = 0;
        return n;
}

static size_t on_header(char *data, size_t size, size_t nmemb, void *userdata) {
        PollTarget *t = userdata;
        size_t n = size * nmemb, len;
        const char *v;

        if (n < 5 || strncasecmp(data, "etag:", 5) != 0)
                return n;
        v = data + 5;
        len = n - 5;
        while (len > 0 && (*v == ' ' || *v == '\t'))
                v++, len--;
        while (len > 0 && (v[len - 1] == '\r' || v[len - 1] == '\n' || v[len - 1] == ' '))
                len--;
        /* An ETag we cannot store whole is not used at all. It is only a
         * candidate until the body behind it has been read and accepted. */
        if (len > 0 && len < sizeof(t->pending_etag) && !memchr(v, '\n', len)) {
                memcpy(t->pending_etag, v, len);
                t->pending_etag[len] = 0;
        }
        return n;
}

static int on_io(sd_event_source *s, int fd, uint32_t revents, void *userdata);
static void drain_finished(Poller *p);

static int on_curl_socket(CURL *easy, curl_socket_t fd, int what, void *userdata, void *socketp) {
        Poller *p = userdata;
        sd_event_source *io = socketp;
        uint32_t events = 0;
        int r;

        if (what == CURL_POLL_REMOVE) {
                if (io) {
                        sd_event_source_disable_unref(io);
                        curl_multi_assign(p->multi, fd, NULL);
                }
                return 0;
        }
        if (what == CURL_POLL_IN || what == CURL_POLL_INOUT)
                events |= EPOLLIN;
        if (what == CURL_POLL_OUT || what == CURL_POLL_INOUT)
                events |= EPOLLOUT;

        if (io) {
                r = sd_event_source_set_io_events(io, events);
                if (r < 0)
                        return -1;
                return sd_event_source_set_enabled(io, SD_EVENT_ON) < 0 ? -1 : 0;
        }
        r = sd_event_add_io(p->event, &io, fd, events, on_io, p);
        if (r < 0) {
                log_warning_errno(r, "Cannot watch a Provider connection");
                return -1;
        }
        (void) sd_event_source_set_description(io, "poller-io");
        curl_multi_assign(p->multi, fd, io);
        return 0;
}

static int on_io(sd_event_source *s, int fd, uint32_t revents, void *userdata) {
        Poller *p = userdata;
        int action = 0, running;

        if (revents & (EPOLLIN | EPOLLHUP | EPOLLERR))
                action |= CURL_CSELECT_IN;
        if (revents & EPOLLOUT)
                action |= CURL_CSELECT_OUT;
        if (revents & EPOLLERR)
                action |= CURL_CSELECT_ERR;
        (void) curl_multi_socket_action(p->multi, fd, action, &running);
        drain_finished(p);
        return 0;
}

static int on_timer(sd_event_source *s, uint64_t usec, void *userdata) {
        Poller *p = userdata;
        int running;

        (void) curl_multi_socket_action(p->multi, CURL_SOCKET_TIMEOUT, 0, &running);
        drain_finished(p);
        return 0;
}

static int on_curl_timer(CURLM *multi, long timeout_ms, void *userdata) {
        Poller *p = userdata;
        uint64_t when;
        int r;

        if (timeout_ms < 0)
                return sd_event_source_set_enabled(p->timer, SD_EVENT_OFF) < 0 ? -1 : 0;

        /* 0 means "as soon as possible"; curl must not be re-entered from
         * here, so the loop's next iteration does it. */
        when = now_usec(CLOCK_MONOTONIC) + (uint64_t) timeout_ms * USEC_PER_MSEC;
        r = sd_event_source_set_time(p->timer, when);
        if (r >= 0)
                r = sd_event_source_set_enabled(p->timer, SD_EVENT_ONESHOT);
        return r < 0 ? -1 : 0;
}

/* ---- one target ---- */

static int target_prepare(Poller *p, PollTarget *t) {
        char url[PROVIDER_URL_MAX + sizeof(STATE_PATH)];
        const Config *c = p->config;

        if (!t->easy) {
                t->easy = curl_easy_init();
                if (!t->easy)
                        return -ENOMEM;
        }
        CURL *e = t->easy;
        /* Options from an earlier config (a removed ca_file) must not linger;
         * the connection cache lives in the multi handle and survives. */
        curl_easy_reset(e);
        snprintf(url, sizeof(url), "%s%s", t->url, STATE_PATH);
        curl_easy_setopt(e, CURLOPT_URL, url);
        curl_easy_setopt(e, CURLOPT_PRIVATE, t);
        curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, on_body);
        curl_easy_setopt(e, CURLOPT_WRITEDATA, t);
        curl_easy_setopt(e, CURLOPT_HEADERFUNCTION, on_header);
        curl_easy_setopt(e, CURLOPT_HEADERDATA, t);
        curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
        curl_easy_setopt(e, CURLOPT_TIMEOUT_MS, (long) (c->request_timeout / USEC_PER_MSEC));
        curl_easy_setopt(e, CURLOPT_CONNECTTIMEOUT_MS, (long) (c->request_timeout / USEC_PER_MSEC));
        curl_easy_setopt(e, CURLOPT_PROTOCOLS_STR, "http,https");
        curl_easy_setopt(e, CURLOPT_FOLLOWLOCATION, 0L);
        curl_easy_setopt(e, CURLOPT_USERAGENT, "dsm-agent-syncd");
        curl_easy_setopt(e, CURLOPT_TCP_NODELAY, 1L);
        curl_easy_setopt(e, CURLOPT_SSL_VERIFYPEER, 1L);
        curl_easy_setopt(e, CURLOPT_SSL_VERIFYHOST, 2L);
        if (c->provider_ca_file) /* else curl's default: the system store */
                curl_easy_setopt(e, CURLOPT_CAINFO, c->provider_ca_file);
        return 0;
}

static struct curl_slist *target_headers(const Poller *p, const PollTarget *t) {
        struct curl_slist *h = NULL, *n;
        char line[320];

        if (p->config->provider_token) {
                /* The bearer token is built on the fly; it never reaches a log. */
                size_t len = strlen(p->config->provider_token) + sizeof("Authorization: Bearer ");
                char *auth = malloc(len);
                if (!auth)
                        return NULL;
                snprintf(auth, len, "Authorization: Bearer %s", p->config->provider_token);
                n = curl_slist_append(h, auth);
                explicit_bzero(auth, len);
                free(auth);
                if (!n)
                        return NULL;
                h = n;
        }
        if (t->have_state && t->etag[0]) {
                snprintf(line, sizeof(line), "If-None-Match: %s", t->etag);
                n = curl_slist_append(h, line);
                if (!n) {
                        curl_slist_free_all(h);
                        return NULL;
                }
                h = n;
        }
        n = curl_slist_append(h, "Accept: application/json");
        if (!n) {
                curl_slist_free_all(h);
                return NULL;
        }
        return n;
}

static void target_finish(Poller *p, PollTarget *t, CURLcode code) {
        long status = 0;
        char err[160];
        ProviderState *st;
        int r;

        curl_easy_getinfo(t->easy, CURLINFO_RESPONSE_CODE, &status);

        if (code != CURLE_OK) {
                if (t->error[0] == 0) /* the body limit already said why */
                        target_set_error(t, "%s", curl_easy_strerror(code));
        } else if (status == 304 && t->have_state) {
                t->ok = true;
        } else if (status != 200) {
                target_set_error(t, "HTTP %ld", status);
        } else {
                st = malloc(sizeof(*st));
                if (!st) {
                        target_set_error(t, "out of memory");
                } else {
                        r = provider_state_parse(t->body ? t->body : "", t->body_len, st, err, sizeof(err));
                        if (r < 0) {
                                target_set_error(t, "invalid state document: %s", err);
                        } else {
                                t->state = *st;
                                t->have_state = true;
                                t->ok = true;
                                strscpy(t->etag, sizeof(t->etag), t->pending_etag);
                        }
                        free(st);
                }
        }
        if (t->ok) {
                t->error[0] = 0;
                t->last_seen_usec = now_usec(CLOCK_REALTIME);
        } else {
                /* A failed read says nothing about the cached document: the
                 * next request must fetch a whole fresh one, never a 304. */
                t->etag[0] = 0;
        }
        free(t->body);
        t->body = NULL;
        t->body_len = 0;
        t->in_flight = false;
}

static void drain_finished(Poller *p) {
        CURLMsg *msg;
        int left;

        while ((msg = curl_multi_info_read(p->multi, &left))) {
                PollTarget *t = NULL;
                struct curl_slist *headers = NULL;

                if (msg->msg != CURLMSG_DONE)
                        continue;
                CURL *e = msg->easy_handle;
                CURLcode code = msg->data.result;
                curl_easy_getinfo(e, CURLINFO_PRIVATE, (char **) &t);
                curl_multi_remove_handle(p->multi, e);
                if (!t)
                        continue;
                target_finish(p, t, code);
                /* curl no longer needs the request's header list. */
                headers = t->headers;
                t->headers = NULL;
                curl_slist_free_all(headers);
                if (p->in_flight > 0)
                        p->in_flight--;
        }

        if (p->round_active && p->in_flight == 0) {
                p->round_active = false;
                if (p->done)
                        p->done(p, p->userdata);
        }
}

/* ---- public ---- */

int poller_new(sd_event *e, const Config *cfg, Poller **ret) {
        Poller *p;
        int r;

        p = calloc(1, sizeof(*p));
        if (!p)
                return -ENOMEM;
        p->event = sd_event_ref(e);
        p->config = cfg;
        p->multi = curl_multi_init();
        if (!p->multi) {
                poller_free(p);
                return -ENOMEM;
        }
        curl_multi_setopt(p->multi, CURLMOPT_SOCKETFUNCTION, on_curl_socket);
        curl_multi_setopt(p->multi, CURLMOPT_SOCKETDATA, p);
        curl_multi_setopt(p->multi, CURLMOPT_TIMERFUNCTION, on_curl_timer);
        curl_multi_setopt(p->multi, CURLMOPT_TIMERDATA, p);
        /* Keep one connection per node across rounds (HTTP keep-alive). */
        curl_multi_setopt(p->multi, CURLMOPT_MAXCONNECTS, (long) MAX_TARGETS);

        r = sd_event_add_time(e, &p->timer, CLOCK_MONOTONIC, USEC_INFINITY, USEC_PER_MSEC, on_timer, p);
        if (r < 0) {
                poller_free(p);
                return r;
        }
        (void) sd_event_source_set_enabled(p->timer, SD_EVENT_OFF);
        (void) sd_event_source_set_description(p->timer, "poller-timer");

        r = poller_set_targets(p, NULL, 0);
        if (r < 0) {
                poller_free(p);
                return r;
        }
        *ret = p;
        return 0;
}

void poller_abort(Poller *p) {
        for (size_t i = 0; i < p->n_targets; i++) {
                PollTarget *t = p->targets[i];
                if (!t->in_flight)
                        continue;
                curl_multi_remove_handle(p->multi, t->easy);
                curl_slist_free_all(t->headers);
                t->headers = NULL;
                free(t->body);
                t->body = NULL;
                t->body_len = 0;
                t->in_flight = false;
        }
        p->in_flight = 0;
        p->round_active = false;
}

Poller *poller_free(Poller *p) {
        if (!p)
                return NULL;
        if (p->multi)
                poller_abort(p);
        for (size_t i = 0; i < p->n_targets; i++)
                target_free(p->targets[i]);
        if (p->multi)
                curl_multi_cleanup(p->multi);
        sd_event_source_disable_unref(p->timer);
        sd_event_unref(p->event);
        free(p);
        return NULL;
}

int poller_reconfigure(Poller *p, const Config *cfg) {
        p->config = cfg;
        return 0;
}

static PollTarget *find_in(PollTarget *const *list, size_t n, const char *url) {
        for (size_t i = 0; i < n; i++)
                if (list[i] && strcmp(list[i]->url, url) == 0)
                        return list[i];
        return NULL;
}

/* Takes the target for url from the old list (keeping its ETag and last
 * answer) or makes a new one. */
static int adopt_target(PollTarget **old, size_t n_old, PollTarget **list, size_t *n, const char *url,
                        bool via_lb, bool configured) {
        PollTarget *t = NULL;

        if (*n >= MAX_TARGETS || find_in(list, *n, url))
                return 0;
        for (size_t i = 0; i < n_old; i++)
                if (old[i] && strcmp(old[i]->url, url) == 0) {
                        t = old[i];
                        old[i] = NULL;
                        break;
                }
        if (!t) {
                t = calloc(1, sizeof(*t));
                if (!t)
                        return -ENOMEM;
                if (strscpy(t->url, sizeof(t->url), url) < 0) {
                        free(t);
                        return -EINVAL;
                }
        }
        t->via_load_balancer = via_lb;
        t->configured = configured;
        list[(*n)++] = t;
        return 0;
}

int poller_set_targets(Poller *p, const char *const *extra, size_t n_extra) {
        PollTarget *old[MAX_TARGETS], *list[MAX_TARGETS];
        size_t n_old = p->n_targets, n = 0;
        const Config *c = p->config;
        int r = 0;

        if (p->round_active)
                return -EBUSY;
        memcpy(old, p->targets, n_old * sizeof(old[0]));

        for (size_t i = 0; r >= 0 && i < c->n_endpoints; i++)
                r = adopt_target(old, n_old, list, &n, c->endpoints[i], false, true);
        for (size_t i = 0; r >= 0 && i < n_extra; i++)
                r = adopt_target(old, n_old, list, &n, extra[i], false, false);
        if (r >= 0 && c->load_balancer)
                r = adopt_target(old, n_old, list, &n, c->load_balancer, true, true);
        if (r < 0) {
                /* Put everything back where it was. */
                for (size_t i = 0; i < n; i++)
                        if (!find_in(p->targets, p->n_targets, list[i]->url))
                                target_free(list[i]);
                return r;
        }
        for (size_t i = 0; i < n_old; i++)
                target_free(old[i]);
        memcpy(p->targets, list, n * sizeof(list[0]));
        p->n_targets = n;
        return 0;
}

int poller_start_round(Poller *p, poller_done_t done, void *userdata) {
        if (p->round_active)
                return -EBUSY;
        if (p->n_targets == 0)
                return -ENOENT;

        p->done = done;
        p->userdata = userdata;
        p->round_active = true;
        for (size_t i = 0; i < p->n_targets; i++) {
                PollTarget *t = p->targets[i];
                int r;

                t->ok = false;
                t->error[0] = 0;
                t->pending_etag[0] = 0;
                r = target_prepare(p, t);
                if (r >= 0) {
                        t->headers = target_headers(p, t);
                        /* Never send a request without its token. */
                        if (!t->headers)
                                r = -ENOMEM;
                }
                if (r >= 0) {
                        curl_easy_setopt(t->easy, CURLOPT_HTTPHEADER, t->headers);
                        r = curl_multi_add_handle(p->multi, t->easy) == CURLM_OK ? 0 : -ENOMEM;
                }
                if (r < 0) {
                        target_set_error(t, "cannot start request: %s", strerror(-r));
                        continue;
                }
                t->in_flight = true;
                p->in_flight++;
        }
        if (p->in_flight == 0) {
                p->round_active = false;
                return -ENOMEM;
        }
        return 0;
}

bool poller_in_flight(const Poller *p) {
        return p->round_active;
}

size_t poller_n_targets(const Poller *p) {
        return p->n_targets;
}

PollTarget *poller_target(Poller *p, size_t i) {
        return i < p->n_targets ? p->targets[i] : NULL;
}

PollTarget *poller_find(Poller *p, const char *url) {
        return find_in(p->targets, p->n_targets, url);
}
