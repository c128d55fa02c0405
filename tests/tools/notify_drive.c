/* notify_drive CONFIG: runs only the notify listener of CONFIG on an
 * sd-event loop, for tests of the listener before (and without) the whole
 * daemon. Prints "ready" once listening, "notify <peer> <summary>" for each
 * accepted notify (flushed), answers /v1/status with a small fixed
 * document, and exits 0 on SIGTERM or SIGINT.
 *
 * With NOTIFY_DRIVE_HIDE_FD=1 in the environment, the listener is told no
 * fd for any connection (the notify_test_connection_fd seam), as if MHD
 * had not reported one. */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <systemd/sd-event.h>

#include "config.h"
#include "log.h"
#include "notify.h"

static unsigned long n_notifies;
static bool hide_fd;

int notify_test_connection_fd(int fd) {
        return hide_fd ? -1 : fd;
}

static void on_notify(NotifyServer *s, const char *peer, const char *summary, void *userdata) {
        n_notifies++;
        printf("notify %s %s\n", peer, summary);
        fflush(stdout);
}

static json_t *on_status(NotifyServer *s, void *userdata) {
        return json_pack("{s:s, s:I, s:s, s:I}", "daemon_version", "test", "epoch", (json_int_t) 8,
                         "broker_connection", "down", "notifies", (json_int_t) n_notifies);
}

int main(int argc, char **argv) {
        static const NotifyCallbacks cb = {.notify = on_notify, .status = on_status};
        char err[CONFIG_ERROR_MAX] = "";
        Config *cfg = NULL;
        sd_event *e = NULL;
        NotifyServer *s = NULL;
        sigset_t mask;
        int r;

        if (argc != 2) {
                fprintf(stderr, "usage: %s CONFIG\n", argv[0]);
                return 2;
        }
        r = config_load(argv[1], &cfg, err, sizeof(err));
        if (r < 0) {
                fprintf(stderr, "%s\n", err);
                return 78;
        }
        log_setup(LOG_TARGET_STDERR, cfg->log_level);
        hide_fd = streq_ptr(getenv("NOTIFY_DRIVE_HIDE_FD"), "1");
        signal(SIGPIPE, SIG_IGN);
        sigemptyset(&mask);
        sigaddset(&mask, SIGTERM);
        sigaddset(&mask, SIGINT);
        sigprocmask(SIG_BLOCK, &mask, NULL);

        r = sd_event_default(&e);
        if (r >= 0)
                r = sd_event_add_signal(e, NULL, SIGTERM, NULL, NULL);
        if (r >= 0)
                r = sd_event_add_signal(e, NULL, SIGINT, NULL, NULL);
        if (r >= 0)
                r = notify_server_new(e, cfg, &cb, NULL, &s);
        if (r < 0) {
                fprintf(stderr, "notify_drive: setup failed: %s\n", strerror(-r));
                config_free(cfg);
                sd_event_unref(e);
                return 1;
        }
        printf("ready\n");
        fflush(stdout);
        r = sd_event_loop(e);
        notify_server_free(s);
        sd_event_unref(e);
        config_free(cfg);
        return r < 0 ? 1 : 0;
}
