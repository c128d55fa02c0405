/* dsm-agent-syncd: arguments, configuration, the manager, the loop. */
#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "config.h"
#include "log.h"
#include "manager.h"
#include "util.h"
#include "version.h"

#define EXIT_CONFIG 78

static void help(void) {
        printf("Usage: dsm-agent-syncd [OPTIONS]\n"
               "\n"
               "Keeps this Agent's RabbitMQ settings pointed at the Provider HA cluster's Primary.\n"
               "\n"
               "  -c, --config FILE   configuration file (default %s)\n"
               "      --check-config  validate the configuration and exit (78 when invalid)\n"
               "      --once          run one synchronization round, print a summary, exit\n"
               "                      (0 when a Primary is known and committed)\n"
               "  -h, --help          show this help\n"
               "      --version       show the version\n"
               "\n"
               "Runs in the foreground (systemd Type=notify). SIGHUP reloads the configuration,\n"
               "SIGTERM/SIGINT stop. See dsm-agent-syncd(8) and dsm-agent-sync.ini(5).\n",
               CONFIG_DEFAULT_PATH);
}

/* Plain-http Provider URLs are fine in labs, but worth a line at start
 * (HTTP://, too: the scheme is the same in any letter case). */
static void warn_plain_http(const Config *c) {
        for (size_t i = 0; i < c->n_endpoints; i++)
                if (url_is_plain_http(c->endpoints[i]))
                        log_warning("Provider endpoint %s uses plain http: no TLS, token sent in clear",
                                    c->endpoints[i]);
        if (c->load_balancer && url_is_plain_http(c->load_balancer))
                log_warning("Provider load balancer %s uses plain http: no TLS, token sent in clear",
                            c->load_balancer);
}

int main(int argc, char *argv[]) {
        enum { ARG_CHECK_CONFIG = 0x100, ARG_ONCE, ARG_VERSION };
        static const struct option options[] = {
                {"config", required_argument, NULL, 'c'},
                {"check-config", no_argument, NULL, ARG_CHECK_CONFIG},
                {"once", no_argument, NULL, ARG_ONCE},
                {"help", no_argument, NULL, 'h'},
                {"version", no_argument, NULL, ARG_VERSION},
                {},
        };
        const char *path = CONFIG_DEFAULT_PATH;
        bool check_only = false, once = false;
        char err[CONFIG_ERROR_MAX];
        Config *config = NULL;
        Manager *m = NULL;
        int c, r;

        while ((c = getopt_long(argc, argv, "c:h", options, NULL)) >= 0)
                switch (c) {
                case 'c':
                        path = optarg;
                        break;
                case ARG_CHECK_CONFIG:
                        check_only = true;
                        break;
                case ARG_ONCE:
                        once = true;
                        break;
                case 'h':
                        help();
                        return 0;
                case ARG_VERSION:
                        printf("dsm-agent-syncd %s\n", DAEMON_VERSION);
                        return 0;
                default:
                        fprintf(stderr, "Try 'dsm-agent-syncd --help'.\n");
                        return EXIT_FAILURE; /* contract: 1 for any other fatal error */
                }
        if (optind < argc) {
                fprintf(stderr, "dsm-agent-syncd: unexpected argument '%s'\n", argv[optind]);
                return EXIT_FAILURE;
        }

        r = config_load(path, &config, err, sizeof(err));
        if (r < 0) {
                /* FILE:LINE: message on stderr, as the contract says; under
                 * systemd also as a structured entry support can search for. */
                fprintf(stderr, "%s\n", err);
                if (!check_only) {
                        log_setup(LOG_TARGET_AUTO, LOG_INFO);
                        if (log_is_journal())
                                log_struct(LOG_ERR, 0, MID_CONFIG_REJECTED, &(LogFields){.reason = err},
                                           "Configuration rejected: %s", err);
                }
                return EXIT_CONFIG;
        }
        if (check_only) {
                printf("%s: configuration OK\n", path);
                config_free(config);
                return 0;
        }

        log_setup(once ? LOG_TARGET_STDERR : config->log_target, config->log_level);
        warn_plain_http(config);

        r = manager_new(config, once, &m); /* takes config */
        if (r < 0)
                return 1;
        log_info("dsm-agent-syncd %s starting, configuration %s", DAEMON_VERSION, path);
        r = manager_run(m);
        manager_free(m);
        return r < 0 ? 1 : r;
}
