/* The simulated Provider cluster: a true history of promotions, what each
 * node believes (replication lag, a dead node coming back with its old
 * view, an old Primary that does not know it was replaced), a rare
 * conflict, a lying Standby, Provider updates node by node and the offer.
 * Driven only by its own random stream, never by what the daemon does. */
#include <stdio.h>
#include <string.h>

#include "macro.h"
#include "sim.h"

uint64_t rng_next(Rng *r) {
        uint64_t z = (r->s += 0x9e3779b97f4a7c15ULL);

        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
        return z ^ (z >> 31);
}

uint64_t rng_below(Rng *r, uint64_t n) {
        return rng_next(r) % n;
}

uint64_t rng_range(Rng *r, uint64_t lo, uint64_t hi) {
        return lo + rng_below(r, hi - lo + 1);
}

bool rng_permille(Rng *r, unsigned p) {
        return rng_below(r, 1000) < p;
}

static void broker_of(const World *w, int node, BrokerInfo *b, bool tls) {
        *b = (BrokerInfo){.port = 5671, .tls = tls};
        snprintf(b->host, sizeof(b->host), "%s.example", w->node[node].id);
        strscpy(b->vhost, sizeof(b->vhost), "/dsm");
}

static int hist_add(World *w, uint64_t epoch, int primary, const BrokerInfo *b) {
        if (w->n_hist == W_MAX_HIST) /* a long run forgets nothing it may be asked about: keep the last */
                return w->n_hist - 1;
        w->hist[w->n_hist] = (Pair){.epoch = epoch, .primary = primary, .broker = *b};
        return w->n_hist++;
}

static void make_offer(World *w, Rng *r, unsigned vnum) {
        AgentUpdate *o = &w->offer;

        w->offer_seq++;
        *o = (AgentUpdate){.present = true, .size = 1000 + w->offer_seq};
        snprintf(o->version, sizeof(o->version), "9.0.%u", vnum);
        snprintf(o->url, sizeof(o->url), "https://dsm.example:8443/api/v1/agent/packages/9.0.%u?b=%u", vnum,
                 w->offer_seq);
        for (size_t i = 0; i < SHA256_HEX_LEN; i++)
                o->sha256[i] = "0123456789abcdef"[rng_below(r, 16)];
        o->sha256[SHA256_HEX_LEN] = 0;
}

static unsigned offer_vnum(const World *w) {
        unsigned v = 0;

        if (w->offer.version[0])
                (void) sscanf(w->offer.version, "9.0.%u", &v);
        return v;
}

/* The offer follows the current Primary (and a conflicting second claimer
 * keeps what it had). */
static void publish_offer(World *w) {
        w->node[w->hist[w->cur].primary].offer = w->offer;
}

/* A lying Standby's pair: a Primary that was never promoted (one epoch or
 * two ahead, an existing node or an unknown one), or the true current pair
 * with a broker of its own making; always with a nodes list that makes
 * it look alone. It never claims primary for itself. */
static void fabricate(World *w, Rng *r, WNode *liar) {
        const Pair *cur = &w->hist[w->cur];
        int other = (int) rng_below(r, (uint64_t) w->n + 1) - 1;

        if (other >= 0 && &w->node[other] == liar)
                other = -1;
        liar->fake = (Pair){.epoch = cur->epoch + 1 + rng_below(r, 2), .primary = other};
        if (&w->node[cur->primary] != liar && rng_permille(r, w->liar_persistent ? 500 : 300))
                liar->fake = (Pair){.epoch = cur->epoch, .primary = cur->primary};
        liar->fake.broker = (BrokerInfo){.port = 5671, .tls = false};
        strscpy(liar->fake.broker.host, sizeof(liar->fake.broker.host), "evil.example");
        strscpy(liar->fake.broker.vhost, sizeof(liar->fake.broker.vhost), "/dsm");
        liar->nodes_mode = 2 + (int) rng_below(r, 2); /* empty or self only */
}

void world_init(World *w, Rng *r) {
        static const unsigned sizes[] = {2, 3, 3, 3, 4, 4, 4};
        BrokerInfo b;
        int p;

        *w = (World){.n = (int) sizes[rng_below(r, ELEMENTSOF(sizes))], .version_seq = 1};
        for (int i = 0; i < w->n; i++) {
                snprintf(w->node[i].id, sizeof(w->node[i].id), "p%d", i + 1);
                snprintf(w->node[i].url, sizeof(w->node[i].url), "https://p%d.example:8443", i + 1);
                w->node[i].alive = true;
                strscpy(w->node[i].version, sizeof(w->node[i].version), "9.0.1");
        }
        strscpy(w->target_version, sizeof(w->target_version), "9.0.1");
        p = (int) rng_below(r, (uint64_t) w->n);
        broker_of(w, p, &b, rng_permille(r, 700));
        w->cur = hist_add(w, 1 + rng_below(r, 5), p, &b);
        w->node[p].claims_primary = true;
        if (rng_permille(r, 500))
                make_offer(w, r, 1);
        publish_offer(w);
        w->has_liar = w->n >= 2 && rng_permille(r, 350);
        if (w->has_liar) {
                int l = (p + 1 + (int) rng_below(r, (uint64_t) w->n - 1)) % w->n;
                w->node[l].liar = true;
                /* A hostile node that lies all the time, not only now and then. */
                w->liar_persistent = w->lying = rng_permille(r, 400);
                fabricate(w, r, &w->node[l]);
        }
}

static int pick(const World *w, Rng *r, bool (*ok)(const World *, int)) {
        int cand[W_MAX_NODES], n = 0;

        for (int i = 0; i < w->n; i++)
                if (ok(w, i))
                        cand[n++] = i;
        return n ? cand[rng_below(r, (uint64_t) n)] : -1;
}

static bool is_alive_standby(const World *w, int i) {
        return w->node[i].alive && !w->node[i].claims_primary;
}
static bool is_alive(const World *w, int i) {
        return w->node[i].alive;
}
static bool is_dead(const World *w, int i) {
        return !w->node[i].alive;
}
static bool is_behind(const World *w, int i) {
        const WNode *n = &w->node[i];
        /* a Standby that lags, or a claimer that is not the current Primary */
        return n->alive && (n->view != w->cur || (n->claims_primary && w->hist[w->cur].primary != i));
}
static bool is_outdated(const World *w, int i) {
        return strcmp(w->node[i].version, w->target_version) != 0;
}

static void promote(World *w, Rng *r, bool faults) {
        int c = pick(w, r, is_alive_standby), d = -1;
        uint64_t epoch = w->hist[w->cur].epoch + 1;
        BrokerInfo b;

        if (c < 0)
                return;
        /* The old Primary: alive and unaware for a while (a stale Primary
         * once it answers), or demoted at once (then it lags). */
        for (int i = 0; i < w->n; i++)
                if (w->node[i].claims_primary && !(faults && w->node[i].alive && rng_permille(r, 500)))
                        w->node[i].claims_primary = false;
        if (faults && rng_permille(r, 70)) {
                d = pick(w, r, is_alive_standby);
                if (d == c)
                        d = -1;
        }
        if (d >= 0) { /* two nodes promoted at one epoch: a conflict */
                broker_of(w, d, &b, rng_permille(r, 700));
                w->node[d].view = hist_add(w, epoch, d, &b);
                w->node[d].claims_primary = true;
        }
        w->conflicted = d >= 0;
        broker_of(w, c, &b, rng_permille(r, 700));
        w->cur = hist_add(w, epoch, c, &b);
        w->node[c].view = w->cur;
        w->node[c].claims_primary = true;
        w->node[c].nodes_mode = 0;
        publish_offer(w);
        for (int i = 0; i < w->n; i++)
                if (w->node[i].liar)
                        fabricate(w, r, &w->node[i]);
}

static void change_broker(World *w, Rng *r) {
        const Pair *p = &w->hist[w->cur];
        BrokerInfo b = p->broker;
        int primary = p->primary;

        if (w->conflicted)
                return;
        switch (rng_below(r, 3)) {
        case 0:
                b.port = b.port == 5671 ? 5672 : 5671;
                break;
        case 1:
                b.tls = !b.tls;
                break;
        default:
                strscpy(b.vhost, sizeof(b.vhost), strcmp(b.vhost, "/dsm") == 0 ? "/dsm2" : "/dsm");
        }
        w->cur = hist_add(w, p->epoch, primary, &b);
        w->node[primary].view = w->cur;
}

static void catch_up(World *w, int i) {
        WNode *n = &w->node[i];

        if (n->claims_primary && w->hist[w->cur].primary != i) {
                n->claims_primary = false; /* learns it was replaced (or loses a conflict) */
                w->conflicted = false;
        }
        n->view = w->cur;
}

static void provider_update_step(World *w, Rng *r) {
        int primary = w->hist[w->cur].primary, i;

        if (pick(w, r, is_outdated) < 0) { /* all current: the next version starts at the Primary */
                w->version_seq++;
                snprintf(w->target_version, sizeof(w->target_version), "9.0.%u", w->version_seq);
                strscpy(w->node[primary].version, sizeof(w->node[primary].version), w->target_version);
                return;
        }
        i = pick(w, r, is_outdated);
        strscpy(w->node[i].version, sizeof(w->node[i].version), w->target_version);
}

static void change_offer(World *w, Rng *r) {
        unsigned v = offer_vnum(w);

        switch (rng_below(r, 4)) {
        case 0: /* withdrawn */
                w->offer.present = false;
                break;
        case 1: /* the same version, rebuilt (another url and sha256) */
                make_offer(w, r, v ? v : w->version_seq);
                break;
        default: /* the newest Provider version (versions never go back) */
                make_offer(w, r, w->version_seq > v ? w->version_seq : v);
        }
        publish_offer(w);
}

void world_tick(World *w, Rng *r, bool faults) {
        unsigned roll = (unsigned) rng_below(r, 100);
        int i;

        if (roll < 12)
                promote(w, r, faults);
        else if (roll < 15)
                change_broker(w, r);
        else if (roll < 25) {
                if (faults && (i = pick(w, r, is_alive)) >= 0)
                        w->node[i].alive = false;
        } else if (roll < 37) {
                if ((i = pick(w, r, is_dead)) >= 0)
                        w->node[i].alive = true; /* with the view it had */
        } else if (roll < 62) {
                if ((i = pick(w, r, is_behind)) >= 0)
                        catch_up(w, i);
        } else if (roll < 77)
                provider_update_step(w, r);
        else if (roll < 87)
                change_offer(w, r);
        else if (roll < 93) {
                if (faults && w->has_liar) {
                        w->lying = !w->lying || w->liar_persistent;
                        for (i = 0; i < w->n; i++)
                                if (w->node[i].liar)
                                        fabricate(w, r, &w->node[i]);
                }
        } else if (roll < 98) {
                i = (int) rng_below(r, (uint64_t) w->n);
                if (faults && !w->node[i].claims_primary && !w->node[i].liar)
                        w->node[i].nodes_mode = (int) rng_below(r, 4);
        }
        /* otherwise a quiet tick */
}

void world_catch_up_all(World *w) {
        for (int i = 0; i < w->n; i++) {
                catch_up(w, i);
                w->node[i].nodes_mode = 0;
        }
        w->conflicted = false;
}

/* Faults off: every node up and caught up, the liar honest. Two nodes that
 * claimed one epoch leave a pair no rule can move past: the operator
 * promotes once more, as the product documentation tells them to. */
void world_settle(World *w, Rng *r) {
        const Pair *cur = &w->hist[w->cur];

        for (int i = 0; i < w->n; i++)
                w->node[i].alive = true;
        w->lying = false;
        for (int k = 0; k < w->n_hist; k++)
                if (w->hist[k].epoch == cur->epoch && w->hist[k].primary != cur->primary) {
                        world_catch_up_all(w);
                        promote(w, r, false);
                        break;
                }
        world_catch_up_all(w);
}

bool world_pair_true(const World *w, uint64_t epoch, const char *primary_id, const char *api_url,
                     const BrokerInfo *b) {
        for (int k = 0; k < w->n_hist; k++) {
                const Pair *p = &w->hist[k];
                const WNode *n = &w->node[p->primary];

                if (p->epoch == epoch && strcmp(n->id, primary_id) == 0 && strcmp(n->url, api_url) == 0 &&
                    broker_info_equal(&p->broker, b))
                        return true;
        }
        return false;
}

int world_node_by_url(const World *w, const char *url) {
        for (int i = 0; i < w->n; i++)
                if (strcmp(w->node[i].url, url) == 0)
                        return i;
        return -1;
}

static void noderef(NodeRef *ref, const char *id, const char *url) {
        strscpy(ref->id, sizeof(ref->id), id);
        strscpy(ref->api_url, sizeof(ref->api_url), url);
}

static void answer_of(const World *w, int k, ProviderState *s) {
        const WNode *n = &w->node[k];
        int mode = n->claims_primary ? 0 : n->nodes_mode;

        memset(s, 0, sizeof(*s));
        noderef(&s->node, n->id, n->url);
        s->role = n->claims_primary ? NODE_ROLE_PRIMARY : NODE_ROLE_STANDBY;
        strscpy(s->version, sizeof(s->version), n->version);
        if (n->liar && w->lying && !n->claims_primary) {
                s->epoch = n->fake.epoch;
                if (n->fake.primary >= 0)
                        noderef(&s->primary, w->node[n->fake.primary].id, w->node[n->fake.primary].url);
                else
                        noderef(&s->primary, "px", "https://px.example:8443");
                s->broker = n->fake.broker;
        } else {
                const Pair *p = &w->hist[n->view];
                s->epoch = p->epoch;
                noderef(&s->primary, w->node[p->primary].id, w->node[p->primary].url);
                s->broker = p->broker;
        }
        for (int i = 0; i < w->n; i++) {
                bool self = i == k;
                if (mode == 2 || (mode == 3 && !self) || (mode == 1 && !self && i == (k + 1) % w->n))
                        continue;
                noderef(&s->nodes[s->n_nodes++], w->node[i].id, w->node[i].url);
        }
        if (n->claims_primary)
                s->update = n->offer;
}

bool world_answer(const World *w, Rng *r, const char *url, ProviderState *ret) {
        int k;

        if (strcmp(url, W_LB_URL) == 0) {
                int live[W_MAX_NODES], n = 0;
                for (int i = 0; i < w->n; i++)
                        if (w->node[i].alive)
                                live[n++] = i;
                if (n == 0)
                        return false;
                answer_of(w, live[rng_below(r, (uint64_t) n)], ret);
                return true;
        }
        k = world_node_by_url(w, url);
        if (k < 0 || !w->node[k].alive)
                return false;
        answer_of(w, k, ret);
        return true;
}

void world_describe(const World *w, char *buf, size_t size) {
        const Pair *p = &w->hist[w->cur];
        size_t len;

        len = (size_t) snprintf(buf, size, "true=(%llu,%s,%s:%u%s%s) offer=%s |",
                                (unsigned long long) p->epoch, w->node[p->primary].id, p->broker.host,
                                p->broker.port, p->broker.tls ? ",tls" : "",
                                w->conflicted ? " CONFLICT" : "", w->offer.present ? w->offer.version : "-");
        for (int i = 0; i < w->n && len < size; i++) {
                const WNode *n = &w->node[i];
                len += (size_t) snprintf(buf + len, size - len, " %s%s%s@%llu/%s v%s%s", n->id,
                                         n->alive ? "" : "(dead)", n->claims_primary ? "*" : "",
                                         (unsigned long long) w->hist[n->view].epoch,
                                         w->node[w->hist[n->view].primary].id, n->version + 4,
                                         n->liar && w->lying ? " LIAR" : "");
        }
}
