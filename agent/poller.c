/* The poller: one round asks every target at once over the libcurl multi
 * interface, driven by the sd-event loop through a CurlGlue.
 *
 * Each target ends on its own (its answer callback runs); when the last
 * target of a round is done, the round's done callback runs from the loop.
 * What the manager reads (PollAnswer) sits in one array in target order,
 * beside a parallel array of the private transfer state (PollTarget). Each
 * target keeps its ETag and its last good answer, so a 304 costs no
 * parsing. */
#include "poller.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "curl-glue.h"
#include "log.h"
#include "macro.h"

#define STATE_PATH "/api/v1/ha/state"

/* Private to the poller: the transfer of one target. Its answer is
 * p->answers[t - p->targets]; neither array moves while a round is in
 * flight. */
typedef struct PollTarget {
        Poller *poller;
        CURL *easy;                 /* reused across rounds */
        struct curl_slist *headers; /* of the request in flight */
        char etag[256];             /* of the last good 200: sent as If-None-Match */
        char pending_etag[256];     /* of the answer in flight, adopted only if its body is good */
        char *body;
        size_t body_len;
        bool oversized; /* the body passed PROVIDER_BODY_MAX */
        bool sent_etag; /* this request carried If-None-Match */
        bool in_flight;
} PollTarget;

struct Poller {
        const Config *config;
        CurlGlue *glue;

        PollAnswer *answers; /* n_targets each, in target order */
        PollTarget *targets;
        size_t n_targets;

        size_t in_flight;
        bool round_active;
        PollerCallbacks cb;
        void *userdata;
};

static PollAnswer *answer_of(PollTarget *t) {
        return &t->poller->answers[t - t->poller->targets];
}

static void answer_fail(PollAnswer *a, const char *fmt, ...) _printf_(2, 3);
static void answer_fail(PollAnswer *a, const char *fmt, ...) {
        va_list ap;

        va_start(ap, fmt);
        vsnprintf(a->error, sizeof(a->error), fmt, ap);
        va_end(ap);
        a->ok = false;
        a->outcome = POLL_ERROR;
}

static void target_reset_request(PollTarget *t) {
        curl_slist_free_all(t->headers);
        t->headers = NULL;
        free(t->body);
        t->body = NULL;
        t->body_len = 0;
        t->in_flight = false;
}

static void target_done(PollTarget *t) {
        target_reset_request(t);
        if (t->easy)
                curl_easy_cleanup(t->easy);
        t->easy = NULL;
}

/* ---- curl callbacks ---- */

static size_t on_body(char *data, size_t size, size_t nmemb, void *userdata) {
        PollTarget *t = userdata;
        size_t n = size * nmemb;
        char *p;

        /* Returning less than n makes curl fail the transfer: that is how
         * the 1 MiB limit is enforced without reading the rest. */
        if (t->body_len + n > PROVIDER_BODY_MAX) {
                t->oversized = true;
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

/* ---- one target ---- */

static int target_prepare(Poller *p, PollTarget *t, const PollAnswer *a) {
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
        snprintf(url, sizeof(url), "%s%s", a->url, STATE_PATH);
        curl_easy_setopt(e, CURLOPT_URL, url);
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

static struct curl_slist *target_headers(const Poller *p, PollTarget *t, const PollAnswer *a) {
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
        t->sent_etag = a->have_state && t->etag[0];
        if (t->sent_etag) {
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

/* A 200's body: a valid state document becomes the answer. */
static void answer_parse(PollTarget *t, PollAnswer *a) {
        char err[160];
        ProviderState *st;
        int r;

        st = malloc(sizeof(*st));
        if (!st) {
                answer_fail(a, "out of memory");
                return;
        }
        r = provider_state_parse(t->body ? t->body : "", t->body_len, st, err, sizeof(err));
        if (r < 0)
                answer_fail(a, "invalid state document: %s", err);
        else {
                a->state = *st;
                a->have_state = true;
                a->ok = true;
                a->outcome = POLL_OK;
                strscpy(t->etag, sizeof(t->etag), t->pending_etag);
        }
        free(st);
}

static void target_finish(PollTarget *t, CURLcode code) {
        PollAnswer *a = answer_of(t);
        long status = 0;

        curl_easy_getinfo(t->easy, CURLINFO_RESPONSE_CODE, &status);

        if (code != CURLE_OK) {
                if (t->oversized)
                        answer_fail(a, "body over %d bytes", PROVIDER_BODY_MAX);
                else
                        answer_fail(a, "%s", curl_easy_strerror(code));
        } else if (status == 304 && t->sent_etag && a->have_state) {
                /* "Unchanged" only answers a question we asked. */
                a->ok = true;
                a->outcome = POLL_NOT_MODIFIED;
        } else if (status == 304)
                answer_fail(a, "HTTP 304 to a request without If-None-Match");
        else if (status != 200)
                answer_fail(a, "HTTP %ld%s", status,
                            status == 401 || status == 403
                                    ? ": the Provider token was refused (check [provider] token_file)"
                                    : "");
        else
                answer_parse(t, a);
        if (a->ok) {
                a->error[0] = 0;
                a->last_seen_usec = now_usec(CLOCK_REALTIME);
        } else {
                /* A failed read says nothing about the cached document: the
                 * next request must fetch a whole fresh one, never a 304. */
                t->etag[0] = 0;
        }
        /* curl no longer needs the request's header list. */
        target_reset_request(t);
}

/* From the loop (the glue), as each transfer ends. */
static void on_transfer_done(CURL *easy, CURLcode code, void *userdata) {
        PollTarget *t = userdata;
        Poller *p = t->poller;

        target_finish(t, code);
        if (p->in_flight > 0)
                p->in_flight--;
        if (p->cb.answer)
                p->cb.answer(p, (size_t) (t - p->targets), p->userdata);
        if (p->round_active && p->in_flight == 0) {
                p->round_active = false;
                if (p->cb.done)
                        p->cb.done(p, p->userdata);
        }
}

/* Sends one target's request; on failure the answer says why. */
static void target_start(Poller *p, PollTarget *t, PollAnswer *a) {
        int r;

        a->ok = false;
        a->outcome = POLL_PENDING;
        a->error[0] = 0;
        t->pending_etag[0] = 0;
        t->oversized = false;
        r = target_prepare(p, t, a);
        if (r >= 0) {
                t->headers = target_headers(p, t, a);
                /* Never send a request without its token. */
                if (!t->headers)
                        r = -ENOMEM;
        }
        if (r >= 0) {
                curl_easy_setopt(t->easy, CURLOPT_HTTPHEADER, t->headers);
                r = curl_glue_add(p->glue, t->easy, on_transfer_done, t);
        }
        if (r < 0) {
                answer_fail(a, "cannot start request: %s", strerror(-r));
                return;
        }
        t->in_flight = true;
        p->in_flight++;
}

/* ---- public ---- */

int poller_new(sd_event *e, const Config *cfg, Poller **ret) {
        Poller *p;
        int r;

        p = calloc(1, sizeof(*p));
        if (!p)
                return -ENOMEM;
        p->config = cfg;
        r = curl_glue_new(e, "poller", &p->glue);
        if (r < 0) {
                poller_free(p);
                return r;
        }
        /* Keep one connection per node across rounds (HTTP keep-alive). */
        curl_multi_setopt(curl_glue_multi(p->glue), CURLMOPT_MAXCONNECTS, (long) POLLER_MAX_TARGETS);

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
                PollTarget *t = &p->targets[i];
                if (!t->in_flight)
                        continue;
                curl_glue_remove(p->glue, t->easy);
                target_reset_request(t);
        }
        p->in_flight = 0;
        p->round_active = false;
}

Poller *poller_free(Poller *p) {
        if (!p)
                return NULL;
        if (p->glue)
                poller_abort(p);
        for (size_t i = 0; i < p->n_targets; i++)
                target_done(&p->targets[i]);
        curl_glue_free(p->glue);
        free(p->answers);
        free(p->targets);
        free(p);
        return NULL;
}

int poller_reconfigure(Poller *p, const Config *cfg) {
        p->config = cfg;
        return 0;
}

/* ---- the target set ---- */

typedef struct Wanted {
        const char *url;
        bool via_load_balancer, configured, extra;
} Wanted;

static bool wanted_has(const Wanted *w, size_t n, const char *url) {
        for (size_t i = 0; i < n; i++)
                if (strcmp(w[i].url, url) == 0)
                        return true;
        return false;
}

/* Appends url unless it is there already or the list is full. */
static int wanted_add(Wanted *w, size_t *n, const char *url, bool via_lb, bool configured, bool extra) {
        if (*n >= POLLER_MAX_TARGETS || wanted_has(w, *n, url))
                return 0;
        if (strlen(url) > PROVIDER_URL_MAX)
                return -EINVAL;
        w[(*n)++] =
                (Wanted){.url = url, .via_load_balancer = via_lb, .configured = configured, .extra = extra};
        return 0;
}

static ssize_t find_target(const Poller *p, const char *url) {
        for (size_t i = 0; i < p->n_targets; i++)
                if (strcmp(p->answers[i].url, url) == 0)
                        return (ssize_t) i;
        return -1;
}

static bool targets_same(const Poller *p, const Wanted *w, size_t n) {
        if (n != p->n_targets)
                return false;
        for (size_t i = 0; i < n; i++)
                if (strcmp(w[i].url, p->answers[i].url) != 0 ||
                    w[i].via_load_balancer != p->answers[i].via_load_balancer ||
                    w[i].configured != p->answers[i].configured)
                        return false;
        return true;
}

/* Builds the new arrays: a target that stays moves over with its ETag and
 * last answer, the others are new. Returns how many extra ones are new. */
static int targets_replace(Poller *p, const Wanted *w, size_t n) {
        PollAnswer *answers = calloc(n ? n : 1, sizeof(*answers));
        PollTarget *targets = calloc(n ? n : 1, sizeof(*targets));
        bool kept[POLLER_MAX_TARGETS] = {};
        int added = 0;

        if (!answers || !targets) {
                free(answers);
                free(targets);
                return -ENOMEM;
        }
        for (size_t i = 0; i < n; i++) {
                ssize_t j = find_target(p, w[i].url);

                if (j >= 0) {
                        answers[i] = p->answers[j];
                        targets[i] = p->targets[j];
                        kept[j] = true;
                } else {
                        (void) strscpy(answers[i].url, sizeof(answers[i].url), w[i].url);
                        added += w[i].extra;
                }
                answers[i].via_load_balancer = w[i].via_load_balancer;
                answers[i].configured = w[i].configured;
                targets[i].poller = p;
        }
        for (size_t j = 0; j < p->n_targets; j++)
                if (!kept[j])
                        target_done(&p->targets[j]);
        free(p->answers);
        free(p->targets);
        p->answers = answers;
        p->targets = targets;
        p->n_targets = n;
        return added;
}

int poller_set_targets(Poller *p, const char *const *extra, size_t n_extra) {
        Wanted w[POLLER_MAX_TARGETS];
        const Config *c = p->config;
        size_t n = 0;
        int r = 0;

        if (p->round_active)
                return -EBUSY;
        for (size_t i = 0; r >= 0 && i < c->n_endpoints; i++)
                r = wanted_add(w, &n, c->endpoints[i], false, true, false);
        for (size_t i = 0; r >= 0 && i < n_extra; i++)
                r = wanted_add(w, &n, extra[i], false, false, true);
        if (r >= 0 && c->load_balancer)
                r = wanted_add(w, &n, c->load_balancer, true, true, false);
        if (r < 0)
                return r;
        /* The usual case after a round: nothing to move. */
        if (targets_same(p, w, n))
                return 0;
        return targets_replace(p, w, n);
}

int poller_start_round(Poller *p, const PollerCallbacks *cb, void *userdata) {
        if (p->round_active)
                return -EBUSY;
        if (p->n_targets == 0)
                return -ENOENT;

        p->cb = cb ? *cb : (PollerCallbacks){};
        p->userdata = userdata;
        p->round_active = true;
        for (size_t i = 0; i < p->n_targets; i++)
                target_start(p, &p->targets[i], &p->answers[i]);
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

void poller_get_round(const Poller *p, PollRound *ret) {
        *ret = (PollRound){
                .answers = p->answers,
                .n_answers = p->n_targets,
                .n_pending = p->in_flight,
                .in_flight = p->round_active,
        };
}
