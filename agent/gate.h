/* The Agent update gate of contract section 8 as a pure function over plain
 * data: the offer, the installed version, the recent rounds' per-node
 * answers, whether a settings change is in progress, the clock and the
 * drawn delay in; open, held or waiting with a machine-readable reason out.
 * No I/O, no clock reads, no logging. */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "provider.h"

#define GATE_REASON_MAX 512
#define GATE_MAX_NODES  PROVIDER_NODES_MAX

typedef enum GateState {
        GATE_DISABLED,
        GATE_NONE,      /* no offer */
        GATE_INSTALLED, /* offered version is installed */
        GATE_HELD,
        GATE_WAITING,
        GATE_OPEN,
} GateState;

/* One node of the Primary's `nodes` list in one round. */
typedef struct GateNode {
        char id[PROVIDER_ID_MAX + 1];
        bool answered_direct; /* answered at its own api_url (not the load balancer) */
        char version[PROVIDER_VERSION_MAX + 1];
} GateNode;

typedef struct GateInput {
        bool enabled;
        const AgentUpdate *offer; /* the committed Primary's agent_update, NULL none */
        const char *installed;    /* first line of agent_version_file, "" unknown */
        const char *applied;      /* version recorded as applied in the state file */
        const GateNode *nodes;    /* this round */
        size_t n_nodes;
        unsigned agreeing_rounds; /* consecutive rounds (this one included) all nodes agreed */
        unsigned stable_rounds;
        bool settings_busy; /* settings change or on_change in progress */
        uint64_t now_usec;  /* CLOCK_REALTIME */
        bool window_set;
        unsigned window_start_min, window_end_min;
        uint64_t delay_not_before_usec; /* drawn delay for this offer */
} GateInput;

typedef struct GateResult {
        GateState state;
        char reason[GATE_REASON_MAX]; /* "" for open/none/installed/disabled */
} GateResult;

void gate_evaluate(const GateInput *in, GateResult *ret);
const char *gate_state_to_string(GateState s);
/* True when minute-of-day m is inside [start, end), wrapping past midnight. */
bool gate_window_contains(unsigned start_min, unsigned end_min, unsigned m);
