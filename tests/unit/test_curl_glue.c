/* curl-glue: real transfers against a tiny HTTP server on loopback, both
 * on one real sd-event loop. The server answers by path:
 *   /ok     200 with "hello" (Content-Length), then closes
 *   /eof    HTTP/1.0 200 whose body ends when the server hangs up
 *   /hang   never answers (the transfer's own timeout ends it)  */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

#include "curl-glue.h"
#include "log.h"
#include "macro.h"

#define MAX_CONN 8
#define MAX_XFER 4

typedef struct Conn {
        int fd;
        sd_event_source *src;
        char req[1024];
        size_t len;
} Conn;

typedef struct Xfer {
        CURL *easy;
        char body[64];
        size_t len;
        int done; /* times the callback ran */
        CURLcode result;
} Xfer;

typedef struct Ctx {
        sd_event *event;
        CurlGlue *glue;
        int listen_fd;
        sd_event_source *listen_src;
        unsigned short port;
        Conn conns[MAX_CONN];
        Xfer xfers[MAX_XFER];
        int finished;
        /* What the callback of xfers[0] does besides recording. */
        Xfer *remove_on_done;
        Xfer *add_on_done;
} Ctx;

static Ctx *ctx;

/* ---- the server ---- */

static void conn_close(Conn *c) {
        c->src = sd_event_source_disable_unref(c->src);
        if (c->fd >= 0)
                close(c->fd);
        c->fd = -1;
        c->len = 0;
}

static void conn_answer(Conn *c) {
        const char *ok = "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello";
        const char *eof = "HTTP/1.0 200 OK\r\n\r\nuntil the end";

        if (strncmp(c->req, "GET /hang ", 10) == 0)
                return; /* keeps the connection open, silent */
        const char *a = strncmp(c->req, "GET /eof ", 9) == 0 ? eof : ok;
        assert_int_equal(write(c->fd, a, strlen(a)), (ssize_t) strlen(a));
        conn_close(c);
}

static int on_conn(sd_event_source *s, int fd, uint32_t revents, void *userdata) {
        Conn *c = userdata;
        ssize_t n = read(fd, c->req + c->len, sizeof(c->req) - 1 - c->len);

        if (n <= 0) {
                conn_close(c);
                return 0;
        }
        c->len += (size_t) n;
        c->req[c->len] = 0;
        if (strstr(c->req, "\r\n\r\n"))
                conn_answer(c);
        return 0;
}

static int on_accept(sd_event_source *s, int fd, uint32_t revents, void *userdata) {
        int cfd = accept4(fd, NULL, NULL, SOCK_CLOEXEC);

        assert_true(cfd >= 0);
        for (size_t i = 0; i < MAX_CONN; i++)
                if (ctx->conns[i].fd < 0) {
                        ctx->conns[i].fd = cfd;
                        assert_int_equal(sd_event_add_io(ctx->event, &ctx->conns[i].src, cfd, EPOLLIN,
                                                         on_conn, &ctx->conns[i]),
                                         0);
                        return 0;
                }
        close(cfd);
        return 0;
}

static void server_start(Ctx *c) {
        struct sockaddr_in sa = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
        socklen_t len = sizeof(sa);

        c->listen_fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        assert_true(c->listen_fd >= 0);
        assert_int_equal(bind(c->listen_fd, (struct sockaddr *) &sa, sizeof(sa)), 0);
        assert_int_equal(listen(c->listen_fd, 16), 0);
        assert_int_equal(getsockname(c->listen_fd, (struct sockaddr *) &sa, &len), 0);
        c->port = ntohs(sa.sin_port);
        assert_int_equal(sd_event_add_io(c->event, &c->listen_src, c->listen_fd, EPOLLIN, on_accept, c), 0);
}

/* ---- transfers ---- */

static size_t on_write(char *data, size_t size, size_t nmemb, void *userdata) {
        Xfer *x = userdata;
        size_t n = size * nmemb;

        if (n > sizeof(x->body) - 1 - x->len)
                return 0;
        memcpy(x->body + x->len, data, n);
        x->len += n;
        x->body[x->len] = 0;
        return n;
}

static void on_done(CURL *easy, CURLcode result, void *userdata);

static void xfer_start(Ctx *c, Xfer *x, const char *path, long timeout_ms) {
        char url[128];

        snprintf(url, sizeof(url), "http://127.0.0.1:%u%s", c->port, path);
        x->easy = curl_easy_init();
        assert_non_null(x->easy);
        curl_easy_setopt(x->easy, CURLOPT_URL, url);
        curl_easy_setopt(x->easy, CURLOPT_WRITEFUNCTION, on_write);
        curl_easy_setopt(x->easy, CURLOPT_WRITEDATA, x);
        curl_easy_setopt(x->easy, CURLOPT_NOSIGNAL, 1L);
        curl_easy_setopt(x->easy, CURLOPT_TIMEOUT_MS, timeout_ms);
        assert_int_equal(curl_glue_add(c->glue, x->easy, on_done, x), 0);
}

static void on_done(CURL *easy, CURLcode result, void *userdata) {
        Xfer *x = userdata;

        assert_ptr_equal(easy, x->easy);
        x->done++;
        x->result = result;
        ctx->finished++;
        if (x != &ctx->xfers[0])
                return;
        /* Re-entrancy: the glue is in the middle of draining. */
        if (ctx->remove_on_done) {
                curl_glue_remove(ctx->glue, ctx->remove_on_done->easy);
                ctx->finished++; /* it will never call back */
        }
        if (ctx->add_on_done)
                xfer_start(ctx, ctx->add_on_done, "/ok", 5000);
}

/* Runs the loop until `finished` transfers ended; fails after 10 s. */
static void run_until(Ctx *c, int finished) {
        uint64_t end = now_usec(CLOCK_MONOTONIC) + 10 * USEC_PER_SEC;

        while (c->finished < finished) {
                assert_true(now_usec(CLOCK_MONOTONIC) < end);
                assert_true(sd_event_run(c->event, 100 * USEC_PER_MSEC) >= 0);
        }
}

static int setup(void **state) {
        Ctx *c = calloc(1, sizeof(Ctx));

        assert_non_null(c);
        log_setup(LOG_TARGET_STDERR, LOG_DEBUG);
        for (size_t i = 0; i < MAX_CONN; i++)
                c->conns[i].fd = -1;
        assert_int_equal(sd_event_new(&c->event), 0);
        assert_int_equal(curl_glue_new(c->event, "test", &c->glue), 0);
        server_start(c);
        ctx = c;
        *state = c;
        return 0;
}

static int teardown(void **state) {
        Ctx *c = *state;

        assert_null(curl_glue_free(c->glue));
        for (size_t i = 0; i < MAX_XFER; i++)
                if (c->xfers[i].easy)
                        curl_easy_cleanup(c->xfers[i].easy);
        for (size_t i = 0; i < MAX_CONN; i++)
                conn_close(&c->conns[i]);
        sd_event_source_disable_unref(c->listen_src);
        close(c->listen_fd);
        sd_event_unref(c->event);
        free(c);
        ctx = NULL;
        return 0;
}

/* ---- tests ---- */

static void test_two_transfers(void **state) {
        Ctx *c = *state;

        xfer_start(c, &c->xfers[0], "/ok", 5000);
        xfer_start(c, &c->xfers[1], "/ok", 5000);
        run_until(c, 2);
        for (size_t i = 0; i < 2; i++) {
                assert_int_equal(c->xfers[i].done, 1);
                assert_int_equal(c->xfers[i].result, CURLE_OK);
                assert_string_equal(c->xfers[i].body, "hello");
        }
}

/* The body of an HTTP/1.0 answer ends with the server's hang-up: it must
 * arrive whole, the transfer end well. */
static void test_hangup_ends_body(void **state) {
        Ctx *c = *state;

        xfer_start(c, &c->xfers[0], "/eof", 5000);
        run_until(c, 1);
        assert_int_equal(c->xfers[0].result, CURLE_OK);
        assert_string_equal(c->xfers[0].body, "until the end");
}

/* curl's own timer ends a transfer nobody answers. */
static void test_timeout(void **state) {
        Ctx *c = *state;

        xfer_start(c, &c->xfers[0], "/hang", 300);
        run_until(c, 1);
        assert_int_equal(c->xfers[0].result, CURLE_OPERATION_TIMEDOUT);
}

/* A callback removes another transfer (which never calls back) and adds
 * a new one (which does). */
static void test_reentrant_callback(void **state) {
        Ctx *c = *state;

        c->remove_on_done = &c->xfers[1];
        c->add_on_done = &c->xfers[2];
        xfer_start(c, &c->xfers[0], "/ok", 5000);
        xfer_start(c, &c->xfers[1], "/hang", 5000);
        run_until(c, 3);
        assert_int_equal(c->xfers[0].done, 1);
        assert_int_equal(c->xfers[1].done, 0);
        assert_int_equal(c->xfers[2].done, 1);
        assert_int_equal(c->xfers[2].result, CURLE_OK);
        assert_string_equal(c->xfers[2].body, "hello");
}

/* Removed, or still running when the glue goes: no callback either way;
 * a handle that is not added is left alone. */
static void test_remove_and_free(void **state) {
        Ctx *c = *state;

        xfer_start(c, &c->xfers[0], "/hang", 5000);
        xfer_start(c, &c->xfers[1], "/hang", 5000);
        for (int i = 0; i < 5; i++)
                assert_true(sd_event_run(c->event, 20 * USEC_PER_MSEC) >= 0);
        curl_glue_remove(c->glue, c->xfers[0].easy);
        curl_glue_remove(c->glue, c->xfers[0].easy);
        /* The same handle may be added again once removed. */
        assert_int_equal(curl_glue_add(c->glue, c->xfers[0].easy, on_done, &c->xfers[0]), 0);
        assert_int_equal(curl_glue_add(c->glue, c->xfers[0].easy, on_done, &c->xfers[0]), -EINVAL);
        assert_int_equal(c->xfers[0].done, 0);
        assert_int_equal(c->xfers[1].done, 0);
        /* teardown frees the glue with both still added */
}

int main(void) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test_setup_teardown(test_two_transfers, setup, teardown),
                cmocka_unit_test_setup_teardown(test_hangup_ends_body, setup, teardown),
                cmocka_unit_test_setup_teardown(test_timeout, setup, teardown),
                cmocka_unit_test_setup_teardown(test_reentrant_callback, setup, teardown),
                cmocka_unit_test_setup_teardown(test_remove_and_free, setup, teardown),
        };

        curl_global_init(CURL_GLOBAL_DEFAULT);
        return cmocka_run_group_tests(tests, NULL, NULL);
}
