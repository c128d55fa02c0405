/* broker_drive: agent/broker.c (with its connection worker, broker-connect.c)
 * on its own sd-event loop, for tests.
 *
 *   broker_drive [options] HOST PORT
 *     -v VHOST   (default /)          -x EXCHANGE (default dsm.provider.events)
 *     -u USER    (default guest)      -p PASSWORD (default guest)
 *     -H SECONDS heartbeat (default 2; 0 disables)
 *     -t         TLS                  -C CAFILE
 *     -d         debug logs on stderr
 *
 * Prints one line per state change and per event on stdout:
 *   state connecting | state connected | state down <reason>
 *   event <routing key> <body>
 * Reads commands from stdin, one per line:
 *   target HOST PORT   move to another broker
 *   target none        disconnect
 *   reconfigure USER PASSWORD EXCHANGE HEARTBEAT_SECONDS
 * Exits 0 on SIGTERM/SIGINT or end of stdin with "exit" printed last. */

#include <errno.h>
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>

#include "broker.h"
#include "log.h"
#include "macro.h"

typedef struct Drive {
        sd_event *event;
        Broker *broker;
        Config cfg;
        BrokerInfo target;
        char line[1024];
        size_t n_line;
} Drive;

static void on_event(Broker *b, const char *key, const void *body, size_t len, void *userdata) {
        printf("event %s %.*s\n", key, (int) len, (const char *) body);
}

static void on_state(Broker *b, BrokerConnState s, const char *reason, void *userdata) {
        printf("state %s%s%s\n", broker_conn_state_to_string(s), reason ? " " : "", reason ? reason : "");
}

static int parse_port(const char *s, uint16_t *ret) {
        char *end;
        long v;

        errno = 0;
        v = strtol(s, &end, 10);
        if (errno || *end || v < 1 || v > 65535)
                return -EINVAL;
        *ret = (uint16_t) v;
        return 0;
}

static void run_command(Drive *d, char *line) {
        char *argv[6] = {};
        int argc = 0;
        char *save = NULL;

        for (char *tok = strtok_r(line, " \t", &save); tok && argc < 6; tok = strtok_r(NULL, " \t", &save))
                argv[argc++] = tok;
        if (argc == 2 && streq_ptr(argv[0], "target") && streq_ptr(argv[1], "none")) {
                broker_set_target(d->broker, NULL);
        } else if (argc == 3 && streq_ptr(argv[0], "target")) {
                BrokerInfo t = d->target;
                if (strscpy(t.host, sizeof t.host, argv[1]) < 0 || parse_port(argv[2], &t.port) < 0) {
                        fprintf(stderr, "bad target\n");
                        return;
                }
                broker_set_target(d->broker, &t);
        } else if (argc == 5 && streq_ptr(argv[0], "reconfigure")) {
                Config c = d->cfg;
                c.broker_username = argv[1];
                c.broker_password = argv[2];
                c.exchange = argv[3];
                c.heartbeat = strtoull(argv[4], NULL, 10) * USEC_PER_SEC;
                broker_reconfigure(d->broker, &c);
        } else if (argc > 0)
                fprintf(stderr, "unknown command\n");
}

static int on_stdin(sd_event_source *s, int fd, uint32_t revents, void *userdata) {
        Drive *d = userdata;
        ssize_t n = read(fd, d->line + d->n_line, sizeof d->line - 1 - d->n_line);

        if (n <= 0) {
                if (n < 0 && errno == EAGAIN)
                        return 0;
                return sd_event_exit(sd_event_source_get_event(s), 0);
        }
        d->n_line += n;
        for (;;) {
                char *nl = memchr(d->line, '\n', d->n_line);
                size_t used;
                if (!nl) {
                        if (d->n_line == sizeof d->line - 1)
                                d->n_line = 0; /* overlong: drop */
                        return 0;
                }
                *nl = 0;
                used = nl - d->line + 1;
                run_command(d, d->line);
                memmove(d->line, d->line + used, d->n_line - used);
                d->n_line -= used;
        }
}

int main(int argc, char **argv) {
        Drive d = {};
        BrokerCallbacks cb = {.event = on_event, .state_changed = on_state};
        sigset_t mask;
        int c, r, level = LOG_NOTICE;
        unsigned long hb = 2;

        d.cfg.broker_username = (char *) "guest";
        d.cfg.broker_password = (char *) "guest";
        d.cfg.exchange = (char *) "dsm.provider.events";
        strscpy(d.target.vhost, sizeof d.target.vhost, "/");
        while ((c = getopt(argc, argv, "v:x:u:p:H:tC:d")) >= 0) {
                switch (c) {
                case 'v':
                        strscpy(d.target.vhost, sizeof d.target.vhost, optarg);
                        break;
                case 'x':
                        d.cfg.exchange = optarg;
                        break;
                case 'u':
                        d.cfg.broker_username = optarg;
                        break;
                case 'p':
                        d.cfg.broker_password = optarg;
                        break;
                case 'H':
                        hb = strtoul(optarg, NULL, 10);
                        break;
                case 't':
                        d.target.tls = true;
                        break;
                case 'C':
                        d.cfg.broker_ca_file = optarg;
                        break;
                case 'd':
                        level = LOG_DEBUG;
                        break;
                default:
                        return 2;
                }
        }
        if (argc - optind != 2 || strscpy(d.target.host, sizeof d.target.host, argv[optind]) < 0 ||
            parse_port(argv[optind + 1], &d.target.port) < 0) {
                fprintf(stderr,
                        "usage: broker_drive [-v VHOST] [-x EXCHANGE] [-u USER] [-p PASS] [-H HB] [-t] "
                        "[-C CA] [-d] HOST PORT\n");
                return 2;
        }
        d.cfg.heartbeat = hb * USEC_PER_SEC;
        setvbuf(stdout, NULL, _IOLBF, 0);
        log_setup(LOG_TARGET_STDERR, level);

        sigemptyset(&mask);
        sigaddset(&mask, SIGTERM);
        sigaddset(&mask, SIGINT);
        sigprocmask(SIG_BLOCK, &mask, NULL);
        r = sd_event_default(&d.event);
        if (r >= 0)
                r = sd_event_add_signal(d.event, NULL, SIGTERM, NULL, NULL);
        if (r >= 0)
                r = sd_event_add_signal(d.event, NULL, SIGINT, NULL, NULL);
        if (r >= 0)
                r = sd_event_add_io(d.event, NULL, STDIN_FILENO, EPOLLIN, on_stdin, &d);
        if (r == -EPERM) /* stdin is a regular file or /dev/null: no commands */
                r = 0;
        if (r >= 0)
                r = broker_new(d.event, &d.cfg, &cb, &d, &d.broker);
        if (r >= 0)
                r = broker_set_target(d.broker, &d.target);
        if (r >= 0)
                r = sd_event_loop(d.event);
        if (r < 0)
                fprintf(stderr, "broker_drive: %s\n", strerror(-r));
        d.broker = broker_free(d.broker);
        d.event = sd_event_unref(d.event);
        printf("exit\n");
        return r < 0 ? 1 : 0;
}
