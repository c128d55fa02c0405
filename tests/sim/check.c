/* The invariants, checked after every step from the simulator's own
 * records (the true history, the fake disk, the rounds it delivered, the
 * configuration it gave): never by asking the core what it thinks. */
#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#include "macro.h"
#include "sim.h"

#define USEC_PER_MINUTE (60 * USEC_PER_SEC)

/* 1: the committed epoch never goes down, in memory or on disk, also
 * across a crash; and memory is never ahead of the disk (state first). */
static void check_epoch(const PersistentState *disk) {
        uint64_t mem = S->running ? S->sync.state.committed.epoch : 0;

        if (disk->committed.epoch < S->max_epoch_disk)
                sim_fail(INV_EPOCH, "state file epoch went down: %" PRIu64 " after %" PRIu64,
                         disk->committed.epoch, S->max_epoch_disk);
        if (S->running && mem < S->max_epoch_mem)
                sim_fail(INV_EPOCH, "committed epoch went down: %" PRIu64 " after %" PRIu64, mem,
                         S->max_epoch_mem);
        if (S->running && mem > disk->committed.epoch)
                sim_fail(INV_EPOCH, "committed epoch %" PRIu64 " is not in the state file (%" PRIu64 ")",
                         mem, disk->committed.epoch);
        if (disk->committed.epoch > S->max_epoch_disk)
                S->max_epoch_disk = disk->committed.epoch;
        if (mem > S->max_epoch_mem)
                S->max_epoch_mem = mem;
}

/* 2: the settings file only ever names a confirmed pair, never ahead of
 * the state file. */
static void check_settings(const PersistentState *disk) {
        Committed f;

        if (S->settings_len < 0)
                return;
        if (fakes_parse_settings(S->settings, &f) < 0) {
                sim_fail(INV_SETTINGS, "the settings file lacks a key:\n%s", S->settings);
                return;
        }
        if (!world_pair_true(&S->w, f.epoch, f.primary.id, f.primary.api_url, &f.broker))
                sim_fail(INV_SETTINGS,
                         "settings file names (%" PRIu64 ", %s, %s:%u %s tls=%d), never confirmed", f.epoch,
                         f.primary.id, f.broker.host, f.broker.port, f.broker.vhost, f.broker.tls);
        if (f.epoch > disk->committed.epoch)
                sim_fail(INV_SETTINGS,
                         "settings file at epoch %" PRIu64 " ahead of the state file (%" PRIu64 ")", f.epoch,
                         disk->committed.epoch);
}

/* 3, the part that lives on disk: the delay is drawn once per version and
 * kept; a version is recorded as applied only after its command succeeded. */
static void check_update_record(const PersistentState *disk) {
        const UpdateRecord *u = &disk->update;
        bool ok = !u->applied_version[0];

        for (size_t i = 0; i < S->n_succeeded && !ok; i++)
                ok = strcmp(S->succeeded[i], u->applied_version) == 0;
        if (!ok)
                sim_fail(INV_UPDATE, "state file records %s as applied, its command never succeeded",
                         u->applied_version);
        if (u->delay_version[0] && strcmp(u->delay_version, S->disk_delay_version) == 0 &&
            u->delay_not_before_usec != S->disk_delay_usec)
                sim_fail(INV_UPDATE, "the delay of %s was drawn again", u->delay_version);
        strscpy(S->disk_delay_version, sizeof(S->disk_delay_version), u->delay_version);
        S->disk_delay_usec = u->delay_not_before_usec;
}

void check_step(void) {
        const PersistentState *disk = &S->disk_state; /* empty while there is no file */

        if (S->failed || S->disk_bad)
                return;
        check_epoch(disk);
        check_settings(disk);
        check_update_record(disk);
}

void check_settings_now(void) {
        if (!S->failed && !S->disk_bad)
                check_settings(&S->disk_state);
}

/* What the round said, kept for the update check. Called before the core
 * sees the complete round, so that a command it starts at once is judged
 * against this round. */
void check_round_done(const PollRound *round) {
        RoundRecord *rec = &S->rounds[S->n_rounds % SIM_ROUNDS_KEPT];

        memset(rec, 0, sizeof(*rec));
        for (int i = 0; i < S->w.n; i++)
                for (size_t j = 0; j < round->n_answers; j++) {
                        const PollAnswer *a = &round->answers[j];
                        if (!a->ok || a->via_load_balancer || strcmp(a->url, S->w.node[i].url) != 0 ||
                            strcmp(a->state.node.id, S->w.node[i].id) != 0)
                                continue;
                        rec->direct[i] = true;
                        strscpy(rec->version[i], sizeof(rec->version[i]), a->state.version);
                        rec->primary_claim[i] = a->state.role == NODE_ROLE_PRIMARY;
                        rec->epoch[i] = a->state.epoch;
                        rec->offer[i] = a->state.update;
                }
        S->n_rounds++;
}

static const RoundRecord *round_back(unsigned k) {
        return &S->rounds[(S->n_rounds - 1 - k) % SIM_ROUNDS_KEPT];
}

static bool window_contains(unsigned start, unsigned end, unsigned m) {
        if (start == end)
                return true;
        if (start < end)
                return m >= start && m < end;
        return m >= start || m < end;
}

/* The offer of the latest complete round: the committed Primary's own
 * answer there, at the committed epoch. */
static bool latest_offer_is(const AgentUpdate *offer) {
        const Committed *c = &S->sync.state.committed;
        const RoundRecord *r = round_back(0);

        for (int i = 0; i < S->w.n; i++) {
                const AgentUpdate *o = &r->offer[i];
                if (strcmp(S->w.node[i].id, c->primary.id) != 0)
                        continue;
                return r->direct[i] && r->primary_claim[i] && r->epoch[i] == c->epoch && o->present &&
                       strcmp(o->version, offer->version) == 0 && strcmp(o->url, offer->url) == 0 &&
                       strcmp(o->sha256, offer->sha256) == 0 && o->size == offer->size;
        }
        return false;
}

static const char *gate_violation(const AgentUpdate *offer) {
        const Config *cfg = sim_config();
        const UpdateRecord *u = &S->sync.state.update;
        uint64_t now = sim_realtime();
        static char why[256];

        if (!cfg->update_enabled)
                return "update disabled in the current config";
        if (S->n_rounds == 0)
                return "no complete round since the start";
        if (!latest_offer_is(offer))
                return "not the offer of the latest complete round";
        if (S->n_rounds < cfg->stable_rounds)
                return "fewer complete rounds than stable_rounds";
        for (unsigned k = 0; k < cfg->stable_rounds; k++)
                for (int i = 0; i < S->w.n; i++) {
                        const RoundRecord *r = round_back(k);
                        if (!r->direct[i] || strcmp(r->version[i], offer->version) != 0) {
                                snprintf(why, sizeof(why), "node %s %s in the complete round -%u",
                                         S->w.node[i].id, r->direct[i] ? r->version[i] : "did not answer",
                                         k);
                                return why;
                        }
                }
        if (cfg->window_set && !window_contains(cfg->window_start_min, cfg->window_end_min,
                                                (unsigned) ((now / USEC_PER_MINUTE) % 1440)))
                return "outside the window";
        if (strcmp(u->delay_version, offer->version) != 0 || now < u->delay_not_before_usec)
                return "the drawn delay has not passed";
        if (fakes_settings_busy(NULL))
                return "a settings change or on_change is in progress";
        for (size_t i = 0; i < S->n_succeeded; i++)
                if (strcmp(S->succeeded[i], offer->version) == 0)
                        return "this version was already applied successfully";
        if (strcmp(u->applied_version, offer->version) == 0)
                return "recorded as applied";
        if (strcmp(S->installed, offer->version) == 0)
                return "already installed";
        return NULL;
}

/* 3: the moment the update command starts, every gate condition holds. */
void check_command_start(const AgentUpdate *offer) {
        const char *why = gate_violation(offer);

        if (why)
                sim_fail(INV_UPDATE, "update command for %s started: %s", offer->version, why);
}

/* The end of a quiet phase: the settled Primary is committed and in the
 * settings file (liveness), and the last successful on_change ran after
 * the last write and saw its content (4). */
void check_quiet(void) {
        const Pair *p = &S->w.hist[S->w.cur];
        const WNode *n = &S->w.node[p->primary];
        const Committed *c = &S->sync.state.committed;
        Committed f;

        if (c->epoch != p->epoch || strcmp(c->primary.id, n->id) != 0 ||
            !broker_info_equal(&c->broker, &p->broker))
                sim_fail(INV_LIVENESS,
                         "settled on (%" PRIu64 ", %s, %s:%u) but committed (%" PRIu64 ", %s, %s:%u)",
                         p->epoch, n->id, p->broker.host, p->broker.port, c->epoch, c->primary.id,
                         c->broker.host, c->broker.port);
        else if (S->settings_len < 0 || fakes_parse_settings(S->settings, &f) < 0 || f.epoch != c->epoch ||
                 !broker_info_equal(&f.broker, &c->broker) || strcmp(f.primary.id, c->primary.id) != 0)
                sim_fail(INV_LIVENESS, "committed epoch %" PRIu64 ", but the settings file does not say it",
                         c->epoch);
        if (S->on_change_set && S->settings_len >= 0 &&
            (S->ok_seq != S->write_seq || memcmp(S->ok_content, S->settings, sizeof(S->settings)) != 0))
                sim_fail(INV_ONCHANGE,
                         "settings write #%" PRIu64
                         " never saw a successful on_change (last success: write #%" PRIu64 ")",
                         S->write_seq, S->ok_seq);
}
