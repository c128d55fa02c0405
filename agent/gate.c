/* The Agent update gate (contract section 8). Pure: the verdict depends only
 * on the GateInput, so the tests can drive every reason from a table. The
 * checks run in a fixed order and the first one that fails gives the
 * verdict, so an operator always sees the most fundamental obstacle. */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gate.h"
#include "macro.h"

#define MINUTES_PER_DAY 1440U
#define USEC_PER_MINUTE (60 * USEC_PER_SEC)

/* A reason under construction. Appending stops at the first entry that
 * does not fit, so a truncated reason still ends on a whole entry. */
typedef struct Reason {
        char *buf;
        size_t size, len;
        bool full;
} Reason;

static void reason_init(Reason *r, char *buf, size_t size, const char *prefix) {
        *r = (Reason){.buf = buf, .size = size};
        buf[0] = 0;
        if (strscpy(buf, size, prefix) == 0)
                r->len = strlen(prefix);
}

_printf_(2, 3) static void reason_append(Reason *r, const char *fmt, ...) {
        va_list ap;
        int n;

        if (r->full)
                return;
        va_start(ap, fmt);
        n = vsnprintf(r->buf + r->len, r->size - r->len, fmt, ap);
        va_end(ap);
        if (n < 0 || (size_t) n >= r->size - r->len) {
                r->buf[r->len] = 0; /* drop the partial entry */
                r->full = true;
                return;
        }
        r->len += (size_t) n;
}

static void result_set(GateResult *ret, GateState state, const char *fmt, ...) _printf_(3, 4);
static void result_set(GateResult *ret, GateState state, const char *fmt, ...) {
        va_list ap;

        ret->state = state;
        va_start(ap, fmt);
        vsnprintf(ret->reason, sizeof(ret->reason), fmt, ap);
        va_end(ap);
}

static int node_cmp(const void *a, const void *b) {
        const GateNode *const *x = a, *const *y = b;
        return strcmp((*x)->id, (*y)->id);
}

/* Pointers to the input's nodes sorted by id, so reasons are stable from
 * one round to the next whatever order the Primary listed them in (the
 * manager logs MID_UPDATE_HELD only when the reason text changes). */
static size_t nodes_sorted(const GateInput *in, const GateNode *out[static GATE_MAX_NODES]) {
        size_t n = in->n_nodes < GATE_MAX_NODES ? in->n_nodes : GATE_MAX_NODES;

        for (size_t i = 0; i < n; i++)
                out[i] = &in->nodes[i];
        qsort(out, n, sizeof(out[0]), node_cmp);
        return n;
}

/* A list reason ("node_unreachable: p3") holds the update when it names
 * anyone; otherwise it is cleared. */
static bool held_if(bool any, GateResult *ret) {
        if (any)
                ret->state = GATE_HELD;
        else
                ret->reason[0] = 0;
        return any;
}

/* "node_unreachable: p2, p3" when any node did not answer at its own
 * api_url. An answer that only came through the load balancer says nothing
 * about which node ran it, so it does not count. */
static bool check_unreachable(const GateNode *const *nodes, size_t n, GateResult *ret) {
        Reason r;
        bool any = false;

        reason_init(&r, ret->reason, sizeof(ret->reason), "node_unreachable: ");
        for (size_t i = 0; i < n; i++) {
                if (nodes[i]->answered_direct)
                        continue;
                reason_append(&r, "%s%s", any ? ", " : "", nodes[i]->id);
                any = true;
        }
        return held_if(any, ret);
}

/* "version_skew: p3=9.0.0": every node whose version is not the offered
 * one. That covers both a cluster half-way through an update and a cluster
 * that agrees on a version other than the offer (the offer is then not
 * what the cluster runs, so it is held as well). */
static bool check_skew(const GateNode *const *nodes, size_t n, const char *offered, GateResult *ret) {
        Reason r;
        bool any = false;

        reason_init(&r, ret->reason, sizeof(ret->reason), "version_skew: ");
        for (size_t i = 0; i < n; i++) {
                if (strcmp(nodes[i]->version, offered) == 0)
                        continue;
                reason_append(&r, "%s%s=%s", any ? ", " : "", nodes[i]->id, nodes[i]->version);
                any = true;
        }
        return held_if(any, ret);
}

bool gate_window_contains(unsigned start_min, unsigned end_min, unsigned m) {
        start_min %= MINUTES_PER_DAY;
        end_min %= MINUTES_PER_DAY;
        m %= MINUTES_PER_DAY;

        /* "22:00-22:00" would be an empty window that silently blocks every
         * update forever; read it as the whole day instead. */
        if (start_min == end_min)
                return true;
        if (start_min < end_min)
                return m >= start_min && m < end_min;
        return m >= start_min || m < end_min; /* wraps past midnight */
}

void gate_evaluate(const GateInput *in, GateResult *ret) {
        const GateNode *nodes[GATE_MAX_NODES];
        const char *offered;
        size_t n;

        *ret = (GateResult){.state = GATE_OPEN};

        if (!in->enabled) {
                ret->state = GATE_DISABLED;
                return;
        }
        if (!in->offer || !in->offer->present || in->offer->version[0] == 0) {
                ret->state = GATE_NONE;
                return;
        }
        offered = in->offer->version;
        if (streq_ptr(offered, in->installed) || streq_ptr(offered, in->applied)) {
                ret->state = GATE_INSTALLED;
                return;
        }

        /* With no node list there is nothing to prove the cluster agrees. */
        if (in->n_nodes == 0 || !in->nodes) {
                result_set(ret, GATE_HELD, "node_unreachable: no nodes known");
                return;
        }
        n = nodes_sorted(in, nodes);
        if (check_unreachable(nodes, n, ret))
                return;
        if (check_skew(nodes, n, offered, ret))
                return;

        if (in->settings_busy) {
                result_set(ret, GATE_HELD, "settings_change_in_progress");
                return;
        }
        if (in->agreeing_rounds < in->stable_rounds) {
                result_set(ret, GATE_WAITING, "settling: %u/%u rounds", in->agreeing_rounds,
                           in->stable_rounds);
                return;
        }
        if (in->window_set &&
            !gate_window_contains(in->window_start_min, in->window_end_min,
                                  (unsigned) ((in->now_usec / USEC_PER_MINUTE) % MINUTES_PER_DAY))) {
                result_set(ret, GATE_WAITING, "outside_window: %02u:%02u-%02u:%02u",
                           in->window_start_min / 60, in->window_start_min % 60, in->window_end_min / 60,
                           in->window_end_min % 60);
                return;
        }
        if (in->now_usec < in->delay_not_before_usec) {
                uint64_t left = in->delay_not_before_usec - in->now_usec;
                result_set(ret, GATE_WAITING, "delay: %llus",
                           (unsigned long long) ((left + USEC_PER_SEC - 1) / USEC_PER_SEC));
                return;
        }
}

const char *gate_state_to_string(GateState s) {
        static const char *const table[] = {
                [GATE_DISABLED] = "disabled", [GATE_NONE] = "none",       [GATE_INSTALLED] = "installed",
                [GATE_HELD] = "held",         [GATE_WAITING] = "waiting", [GATE_OPEN] = "open",
        };

        if ((unsigned) s >= ELEMENTSOF(table))
                return "unknown";
        return table[s];
}
