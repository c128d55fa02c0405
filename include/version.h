/* The version of both programs, the daemon and the control tool. */
#pragma once

#define DAEMON_VERSION "0.1.0"
