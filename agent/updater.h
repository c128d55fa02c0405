/* The updater: downloads an offered Agent update through libcurl inside the
 * event loop (TLS verified, bearer token to the Provider's own origin only,
 * at most `size` bytes, to a temporary file under download_dir), checks size
 * and sha256 and renames it into place; then it waits (READY) until the
 * manager, having checked the gate again at that moment, asks it to run
 * `command FILE VERSION` through a Runner. A success is recorded in the
 * UpdateRecord it is handed. Failures back off 1 min doubling to 1 h.
 * Never two at once. */
#pragma once

#include <stdbool.h>
#include <stdint.h>
#include <systemd/sd-event.h>

#include "config.h"
#include "gate.h"
#include "provider.h"
#include "state.h"

typedef struct Updater Updater;

typedef enum UpdaterPhase {
        UPDATER_IDLE,
        UPDATER_DOWNLOADING, /* also: checking a kept package again */
        UPDATER_READY,       /* verified and kept; waits for updater_apply() */
        UPDATER_APPLYING,
        UPDATER_FAILED, /* backing off */
} UpdaterPhase;

typedef struct UpdaterCallbacks {
        /* The UpdateRecord changed (applied version, backoff) and must be
         * saved, or an update finished (applied or failed). */
        void (*changed)(Updater *u, void *userdata);
        /* The package of offer is verified and kept (phase READY): the
         * caller checks whether the update may run now and, if so, calls
         * updater_apply(). Nothing runs otherwise. */
        void (*ready)(Updater *u, const AgentUpdate *offer, void *userdata);
} UpdaterCallbacks;

/* record is the updater's part of the persistent state, written by it and
 * saved by the caller on changed(); its backoff is pulled in to at most 1 h
 * from now (see updater_start). callbacks is copied. */
int updater_new(sd_event *e, const Config *cfg, UpdateRecord *record, const UpdaterCallbacks *callbacks,
                void *userdata, Updater **ret);
/* Stops a download (its temporary file removed) or a command (killed). */
Updater *updater_free(Updater *u);
/* Takes a new Config. A download or command in flight keeps the values it
 * started with (they are copied), so the old Config may be freed at once. */
int updater_reconfigure(Updater *u, const Config *cfg);
/* Download limits, for tests and unusual networks. A transfer slower than
 * low_speed_bytes per second for low_speed_time, or longer than total,
 * fails. Defaults: 1024 B/s for 60 s, 1 h in total. */
void updater_set_download_limits(Updater *u, uint64_t low_speed_bytes, usec_t low_speed_time, usec_t total);

/* The largest package accepted: a bigger offer is refused before any byte
 * is downloaded ("download_failed: size N exceeds the limit of M bytes"). */
#define UPDATER_PACKAGE_SIZE_MAX (UINT64_C(2) << 30) /* 2 GiB */

/* Starts the download of offer, which ends in ready() or a failure; nothing
 * runs before updater_apply(). trusted_api_url is the api_url of the
 * Provider the offer came from (the committed Primary's): the provider token
 * is sent only when the offer URL has the same scheme, host and port
 * (80/443 when not given) and no user name or password of its own. A plain
 * http:// offer URL is refused ("download_failed: insecure url") unless
 * trusted_api_url is http:// too; NULL or "" trusts no origin.
 *
 * -EBUSY while downloading or applying (READY is not busy: a start replaces
 * the kept package's offer); -EAGAIN while backing off from a failure of
 * the same version (a backoff more than 1 h away, after the clock stepped
 * back, is first pulled in to 1 h from now and changed() runs); -EINVAL for
 * an offer that cannot be downloaded safely (version not usable in a file
 * name, bad sha256, size 0). An attempt that fails or is refused at once (download_dir
 * not writable, insecure url, size over UPDATER_PACKAGE_SIZE_MAX) is recorded
 * like any failure: changed() runs before this returns 0.
 *
 * Packages of other versions in download_dir are removed. A package of this
 * version kept from an earlier attempt is hashed again (phase DOWNLOADING)
 * and used when its size and sha256 still match; otherwise it is removed
 * and downloaded again. */
int updater_start(Updater *u, const AgentUpdate *offer, const char *trusted_api_url);
/* Runs the command on the verified package: only in phase READY and only
 * for the very offer that was verified (version, url, sha256 and size);
 * otherwise -ESTALE and the package stays kept. A command that cannot be
 * started is recorded like any failure (changed() runs) and 0 returned. */
int updater_apply(Updater *u, const AgentUpdate *offer);
UpdaterPhase updater_phase(const Updater *u);
/* Update commands by outcome: exit 0, or not (a failed start included). */
void updater_applies(const Updater *u, uint64_t *ret_ok, uint64_t *ret_failed);
/* "sha256_mismatch", "command_failed: exit 3", ... for the status; "" none. */
const char *updater_last_error(const Updater *u);
/* Removes leftovers of an interrupted download at start. */
int updater_sweep(const Config *cfg);
/* First line of agent_version_file into buf ("" when missing). */
int updater_read_installed(const Config *cfg, char *buf, size_t size);
