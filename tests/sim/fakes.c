/* The fakes behind SyncIO, at the module boundaries of the real daemon:
 * the disk (the state file as the bytes state_format produces, the
 * settings file as settings_render writes it, the on_change-owed marker,
 * the kept package, the installed version), the settings writer's
 * on_change child, the broker connection and the updater. Each effect is
 * also a place where the process may die (a longjmp back to the scheduler);
 * what survives a crash is exactly what a real one would leave on disk. */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "macro.h"
#include "sim.h"
#include "util.h"

#define SEC  USEC_PER_SEC
#define MSEC USEC_PER_MSEC

void fakes_crash_point(const char *where) {
        if (!S->crash_armed || !S->faults || !rng_permille(&S->effect_rng, S->p_crash_effect))
                return;
        sim_log("CRASH at %s", where);
        longjmp(S->crash_jmp, 1);
}

static uint64_t fake_now(void *userdata, clockid_t clock) {
        return clock == CLOCK_REALTIME ? sim_realtime() : S->mono;
}

/* ---- the state file ---- */

/* A state_save that did not return is on disk whole or not at all: the
 * crash comes before the rename or after it. */
static int fake_state_save(void *userdata, const PersistentState *s) {
        char *json = NULL, err[256];
        int r;

        fakes_crash_point("state_save (not written)");
        if (S->faults && rng_permille(&S->effect_rng, S->p_save_fail)) {
                sim_log("state_save fails (EIO)");
                return -EIO;
        }
        r = state_format(s, &json);
        if (r < 0)
                return r;
        free(S->state_bytes);
        S->state_bytes = json;
        S->state_len = strlen(json);
        /* What a restart would read, parsed once here rather than at every check. */
        S->disk_bad = state_parse(json, S->state_len, &S->disk_state, err, sizeof(err)) < 0;
        if (S->disk_bad)
                sim_fail(INV_EPOCH, "the state file just written does not parse: %s", err);
        sim_log("state saved: epoch %" PRIu64 " %s, applied '%s', delay '%s'", s->committed.epoch,
                s->committed.primary.id, s->update.applied_version, s->update.delay_version);
        fakes_crash_point("state_save (written, not returned)");
        return 0;
}

/* ---- the settings writer and on_change ---- */

bool fakes_settings_busy(void *userdata) {
        return S->sw_owed || S->sw_running || S->sw_recover;
}

static void run_start(void) {
        S->sw_owed = false;
        S->sw_running = true;
        S->run_seq = S->write_seq;
        memcpy(S->run_content, S->settings, sizeof(S->settings));
        sim_schedule(rng_range(&S->effect_rng, 10 * MSEC, 3 * SEC), EV_ONCHANGE, true, 0);
}

static void run_request(void) {
        S->sw_recover = false;
        if (!S->on_change_set)
                return;
        S->sw_owed = true;
        S->sw_failures = 0;
        if (!S->sw_running)
                run_start();
}

void fakes_onchange_done(void) {
        S->sw_running = false;
        if (S->faults && rng_permille(&S->effect_rng, S->p_onchange_fail)) {
                sim_log("on_change fails");
                if (S->sw_owed) {
                        run_start(); /* superseded by a newer change */
                        return;
                }
                S->sw_owed = true;
                S->sw_failures++;
                sim_schedule(backoff_usec(SEC, 60 * SEC, S->sw_failures), EV_ONCHANGE_RETRY, true, 0);
                return;
        }
        S->ok_seq = S->run_seq;
        memcpy(S->ok_content, S->run_content, sizeof(S->ok_content));
        S->onchange_ok++;
        sim_log("on_change succeeded (write #%" PRIu64 ")", S->run_seq);
        if (S->sw_owed)
                run_start();
        else
                S->marker = false;
}

void fakes_onchange_retry(void) {
        if (S->sw_owed && !S->sw_running)
                run_start();
}

/* As the real SettingsWriter: the marker is durable before the rename, so
 * a crash right after the rename still owes the run. */
void fakes_settings_apply(void *userdata, const Committed *c) {
        char buf[SETTINGS_MAX];
        int n;

        fakes_crash_point("settings_apply (nothing written)");
        memset(buf, 0, sizeof(buf));
        n = settings_render(c, buf, sizeof(buf));
        if (n < 0) {
                sim_fail(INV_SETTINGS, "settings_render refused epoch %" PRIu64 ": %d", c->epoch, n);
                return;
        }
        if (S->settings_len == n && memcmp(S->settings, buf, (size_t) n) == 0) {
                if (S->sw_recover)
                        run_request();
                return;
        }
        if (S->on_change_set) {
                S->marker = true;
                fakes_crash_point("settings_apply (marker set, file old)");
        }
        memcpy(S->settings, buf, sizeof(buf));
        S->settings_len = n;
        S->write_seq++;
        S->writes++;
        sim_log("settings file #%" PRIu64 ": epoch %" PRIu64 " %s %s:%u", S->write_seq, c->epoch,
                c->primary.id, c->broker.host, c->broker.port);
        check_settings_now(); /* the file is checked the moment it is written */
        fakes_crash_point("settings_apply (file written, on_change not started)");
        run_request();
}

/* ---- the broker ---- */

void fakes_broker_move(void *userdata, const BrokerInfo *target) {
        bool known = false;

        fakes_crash_point("broker_move");
        for (int k = 0; k < S->w.n_hist && !known; k++)
                known = broker_info_equal(&S->w.hist[k].broker, target);
        if (!known)
                sim_fail(INV_SETTINGS, "broker credentials sent to %s:%u, no confirmed Primary's broker",
                         target->host, target->port);
        S->broker_target = *target;
        S->have_broker_target = true;
}

static void fake_read_installed(void *userdata, char *buf, size_t size) {
        strscpy(buf, size, S->installed);
}

/* ---- the updater ---- */

static UpdaterPhase fake_update_phase(void *userdata) {
        return S->up_phase;
}

static bool offer_same(const AgentUpdate *a, const AgentUpdate *b) {
        return a->present == b->present && strcmp(a->version, b->version) == 0 &&
               strcmp(a->url, b->url) == 0 && strcmp(a->sha256, b->sha256) == 0 && a->size == b->size;
}

static void record_failure(const char *why) {
        UpdateRecord *u = &S->sync.state.update;

        if (strcmp(u->failed_version, S->up_offer.version) != 0)
                u->failures = 0;
        strscpy(u->failed_version, sizeof(u->failed_version), S->up_offer.version);
        u->failures++;
        u->retry_not_before_usec = sim_realtime() + backoff_usec(60 * SEC, 3600 * SEC, u->failures);
        S->up_phase = UPDATER_FAILED;
        sim_log("update %s: %s (failure %u)", S->up_offer.version, why, u->failures);
        sync_update_changed(&S->sync);
}

static int fake_update_fetch(void *userdata, const AgentUpdate *offer, const char *trusted_api_url) {
        const UpdateRecord *u = &S->sync.state.update;
        bool kept = S->have_package && offer_same(&S->package, offer);

        fakes_crash_point("update_fetch");
        if (S->up_phase == UPDATER_DOWNLOADING || S->up_phase == UPDATER_APPLYING)
                return -EBUSY;
        if (S->up_phase == UPDATER_FAILED && strcmp(u->failed_version, offer->version) == 0 &&
            sim_realtime() < u->retry_not_before_usec)
                return -EAGAIN;
        S->up_phase = UPDATER_DOWNLOADING;
        S->up_offer = *offer;
        S->downloads++;
        sim_log("update %s: %s", offer->version, kept ? "checking the kept package" : "download starts");
        sim_schedule(kept                                ? rng_range(&S->effect_rng, 50 * MSEC, 500 * MSEC)
                     : rng_permille(&S->effect_rng, 500) ? rng_range(&S->effect_rng, 100 * MSEC, 10 * SEC)
                                                         : rng_range(&S->effect_rng, 10 * SEC, 600 * SEC),
                     EV_DOWNLOAD, true, 0);
        return 0;
}

void fakes_download_done(void) {
        if (S->faults && rng_permille(&S->effect_rng, S->p_download_fail)) {
                S->have_package = false;
                record_failure("download_failed");
                return;
        }
        S->have_package = true;
        S->package = S->up_offer;
        S->up_phase = UPDATER_READY;
        sim_log("update %s: verified and kept (ready)", S->up_offer.version);
        sync_update_ready(&S->sync, &S->package);
}

static int fake_update_apply(void *userdata, const AgentUpdate *offer) {
        fakes_crash_point("update_apply");
        if (S->up_phase != UPDATER_READY || !offer_same(&S->package, offer))
                return -ESTALE;
        check_command_start(offer);
        S->up_phase = UPDATER_APPLYING;
        S->applies++;
        sim_log("update %s: COMMAND STARTS", offer->version);
        sim_schedule(rng_range(&S->effect_rng, SEC, 300 * SEC), EV_COMMAND, true, 0);
        return 0;
}

static void command_succeeded(void) {
        strscpy(S->installed, sizeof(S->installed), S->up_offer.version);
        if (S->n_succeeded < ELEMENTSOF(S->succeeded))
                strscpy(S->succeeded[S->n_succeeded++], sizeof(S->succeeded[0]), S->up_offer.version);
        S->have_package = false;
}

void fakes_command_done(void) {
        UpdateRecord *u = &S->sync.state.update;

        if (S->faults && rng_permille(&S->effect_rng, S->p_command_fail)) {
                record_failure("command_failed: exit 1");
                return;
        }
        command_succeeded();
        strscpy(u->applied_version, sizeof(u->applied_version), S->up_offer.version);
        u->failed_version[0] = 0;
        u->failures = 0;
        u->retry_not_before_usec = 0;
        S->up_phase = UPDATER_IDLE;
        sim_log("update %s: applied", S->up_offer.version);
        sync_update_changed(&S->sync);
}

/* ---- crash and restart ---- */

/* The process died: on_change dies with it (still owed: the marker says
 * so); the update command is a unit of its own and may finish anyway. */
void fakes_crash(void) {
        S->crashes++;
        if (S->up_phase == UPDATER_APPLYING && rng_permille(&S->effect_rng, 500)) {
                command_succeeded();
                sim_log("the update command of %s finished after the crash", S->up_offer.version);
        }
}

void fakes_restart(void) {
        S->sw_running = S->sw_owed = false;
        S->sw_failures = 0;
        S->sw_recover = S->marker && S->on_change_set;
        if (S->marker && !S->on_change_set)
                S->marker = false;
        S->up_phase = UPDATER_IDLE;
        S->have_broker_target = false;
}

void fakes_io(SyncIO *io) {
        *io = (SyncIO){
                .now = fake_now,
                .state_save = fake_state_save,
                .settings_apply = fakes_settings_apply,
                .settings_busy = fakes_settings_busy,
                .broker_move = fakes_broker_move,
                .read_installed = fake_read_installed,
                .update_phase = fake_update_phase,
                .update_fetch = fake_update_fetch,
                .update_apply = fake_update_apply,
        };
}

/* An independent reading of the settings file: the keys of contract 5. */
int fakes_parse_settings(const char *text, Committed *ret) {
        char line[512];
        unsigned seen = 0;

        *ret = (Committed){};
        for (const char *p = text; *p;) {
                size_t n = strcspn(p, "\n");
                char key[32], value[300];

                snprintf(line, sizeof(line), "%.*s", (int) n, p);
                p += n + (p[n] == '\n');
                if (sscanf(line, "%31s = %299[^\n]", key, value) != 2)
                        continue;
                if (strcmp(key, "host") == 0 && (seen |= 1))
                        strscpy(ret->broker.host, sizeof(ret->broker.host), value);
                else if (strcmp(key, "port") == 0 && (seen |= 2))
                        ret->broker.port = (uint16_t) strtoul(value, NULL, 10);
                else if (strcmp(key, "vhost") == 0 && (seen |= 4))
                        strscpy(ret->broker.vhost, sizeof(ret->broker.vhost), value);
                else if (strcmp(key, "tls") == 0 && (seen |= 8))
                        ret->broker.tls = strcmp(value, "true") == 0;
                else if (strcmp(key, "primary_id") == 0 && (seen |= 16))
                        strscpy(ret->primary.id, sizeof(ret->primary.id), value);
                else if (strcmp(key, "epoch") == 0 && (seen |= 32))
                        ret->epoch = strtoull(value, NULL, 10);
                else if (strcmp(key, "api_url") == 0 && (seen |= 64))
                        strscpy(ret->primary.api_url, sizeof(ret->primary.api_url), value);
        }
        return seen == 127 ? 0 : -EBADMSG;
}
