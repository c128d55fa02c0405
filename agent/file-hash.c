/* Hashing a file in slices on the loop; see file-hash.h. */
#include "file-hash.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#include "log.h"
#include "macro.h"

#define SLICE (1024 * 1024) /* bytes hashed per event loop iteration */

struct FileHash {
        sd_event_source *src; /* idle-priority defer source: one slice per dispatch */
        EVP_MD_CTX *md;
        int fd;
        uint64_t size, hashed;
        unsigned char *buf;
        file_hash_done_t done;
        void *userdata;
};

int sha256_hex_final(EVP_MD_CTX *md, char hex[static SHA256_HEX_LEN + 1]) {
        unsigned char bin[EVP_MAX_MD_SIZE];
        unsigned len = 0;

        if (EVP_DigestFinal_ex(md, bin, &len) != 1 || len != SHA256_HEX_LEN / 2)
                return -EIO;
        for (unsigned i = 0; i < len; i++)
                snprintf(hex + 2 * i, 3, "%02x", bin[i]);
        return 0;
}

FileHash *file_hash_free(FileHash *h) {
        if (!h)
                return NULL;
        sd_event_source_disable_unref(h->src);
        EVP_MD_CTX_free(h->md);
        if (h->fd >= 0)
                close(h->fd);
        free(h->buf);
        free(h);
        return NULL;
}

static void finish(FileHash *h, bool ok) {
        char hex[SHA256_HEX_LEN + 1];

        (void) sd_event_source_set_enabled(h->src, SD_EVENT_OFF);
        ok = ok && h->hashed == h->size && sha256_hex_final(h->md, hex) == 0;
        /* Last: done may free h. */
        h->done(h, ok ? hex : NULL, h->userdata);
}

static int on_slice(sd_event_source *s, void *userdata) {
        FileHash *h = userdata;
        ssize_t n = read(h->fd, h->buf, SLICE);

        if (n < 0 && errno == EINTR)
                return 0;
        if (n > 0) {
                h->hashed += (uint64_t) n;
                if (h->hashed > h->size || EVP_DigestUpdate(h->md, h->buf, (size_t) n) != 1)
                        finish(h, false);
                return 0;
        }
        if (n < 0)
                log_warning_errno(negative_errno(), "Cannot read a file to hash");
        finish(h, n == 0);
        return 0;
}

int file_hash_new(sd_event *e, int fd, uint64_t size, file_hash_done_t done, void *userdata,
                  FileHash **ret) {
        FileHash *h = calloc(1, sizeof(*h));

        if (!h) {
                close(fd);
                return -ENOMEM;
        }
        *h = (FileHash){.fd = fd, .size = size, .done = done, .userdata = userdata};
        h->md = EVP_MD_CTX_new();
        h->buf = malloc(SLICE);
        if (!h->md || !h->buf || EVP_DigestInit_ex(h->md, EVP_sha256(), NULL) != 1 ||
            sd_event_add_defer(e, &h->src, on_slice, h) < 0 ||
            sd_event_source_set_priority(h->src, SD_EVENT_PRIORITY_IDLE) < 0 ||
            sd_event_source_set_enabled(h->src, SD_EVENT_ON) < 0) {
                file_hash_free(h);
                return -ENOMEM;
        }
        (void) sd_event_source_set_description(h->src, "file-hash");
        *ret = h;
        return 0;
}
