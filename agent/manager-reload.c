/* SIGHUP: the configuration file read again and applied whole, or
 * rejected whole (the old one stays in force, every listener and lock
 * included). New sockets and locks are taken before old ones are let go,
 * so a bad new value never leaves the daemon without them. */
#include <limits.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include <systemd/sd-daemon.h>

#include "lockfile.h"
#include "log.h"
#include "macro.h"
#include "manager.h"

/* Makes the listener match new_cfg. When its socket must change, the new
 * one is opened first (a different address) so a bad new address leaves
 * the old listener in place; on the same address the old one must go
 * first, and comes back with old_cfg if the new one fails. */
static int manager_reload_notify(Manager *m, const Config *old_cfg, const Config *new_cfg) {
        NotifyServer *fresh = NULL;
        bool same_addr = old_cfg->notify_enabled && new_cfg->notify_enabled &&
                         streq_ptr(old_cfg->notify_listen, new_cfg->notify_listen);
        int r;

        if (m->notify && !notify_server_needs_restart(old_cfg, new_cfg))
                return notify_server_reconfigure(m->notify, new_cfg);
        if (!new_cfg->notify_enabled) {
                m->notify = notify_server_free(m->notify);
                return 0;
        }
        if (same_addr)
                m->notify = notify_server_free(m->notify);
        r = notify_server_new(m->event, new_cfg, &manager_notify_callbacks, m, &fresh);
        if (r < 0) {
                if (same_addr && !m->notify)
                        (void) notify_server_new(m->event, old_cfg, &manager_notify_callbacks, m,
                                                 &m->notify);
                return r;
        }
        notify_server_free(m->notify);
        m->notify = fresh;
        return 0;
}

int manager_reload(Manager *m) {
        char err[CONFIG_ERROR_MAX];
        Config *new_cfg = NULL, *old_cfg = m->config;
        ControlServer *control = NULL;
        bool state_moved = false, control_moved = false;
        int r, new_lock = -1;

        (void) sd_notify(false, "RELOADING=1");
        r = config_load(old_cfg->path, &new_cfg, err, sizeof(err));
        if (r >= 0 && strcmp(old_cfg->state_file, new_cfg->state_file) != 0) {
                /* A moved state file is locked before anything uses it. */
                char path[PATH_MAX];
                pid_t holder = 0;

                state_moved = true;
                r = new_lock = lockfile_acquire(new_cfg->state_file, path, sizeof(path), &holder);
                if (r < 0 && holder > 0)
                        snprintf(err, sizeof(err),
                                 "%s: [daemon] state_file %s is in use: lock %.200s is held by PID %ld",
                                 new_cfg->path, new_cfg->state_file, path, (long) holder);
                else if (r < 0)
                        snprintf(err, sizeof(err),
                                 "%s: [daemon] state_file %s cannot be locked (%.200s): %s", new_cfg->path,
                                 new_cfg->state_file, path, strerror(-r));
        }
        /* A new control socket has another path: opened before the old one goes. */
        if (r >= 0 && control_server_needs_restart(m->control, old_cfg, new_cfg)) {
                control_moved = true;
                r = control_server_new(m->event, new_cfg, &manager_notify_callbacks, m, &control);
                if (r < 0)
                        snprintf(err, sizeof(err), "%s: [daemon] control_socket %s cannot be opened: %s",
                                 new_cfg->path, new_cfg->control_socket, strerror(-r));
        }
        if (r >= 0) {
                r = manager_reload_notify(m, old_cfg, new_cfg);
                if (r < 0)
                        snprintf(err, sizeof(err), "%s: [notify] listen %s cannot be opened: %s",
                                 new_cfg->path, new_cfg->notify_listen, strerror(-r));
        }
        if (r < 0) {
                /* Rejected whole: the old configuration stays in force. */
                log_struct(LOG_ERR, 0, MID_CONFIG_REJECTED, &(LogFields){.reason = err},
                           "Configuration rejected, keeping the old one: %s", err);
                config_free(new_cfg);
                control_server_free(control);
                if (new_lock >= 0)
                        close(new_lock);
                (void) sd_notify(false, "READY=1");
                return r;
        }
        if (state_moved) {
                close(m->lock_fd);
                m->lock_fd = new_lock;
        }
        if (control_moved) {
                control_server_free(m->control);
                m->control = control;
        }

        m->config = new_cfg;
        log_setup(new_cfg->log_target, new_cfg->log_level);
        /* The backoff was computed from the old intervals. */
        m->fast_delay_usec = 0;

        /* A round in flight is dropped and restarted below with the new
         * targets and token. */
        poller_abort(m->poller);
        (void) sd_event_source_set_enabled(m->round_deadline, SD_EVENT_OFF);
        (void) poller_reconfigure(m->poller, new_cfg);
        (void) manager_refresh_targets(m);
        (void) settings_writer_reconfigure(m->settings, new_cfg);
        if (m->broker)
                (void) broker_reconfigure(m->broker, new_cfg);
        if (m->updater)
                (void) updater_reconfigure(m->updater, new_cfg);
        sync_reconfigure(&m->sync, new_cfg);
        if (state_moved)
                (void) sync_save_state(&m->sync);
        config_free(old_cfg);

        log_info("Configuration reloaded from %s", new_cfg->path);
        (void) sd_notify(false, "READY=1");
        manager_send_status(m);
        manager_start_round(m);
        return 0;
}
