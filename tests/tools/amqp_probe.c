/* amqp_probe HOST PORT [N]: the floor for the broker benchmarks.
 *
 * (a) setup: connect + login + channel + declare (exchange, server-named
 *     exclusive queue) + bind + consume, N times on fresh connections;
 * (b) latency: on one such connection, publish a message carrying a
 *     monotonic timestamp and wait for its delivery, N times.
 * Prints one JSON object: {"n": N, "setup_ms": {"p50":..,"p99":..,"max":..},
 * "publish_consume_ms": {...}}. Plain blocking rabbitmq-c, guest/guest,
 * vhost "/", exchange dsm.provider.events: what broker.c cannot beat. */

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <amqp.h>
#include <amqp_tcp_socket.h>

#define EXCHANGE "dsm.provider.events"
#define KEY      "provider.probe"

static double now_ms(void) {
        struct timespec ts;

        clock_gettime(CLOCK_MONOTONIC, &ts);
        return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static int ok(amqp_connection_state_t c, const char *what) {
        amqp_rpc_reply_t r = amqp_get_rpc_reply(c);

        if (r.reply_type == AMQP_RESPONSE_NORMAL)
                return 0;
        fprintf(stderr, "amqp_probe: %s failed (reply type %d)\n", what, r.reply_type);
        return -1;
}

/* Everything broker.c does before its first delivery, blocking. */
static amqp_connection_state_t setup(const char *host, int port) {
        struct timeval tv = {.tv_sec = 10};
        amqp_connection_state_t c = amqp_new_connection();
        amqp_socket_t *s = amqp_tcp_socket_new(c);
        amqp_queue_declare_ok_t *q;
        amqp_bytes_t queue;
        amqp_rpc_reply_t r;

        if (!s || amqp_socket_open_noblock(s, host, port, &tv) != AMQP_STATUS_OK)
                goto fail;
        amqp_set_rpc_timeout(c, &tv);
        r = amqp_login(c, "/", 0, 131072, 10, AMQP_SASL_METHOD_PLAIN, "guest", "guest");
        if (r.reply_type != AMQP_RESPONSE_NORMAL)
                goto fail;
        amqp_channel_open(c, 1);
        if (ok(c, "channel.open") < 0)
                goto fail;
        amqp_exchange_declare(c, 1, amqp_cstring_bytes(EXCHANGE), amqp_cstring_bytes("topic"), 0, 1, 0, 0,
                              amqp_empty_table);
        if (ok(c, "exchange.declare") < 0)
                goto fail;
        q = amqp_queue_declare(c, 1, amqp_empty_bytes, 0, 0, 1, 1, amqp_empty_table);
        if (ok(c, "queue.declare") < 0)
                goto fail;
        queue = amqp_bytes_malloc_dup(q->queue);
        amqp_queue_bind(c, 1, queue, amqp_cstring_bytes(EXCHANGE), amqp_cstring_bytes(KEY),
                        amqp_empty_table);
        if (ok(c, "queue.bind") < 0) {
                amqp_bytes_free(queue);
                goto fail;
        }
        amqp_basic_qos(c, 1, 0, 100, 0);
        amqp_basic_consume(c, 1, queue, amqp_empty_bytes, 0, 0, 1, amqp_empty_table);
        amqp_bytes_free(queue);
        if (ok(c, "basic.consume") < 0)
                goto fail;
        return c;
fail:
        fprintf(stderr, "amqp_probe: setup against %s:%d failed\n", host, port);
        amqp_destroy_connection(c);
        return NULL;
}

static void teardown(amqp_connection_state_t c) {
        amqp_connection_close(c, AMQP_REPLY_SUCCESS);
        amqp_destroy_connection(c);
}

static int one_roundtrip(amqp_connection_state_t c, double *ret_ms) {
        struct timeval tv = {.tv_sec = 10};
        char body[64];
        amqp_envelope_t env;
        amqp_rpc_reply_t r;
        double sent;
        int n;

        n = snprintf(body, sizeof body, "{\"t\": %.6f}", now_ms());
        if (amqp_basic_publish(c, 1, amqp_cstring_bytes(EXCHANGE), amqp_cstring_bytes(KEY), 0, 0, NULL,
                               (amqp_bytes_t){.len = (size_t) n, .bytes = body}) != AMQP_STATUS_OK)
                return -1;
        amqp_maybe_release_buffers(c);
        r = amqp_consume_message(c, &env, &tv, 0);
        if (r.reply_type != AMQP_RESPONSE_NORMAL)
                return -1;
        /* The body is not NUL-terminated. */
        n = env.message.body.len < sizeof body - 1 ? (int) env.message.body.len : (int) sizeof body - 1;
        memcpy(body, env.message.body.bytes, n);
        body[n] = 0;
        if (sscanf(body, "{\"t\": %lf}", &sent) != 1) {
                amqp_destroy_envelope(&env);
                return -1;
        }
        *ret_ms = now_ms() - sent;
        amqp_basic_ack(c, 1, env.delivery_tag, 0);
        amqp_destroy_envelope(&env);
        return 0;
}

static int cmp_double(const void *a, const void *b) {
        double x = *(const double *) a, y = *(const double *) b;

        return (x > y) - (x < y);
}

static void print_stats(const char *name, double *v, int n, int last) {
        qsort(v, n, sizeof *v, cmp_double);
        printf("\"%s\": {\"p50\": %.3f, \"p99\": %.3f, \"max\": %.3f}%s", name, v[(n - 1) / 2],
               v[(int) ((n - 1) * 0.99)], v[n - 1], last ? "" : ", ");
}

int main(int argc, char **argv) {
        double *setup_ms, *rt_ms;
        amqp_connection_state_t c;
        long port, n = 50;
        char *end;

        if (argc < 3 || argc > 4) {
                fprintf(stderr, "usage: amqp_probe HOST PORT [N]\n");
                return 2;
        }
        errno = 0;
        port = strtol(argv[2], &end, 10);
        if (errno || *end || port < 1 || port > 65535)
                return 2;
        if (argc == 4) {
                n = strtol(argv[3], &end, 10);
                if (*end || n < 1 || n > 100000)
                        return 2;
        }
        setup_ms = calloc(n, sizeof *setup_ms);
        rt_ms = calloc(n, sizeof *rt_ms);
        if (!setup_ms || !rt_ms)
                return 1;
        for (long i = 0; i < n; i++) {
                double t0 = now_ms();
                c = setup(argv[1], (int) port);
                if (!c)
                        return 1;
                setup_ms[i] = now_ms() - t0;
                teardown(c);
        }
        c = setup(argv[1], (int) port);
        if (!c)
                return 1;
        for (long i = 0; i < n; i++)
                if (one_roundtrip(c, &rt_ms[i]) < 0) {
                        fprintf(stderr, "amqp_probe: publish/consume round trip failed\n");
                        return 1;
                }
        teardown(c);
        printf("{\"n\": %ld, ", n);
        print_stats("setup_ms", setup_ms, (int) n, 0);
        print_stats("publish_consume_ms", rt_ms, (int) n, 1);
        printf("}\n");
        free(setup_ms);
        free(rt_ms);
        return 0;
}
