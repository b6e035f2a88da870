/* LD_PRELOAD shim for the TLS handshake workload: makes an OpenSSL 3 client (wrk, h2load) start
 * every connection with a FULL handshake.
 *
 * Both tools resume by default: wrk reuses its SSL object (SSL_shutdown + SSL_clear), which keeps
 * the session and the TLS 1.3 ticket the server sent, and h2load calls SSL_set_session with the
 * last session when it reconnects. Either way the next ClientHello offers a PSK and the server
 * skips the certificate signature. This shim drops the session right before the first handshake
 * step of each connection, so no PSK is offered (checked with nginx's $ssl_session_reused and
 * Sidecar's handshake counter, see bench/README.md).
 *
 * Built by bench/lib/targets.py: gcc -O2 -shared -fPIC -o noresume.so noresume.c -ldl
 */
#define _GNU_SOURCE
#include <dlfcn.h>

typedef struct ssl_st SSL;
typedef struct ssl_session_st SSL_SESSION;

static int (*real_connect)(SSL *);
static int (*real_do_handshake)(SSL *);
static int (*real_set_session)(SSL *, SSL_SESSION *);
static int (*real_in_before)(const SSL *);

static void init(void) {
    if (!real_set_session) {
        real_connect = (int (*)(SSL *))dlsym(RTLD_NEXT, "SSL_connect");
        real_do_handshake = (int (*)(SSL *))dlsym(RTLD_NEXT, "SSL_do_handshake");
        real_in_before = (int (*)(const SSL *))dlsym(RTLD_NEXT, "SSL_in_before");
        real_set_session = (int (*)(SSL *, SSL_SESSION *))dlsym(RTLD_NEXT, "SSL_set_session");
    }
}

/* h2load hands the previous connection's session over explicitly: ignore it. */
int SSL_set_session(SSL *s, SSL_SESSION *sess) {
    init();
    (void)sess;
    return real_set_session(s, (SSL_SESSION *)0);
}

static void forget(SSL *s) {
    if (real_in_before(s))  /* nothing sent yet on this connection */
        real_set_session(s, (SSL_SESSION *)0);
}

int SSL_connect(SSL *s) {
    init();
    forget(s);
    return real_connect(s);
}

int SSL_do_handshake(SSL *s) {
    init();
    forget(s);
    return real_do_handshake(s);
}
