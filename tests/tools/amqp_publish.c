/* amqp_publish HOST PORT VHOST EXCHANGE ROUTING_KEY BODY [COUNT]
 *
 * Declares EXCHANGE as a durable topic exchange (passively when it already
 * exists with other arguments) and publishes BODY COUNT times (default 1)
 * with ROUTING_KEY, as guest/guest or $AMQP_USER/$AMQP_PASSWORD. Exits 0
 * when every message was handed to the broker (publisher confirms). */

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <amqp.h>
#include <amqp_tcp_socket.h>

static int die_reply(const char *what, amqp_rpc_reply_t r) {
        if (r.reply_type == AMQP_RESPONSE_LIBRARY_EXCEPTION)
                fprintf(stderr, "amqp_publish: %s: %s\n", what, amqp_error_string2(r.library_error));
        else if (r.reply_type == AMQP_RESPONSE_SERVER_EXCEPTION && r.reply.id == AMQP_CHANNEL_CLOSE_METHOD) {
                amqp_channel_close_t *m = r.reply.decoded;
                fprintf(stderr, "amqp_publish: %s: %u %.*s\n", what, m->reply_code, (int) m->reply_text.len,
                        (char *) m->reply_text.bytes);
        } else if (r.reply_type == AMQP_RESPONSE_SERVER_EXCEPTION &&
                   r.reply.id == AMQP_CONNECTION_CLOSE_METHOD) {
                amqp_connection_close_t *m = r.reply.decoded;
                fprintf(stderr, "amqp_publish: %s: %u %.*s\n", what, m->reply_code, (int) m->reply_text.len,
                        (char *) m->reply_text.bytes);
        } else
                fprintf(stderr, "amqp_publish: %s: failed\n", what);
        return 1;
}

static long parse_long(const char *s, long min, long max) {
        char *end;
        long v;

        errno = 0;
        v = strtol(s, &end, 10);
        if (errno || *end || v < min || v > max)
                return -1;
        return v;
}

int main(int argc, char **argv) {
        const char *user = getenv("AMQP_USER") ? getenv("AMQP_USER") : "guest";
        const char *pass = getenv("AMQP_PASSWORD") ? getenv("AMQP_PASSWORD") : "guest";
        struct timeval tv = {.tv_sec = 10};
        amqp_connection_state_t conn;
        amqp_socket_t *sock;
        amqp_rpc_reply_t r;
        long port, count = 1;
        amqp_bytes_t ex, body;

        if (argc < 7 || argc > 8) {
                fprintf(stderr, "usage: amqp_publish HOST PORT VHOST EXCHANGE ROUTING_KEY BODY [COUNT]\n");
                return 2;
        }
        port = parse_long(argv[2], 1, 65535);
        if (argc == 8)
                count = parse_long(argv[7], 0, 100000000);
        if (port < 0 || count < 0) {
                fprintf(stderr, "amqp_publish: bad port or count\n");
                return 2;
        }
        conn = amqp_new_connection();
        sock = amqp_tcp_socket_new(conn);
        if (!sock || amqp_socket_open_noblock(sock, argv[1], (int) port, &tv) != AMQP_STATUS_OK) {
                fprintf(stderr, "amqp_publish: cannot connect to %s:%ld\n", argv[1], port);
                amqp_destroy_connection(conn);
                return 1;
        }
        amqp_set_rpc_timeout(conn, &tv);
        r = amqp_login(conn, argv[3], 0, 131072, 0, AMQP_SASL_METHOD_PLAIN, user, pass);
        if (r.reply_type != AMQP_RESPONSE_NORMAL)
                return die_reply("login", r);
        amqp_channel_open(conn, 1);
        if ((r = amqp_get_rpc_reply(conn)).reply_type != AMQP_RESPONSE_NORMAL)
                return die_reply("channel.open", r);
        ex = amqp_cstring_bytes(argv[4]);
        amqp_exchange_declare(conn, 1, ex, amqp_cstring_bytes("topic"), 0, 1, 0, 0, amqp_empty_table);
        r = amqp_get_rpc_reply(conn);
        if (r.reply_type == AMQP_RESPONSE_SERVER_EXCEPTION && r.reply.id == AMQP_CHANNEL_CLOSE_METHOD) {
                amqp_channel_close_ok_t ok = {};
                amqp_send_method(conn, 1, AMQP_CHANNEL_CLOSE_OK_METHOD, &ok);
                amqp_channel_open(conn, 1);
                if ((r = amqp_get_rpc_reply(conn)).reply_type != AMQP_RESPONSE_NORMAL)
                        return die_reply("channel.open", r);
                amqp_exchange_declare(conn, 1, ex, amqp_cstring_bytes("topic"), 1, 0, 0, 0,
                                      amqp_empty_table);
                r = amqp_get_rpc_reply(conn);
        }
        if (r.reply_type != AMQP_RESPONSE_NORMAL)
                return die_reply("exchange.declare", r);
        amqp_confirm_select(conn, 1);
        if ((r = amqp_get_rpc_reply(conn)).reply_type != AMQP_RESPONSE_NORMAL)
                return die_reply("confirm.select", r);

        body = amqp_cstring_bytes(argv[6]);
        for (long i = 0; i < count; i++) {
                amqp_basic_properties_t props = {._flags = AMQP_BASIC_CONTENT_TYPE_FLAG,
                                                 .content_type = amqp_cstring_bytes("application/json")};
                if (amqp_basic_publish(conn, 1, ex, amqp_cstring_bytes(argv[5]), 0, 0, &props, body) !=
                    AMQP_STATUS_OK) {
                        fprintf(stderr, "amqp_publish: publish failed after %ld\n", i);
                        return 1;
                }
        }
        /* Wait for the confirm of the last message (multiple acks cover the rest). */
        for (long acked = 0; acked < count;) {
                amqp_frame_t f;
                if (amqp_simple_wait_frame_noblock(conn, &f, &tv) != AMQP_STATUS_OK) {
                        fprintf(stderr, "amqp_publish: no publisher confirm\n");
                        return 1;
                }
                if (f.frame_type != AMQP_FRAME_METHOD)
                        continue;
                if (f.payload.method.id == AMQP_BASIC_ACK_METHOD) {
                        amqp_basic_ack_t *a = f.payload.method.decoded;
                        acked = (long) a->delivery_tag;
                } else if (f.payload.method.id == AMQP_BASIC_NACK_METHOD) {
                        fprintf(stderr, "amqp_publish: broker nacked a message\n");
                        return 1;
                }
        }
        amqp_channel_close(conn, 1, AMQP_REPLY_SUCCESS);
        amqp_connection_close(conn, AMQP_REPLY_SUCCESS);
        amqp_destroy_connection(conn);
        return 0;
}
