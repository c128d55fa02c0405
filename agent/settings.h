/* The Agent's broker settings file (contract section 5): rendering is pure,
 * writing is atomic and only on change. The SettingsWriter owns the retry
 * timer for failed writes (ENOSPC, EACCES: the old file stays intact) and
 * the on_change run, coalescing changes that arrive while it runs into one
 * more run for the latest state. That a run is owed is kept on disk too
 * ("<dir>/.<basename>.on_change-pending", next to the settings file), so a
 * run lost to a stop or crash happens after the next start. */
#pragma once

#include <stdbool.h>
#include <stdint.h>
#include <systemd/sd-event.h>

#include "config.h"
#include "rule.h"

#define SETTINGS_MAX 8192

/* Renders the exact file of contract section 5. Returns length, -ENOBUFS,
 * or -EINVAL when a value holds a control character (it would inject a
 * line). */
int settings_render(const Committed *c, char *buf, size_t size);

typedef struct SettingsWriter SettingsWriter;
typedef struct Runner Runner;

/* Sweeps leftover temporary files and notes an on_change run owed from
 * before the start (the marker file); it runs on the first apply. */
int settings_writer_new(sd_event *e, const Config *cfg, SettingsWriter **ret);
/* Stops a running on_change (SIGTERM, up to 5 s, then SIGKILL: blocks, for
 * the shutdown only). A run still owed stays recorded for the next start. */
SettingsWriter *settings_writer_free(SettingsWriter *w);

/* Makes the file describe c (epoch >= 1, else -EINVAL): writes it if its
 * content (or mode) differs, then runs on_change when the content changed,
 * or when a run was owed at the last stop (even if the file matches). A
 * rename whose directory fsync failed counts as written (logged). Failures
 * are logged and retried with backoff; returns 0 when written or
 * unchanged, or the negative errno of the failed write (a retry is already
 * scheduled). */
int settings_writer_apply(SettingsWriter *w, const Committed *c);

/* A new Config (SIGHUP): rewrites at once if path, mode or content differ. */
int settings_writer_reconfigure(SettingsWriter *w, const Config *cfg);

/* Called when a rewrite is complete: the file describes c (written at
 * written_at, CLOCK_REALTIME) and on_change succeeded for it, or none is
 * set. Once per rewrite; a newer change supersedes a run still owed. */
typedef void (*SettingsConvergedFn)(const Committed *c, uint64_t written_at, void *userdata);
void settings_writer_set_converged(SettingsWriter *w, SettingsConvergedFn fn, void *userdata);

/* True while a write is pending a retry or on_change runs or is owed. */
bool settings_writer_busy(const SettingsWriter *w);
/* The last write error (negative errno) or 0; for STATUS= and status. */
int settings_writer_error(const SettingsWriter *w);
/* on_change runs by outcome; one that could not start counts as failed. */
void settings_writer_runs(const SettingsWriter *w, uint64_t *ret_ok, uint64_t *ret_failed);
