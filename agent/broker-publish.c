/* The publishing channel of the broker connection (channel 2, confirm
 * mode): broker_publish() sends, and the broker's answers on that channel
 * (basic.ack, basic.nack, channel.close) come back here from the frame
 * loop in broker.c. A refusal closes this channel only: consuming on
 * channel 1 goes on. */

#include <errno.h>
#include <stdio.h>

#include <amqp.h>

#include "broker-internal.h"
#include "log.h"

/* The broker closed the publishing channel: it refused a publish (403: the
 * user may not write to the exchange; 404: no such exchange). Consuming
 * goes on; publishing waits for the next connection. */
static void broker_on_publish_close(Broker *b, const amqp_frame_t *f) {
        amqp_channel_close_t *m = f->payload.method.decoded;
        amqp_channel_close_ok_t ok = {};
        char reason[BROKER_REASON_MAX];

        snprintf(reason, sizeof reason, "%u %.*s", m->reply_code, (int) m->reply_text.len,
                 (const char *) m->reply_text.bytes);
        if (broker_can_send(b))
                (void) amqp_send_method(b->conn, BROKER_PUBLISH_CHANNEL, AMQP_CHANNEL_CLOSE_OK_METHOD, &ok);
        b->publish_open = false;
        if (b->cb.publish_refused)
                b->cb.publish_refused(b, reason, b->userdata);
}

int broker_on_publish_method(Broker *b, const amqp_frame_t *f) {
        switch (f->payload.method.id) {
        case AMQP_BASIC_ACK_METHOD: {
                amqp_basic_ack_t *m = f->payload.method.decoded;
                if (b->cb.confirmed)
                        b->cb.confirmed(b, m->delivery_tag, m->multiple, true, b->userdata);
                return 0;
        }
        case AMQP_BASIC_NACK_METHOD: {
                amqp_basic_nack_t *m = f->payload.method.decoded;
                if (b->cb.confirmed)
                        b->cb.confirmed(b, m->delivery_tag, m->multiple, false, b->userdata);
                return 0;
        }
        case AMQP_CHANNEL_CLOSE_METHOD:
                broker_on_publish_close(b, f);
                return 0;
        default:
                log_debug("broker: ignoring method 0x%08x on the publishing channel", f->payload.method.id);
                return 0;
        }
}

int broker_publish(Broker *b, const BrokerInfo *target, const char *routing_key, const void *body,
                   size_t len, uint64_t *ret_seq) {
        /* user_id: RabbitMQ refuses a message whose user_id is not the
         * connection's user, so a consumer can trust whose it is. */
        amqp_basic_properties_t props = {
                ._flags = AMQP_BASIC_CONTENT_TYPE_FLAG | AMQP_BASIC_DELIVERY_MODE_FLAG |
                          AMQP_BASIC_USER_ID_FLAG,
                .content_type = amqp_cstring_bytes("application/json"),
                .delivery_mode = AMQP_DELIVERY_NONPERSISTENT,
                .user_id = amqp_cstring_bytes(b->params.username),
        };
        int r;

        if (b->state != BROKER_CONNECTED || !b->conn)
                return -ENOTCONN;
        if (!broker_info_equal(&b->params.target, target))
                return -ESTALE;
        if (!b->publish_open)
                return -EPERM;
        if (!broker_can_send(b)) {
                broker_lost(b, "broker not reading (send buffer full)", false);
                return -EIO;
        }
        r = amqp_basic_publish(b->conn, BROKER_PUBLISH_CHANNEL, amqp_cstring_bytes(b->params.exchange),
                               amqp_cstring_bytes(routing_key), 0, 0, &props,
                               (amqp_bytes_t){.len = len, .bytes = (void *) body});
        if (r != AMQP_STATUS_OK) {
                broker_lost_status(b, "basic.publish", r);
                return -EIO;
        }
        *ret_seq = ++b->publish_seq;
        /* The library may have read frames while publishing (its heartbeat
         * check): the socket will not say so, the drain will. */
        if (amqp_frames_enqueued(b->conn) || amqp_data_in_buffer(b->conn))
                (void) sd_event_source_set_enabled(b->drain_source, SD_EVENT_ONESHOT);
        return 0;
}
