/* The sha256 of a file, hashed on the loop in slices at idle priority, so
 * that checking a package of up to 2 GiB never holds up a poll round, the
 * watchdog or the notify socket. Also the one digest-to-hex conversion of
 * the daemon (the updater's downloads hash as they arrive). */
#pragma once

#include <openssl/evp.h>
#include <stdint.h>
#include <systemd/sd-event.h>

#include "provider.h"

typedef struct FileHash FileHash;

/* hex: the file's sha256 as 64 lowercase hex digits when it held exactly
 * size bytes and could be read; NULL otherwise. Runs from the loop, once;
 * it may free h. */
typedef void (*file_hash_done_t)(FileHash *h, const char *hex, void *userdata);

/* Starts hashing fd (taken: closed by file_hash_free, also on failure). */
int file_hash_new(sd_event *e, int fd, uint64_t size, file_hash_done_t done, void *userdata, FileHash **ret);
FileHash *file_hash_free(FileHash *h);

/* The finished digest of md as 64 lowercase hex digits; -EIO on failure. */
int sha256_hex_final(EVP_MD_CTX *md, char hex[static SHA256_HEX_LEN + 1]);
