/* The local control socket ([daemon] control_socket), as chronyc has one:
 * the notify listener's routes (status, notify) served as HTTP on an
 * AF_UNIX socket. The file's mode (0660) and group (the daemon's) decide
 * who may connect, root and the service group, so a local caller needs
 * no token. Owns the socket file: replaces a stale one a crash left
 * behind, never one a live daemon listens on, and removes its own at
 * stop. */
#pragma once

#include <stdbool.h>
#include <systemd/sd-event.h>

#include "config.h"
#include "notify.h"

typedef struct ControlServer ControlServer;

/* Listens on cfg->control_socket; 0 with *ret NULL when it is off. The
 * socket accepts connections once this returns. */
int control_server_new(sd_event *e, const Config *cfg, const NotifyCallbacks *cb, void *userdata,
                       ControlServer **ret);
/* Stops listening and removes the socket file while it is still ours. */
ControlServer *control_server_free(ControlServer *s);

/* True when new_cfg needs a new socket: another path, turned on or off,
 * or the file was removed or replaced under s (a SIGHUP makes it anew).
 * The new one can be opened before s is freed: the paths differ or the
 * file is not s's any more. */
bool control_server_needs_restart(const ControlServer *s, const Config *old_cfg, const Config *new_cfg);
