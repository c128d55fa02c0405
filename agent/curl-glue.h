/* The libcurl multi interface on the sd-event loop, written once for every
 * user (the poller, the updater). A CurlGlue owns one CURLM: each socket
 * curl asks to watch becomes an sd-event I/O source, curl's timer one time
 * source, and after every socket or timer action the finished transfers
 * are drained and each one's completion callback runs from the loop. */
#pragma once

#include <curl/curl.h>
#include <systemd/sd-event.h>

typedef struct CurlGlue CurlGlue;

/* A transfer ended (result CURLE_OK or why not). The easy handle is no
 * longer in the multi handle when this runs; the callback may free it,
 * add it again, or add and remove other transfers. */
typedef void (*curl_glue_done_t)(CURL *easy, CURLcode result, void *userdata);

/* A multi handle on e. name describes its event sources ("poller" gives
 * "poller-curl-io" and "poller-curl-timer"). */
int curl_glue_new(sd_event *e, const char *name, CurlGlue **ret);
/* Removes the transfers still added (without their callbacks), then closes
 * every connection. Takes NULL. Must not be called from a done callback of
 * the same glue. */
CurlGlue *curl_glue_free(CurlGlue *g);

/* For multi options (CURLMOPT_MAXCONNECTS, ...); the socket and timer
 * functions belong to the glue. */
CURLM *curl_glue_multi(CurlGlue *g);

/* Starts easy on the loop; done runs once when it ends. The glue owns the
 * handle's CURLOPT_PRIVATE until then. -ENOMEM, or -EINVAL when curl
 * refuses the handle (already added somewhere). */
int curl_glue_add(CurlGlue *g, CURL *easy, curl_glue_done_t done, void *userdata);
/* Stops easy without calling its callback. A handle that is not added (or
 * has finished) is left alone. */
void curl_glue_remove(CurlGlue *g, CURL *easy);
