"""GnuTLS sessions for ``tls-creds-psk``, and GnuTLS's own DN formatting.

Why GnuTLS: QEMU speaks TLS through GnuTLS, and a PSK peer must agree
with it on everything a PSK handshake negotiates (TLS 1.3 external PSK
with (EC)DHE, the identity, the key as given in ``keys.psk``). Python
3.11's ``ssl`` module has no PSK callbacks at all; using the library QEMU
itself uses makes interoperation a matter of passing QEMU's priority
string, not of re-deriving its defaults.

Why compiled, and why dlopen: record encryption runs with the GIL released
(every multifd channel encrypts on its own core), and the library is
opened at run time (``libgnutls.so.30``, installed with QEMU), so building
qmigx needs neither GnuTLS headers nor the library. Without it
:func:`available` is False and :func:`load_error` says why; nothing else
in qmigx depends on it.

The session is sans-IO: GnuTLS's push and pull callbacks move ciphertext
to and from two byte queues held here, and the caller carries those bytes
over whatever channel it has (socket, pipes). Functions return GnuTLS's
status codes (0 or more: success; negative: ``GNUTLS_E_*``); the Python
layer (:mod:`qmigx.crypto.session`) turns them into typed errors in one
place. The declarations below repeat GnuTLS's stable ABI (soname 30).
"""

from libc.stdint cimport uint8_t

__all__ = ["available", "load_error", "version", "strerror", "Session", "x509_dn",
           "E_AGAIN", "E_INTERRUPTED", "E_PREMATURE_TERMINATION", "E_DECRYPTION_FAILED",
           "E_INSUFFICIENT_CREDENTIALS", "E_FATAL_ALERT_RECEIVED", "E_UNEXPECTED_PACKET_LENGTH"]

cdef extern from *:
    """
    #include <dlfcn.h>
    #include <errno.h>
    #include <stdlib.h>
    #include <string.h>
    #include <sys/types.h>

    typedef struct { unsigned char *data; unsigned int size; } qg_datum;
    typedef ssize_t (*qg_push_fn)(void *, const void *, size_t);
    typedef ssize_t (*qg_pull_fn)(void *, void *, size_t);
    typedef int (*qg_pull_timeout_fn)(void *, unsigned int);

    #define QG_SERVER 1
    #define QG_CLIENT 2
    #define QG_NONBLOCK 8
    #define QG_NO_TICKETS 1024
    #define QG_CRD_PSK 4
    #define QG_PSK_KEY_HEX 1
    #define QG_SHUT_WR 1
    #define QG_X509_FMT_DER 0
    #define QG_E_AGAIN -28
    #define QG_E_INTERRUPTED -52
    #define QG_E_SHORT_MEMORY_BUFFER -51
    #define QG_E_MEMORY -25
    #define QG_E_NOT_LOADED -1250   /* qmigx's own: the library is not there */

    static struct {
        int loaded;
        char error[256];
        const char *(*check_version)(const char *);
        int (*init)(void **, unsigned int);
        void (*deinit)(void *);
        int (*priority_set_direct)(void *, const char *, const char **);
        int (*credentials_set)(void *, int, void *);
        void (*transport_set_ptr)(void *, void *);
        void (*transport_set_push_function)(void *, qg_push_fn);
        void (*transport_set_pull_function)(void *, qg_pull_fn);
        void (*transport_set_pull_timeout_function)(void *, qg_pull_timeout_fn);
        void (*transport_set_errno)(void *, int);
        void (*handshake_set_timeout)(void *, unsigned int);
        int (*handshake)(void *);
        ssize_t (*record_send)(void *, const void *, size_t);
        ssize_t (*record_recv)(void *, void *, size_t);
        size_t (*record_check_pending)(void *);
        int (*bye)(void *, int);
        const char *(*strerror)(int);
        int (*psk_allocate_client_credentials)(void **);
        void (*psk_free_client_credentials)(void *);
        int (*psk_set_client_credentials)(void *, const char *, const qg_datum *, int);
        int (*psk_allocate_server_credentials)(void **);
        void (*psk_free_server_credentials)(void *);
        int (*psk_set_server_credentials_file)(void *, const char *);
        const char *(*psk_server_get_username)(void *);
        char *(*session_get_desc)(void *);
        void (**free_fn)(void *);
        int (*x509_crt_init)(void **);
        void (*x509_crt_deinit)(void *);
        int (*x509_crt_import)(void *, const qg_datum *, int);
        int (*x509_crt_get_dn)(void *, char *, size_t *);
    } qg;

    #define QG_SYM(field, name) \\
        if (!(*(void **)&qg.field = dlsym(h, name))) { \\
            snprintf(qg.error, sizeof qg.error, "libgnutls.so.30 lacks %s", name); \\
            return -1; }

    static int qg_load(void) {
        if (qg.loaded) return qg.loaded > 0 ? 0 : -1;
        void *h = dlopen("libgnutls.so.30", RTLD_NOW | RTLD_LOCAL);
        qg.loaded = -1;
        if (!h) {
            snprintf(qg.error, sizeof qg.error, "cannot open libgnutls.so.30: %s", dlerror());
            return -1;
        }
        QG_SYM(check_version, "gnutls_check_version")
        QG_SYM(init, "gnutls_init")
        QG_SYM(deinit, "gnutls_deinit")
        QG_SYM(priority_set_direct, "gnutls_priority_set_direct")
        QG_SYM(credentials_set, "gnutls_credentials_set")
        QG_SYM(transport_set_ptr, "gnutls_transport_set_ptr")
        QG_SYM(transport_set_push_function, "gnutls_transport_set_push_function")
        QG_SYM(transport_set_pull_function, "gnutls_transport_set_pull_function")
        QG_SYM(transport_set_pull_timeout_function, "gnutls_transport_set_pull_timeout_function")
        QG_SYM(transport_set_errno, "gnutls_transport_set_errno")
        QG_SYM(handshake_set_timeout, "gnutls_handshake_set_timeout")
        QG_SYM(handshake, "gnutls_handshake")
        QG_SYM(record_send, "gnutls_record_send")
        QG_SYM(record_recv, "gnutls_record_recv")
        QG_SYM(record_check_pending, "gnutls_record_check_pending")
        QG_SYM(bye, "gnutls_bye")
        QG_SYM(strerror, "gnutls_strerror")
        QG_SYM(psk_allocate_client_credentials, "gnutls_psk_allocate_client_credentials")
        QG_SYM(psk_free_client_credentials, "gnutls_psk_free_client_credentials")
        QG_SYM(psk_set_client_credentials, "gnutls_psk_set_client_credentials")
        QG_SYM(psk_allocate_server_credentials, "gnutls_psk_allocate_server_credentials")
        QG_SYM(psk_free_server_credentials, "gnutls_psk_free_server_credentials")
        QG_SYM(psk_set_server_credentials_file, "gnutls_psk_set_server_credentials_file")
        QG_SYM(psk_server_get_username, "gnutls_psk_server_get_username")
        QG_SYM(session_get_desc, "gnutls_session_get_desc")
        QG_SYM(free_fn, "gnutls_free")
        QG_SYM(x509_crt_init, "gnutls_x509_crt_init")
        QG_SYM(x509_crt_deinit, "gnutls_x509_crt_deinit")
        QG_SYM(x509_crt_import, "gnutls_x509_crt_import")
        QG_SYM(x509_crt_get_dn, "gnutls_x509_crt_get_dn")
        if (!qg.check_version("3.6.0")) {
            snprintf(qg.error, sizeof qg.error, "GnuTLS %s is older than 3.6.0",
                     qg.check_version(NULL));
            return -1;
        }
        qg.loaded = 1;
        return 0;
    }

    /* A byte queue: [start, end) of data holds the bytes not yet taken. */
    typedef struct { unsigned char *data; size_t start, end, cap; } qg_queue;

    static int qg_queue_put(qg_queue *q, const void *p, size_t n) {
        if (q->start == q->end) q->start = q->end = 0;
        if (q->end + n > q->cap) {
            if (q->start) {                      /* slide what is left to the front */
                memmove(q->data, q->data + q->start, q->end - q->start);
                q->end -= q->start;
                q->start = 0;
            }
            if (q->end + n > q->cap) {
                size_t cap = q->cap ? q->cap : 65536;
                while (cap < q->end + n) cap *= 2;
                unsigned char *d = realloc(q->data, cap);
                if (!d) return -1;
                q->data = d;
                q->cap = cap;
            }
        }
        memcpy(q->data + q->end, p, n);
        q->end += n;
        return 0;
    }

    static size_t qg_queue_get(qg_queue *q, void *p, size_t n) {
        size_t avail = q->end - q->start;
        if (n > avail) n = avail;
        memcpy(p, q->data + q->start, n);
        q->start += n;
        return n;
    }

    /* One session's transport: ciphertext in (from the peer) and out (to it). */
    typedef struct {
        void *session;
        qg_queue in, out;
        int eof;
    } qg_transport;

    static ssize_t qg_push(void *ptr, const void *buf, size_t n) {
        qg_transport *t = ptr;
        if (qg_queue_put(&t->out, buf, n) < 0) {
            qg.transport_set_errno(t->session, ENOMEM);
            return -1;
        }
        return (ssize_t)n;
    }

    static ssize_t qg_pull(void *ptr, void *buf, size_t n) {
        qg_transport *t = ptr;
        if (t->in.end == t->in.start) {
            if (t->eof) return 0;
            qg.transport_set_errno(t->session, EAGAIN);
            return -1;
        }
        return (ssize_t)qg_queue_get(&t->in, buf, n);
    }

    static int qg_pull_timeout(void *ptr, unsigned int ms) {
        qg_transport *t = ptr;
        return (t->in.end != t->in.start || t->eof) ? 1 : 0;
    }

    static void qg_transport_free(qg_transport *t) {
        free(t->in.data);
        free(t->out.data);
        free(t);
    }

    /* Encrypt all of buf: with a memory transport a send never blocks, it
       only ends early when a record is full. */
    static ssize_t qg_send_all(void *s, const unsigned char *buf, size_t n) {
        size_t done = 0;
        while (done < n) {
            ssize_t k = qg.record_send(s, buf + done, n - done);
            if (k == QG_E_INTERRUPTED || k == QG_E_AGAIN) continue;
            if (k < 0) return k;
            done += (size_t)k;
        }
        return (ssize_t)done;
    }

    static int qg_x509_dn(const unsigned char *der, unsigned int len, char *out, size_t *outlen) {
        void *crt = NULL;
        qg_datum d = { (unsigned char *)der, len };
        int ret = qg.x509_crt_init(&crt);
        if (ret < 0) return ret;
        ret = qg.x509_crt_import(crt, &d, QG_X509_FMT_DER);
        if (ret >= 0) ret = qg.x509_crt_get_dn(crt, out, outlen);
        qg.x509_crt_deinit(crt);
        return ret;
    }
    """
    ctypedef struct qg_datum:
        unsigned char *data
        unsigned int size
    ctypedef struct qg_queue:
        unsigned char *data
        size_t start
        size_t end
        size_t cap
    ctypedef struct qg_transport:
        void *session
        qg_queue inq "in"
        qg_queue out
        int eof
    ctypedef ssize_t (*qg_push_fn)(void *, const void *, size_t) noexcept nogil
    ctypedef ssize_t (*qg_pull_fn)(void *, void *, size_t) noexcept nogil
    ctypedef int (*qg_pull_timeout_fn)(void *, unsigned int) noexcept nogil

    int QG_SERVER, QG_CLIENT, QG_NONBLOCK, QG_NO_TICKETS, QG_CRD_PSK, QG_PSK_KEY_HEX
    int QG_SHUT_WR, QG_E_AGAIN, QG_E_INTERRUPTED, QG_E_SHORT_MEMORY_BUFFER, QG_E_MEMORY
    int QG_E_NOT_LOADED

    int qg_load() noexcept nogil
    int qg_queue_put(qg_queue *q, const void *p, size_t n) noexcept nogil
    size_t qg_queue_get(qg_queue *q, void *p, size_t n) noexcept nogil
    ssize_t qg_push(void *, const void *, size_t) noexcept nogil
    ssize_t qg_pull(void *, void *, size_t) noexcept nogil
    int qg_pull_timeout(void *, unsigned int) noexcept nogil
    void qg_transport_free(qg_transport *t) noexcept nogil
    ssize_t qg_send_all(void *s, const unsigned char *buf, size_t n) noexcept nogil
    int qg_x509_dn(const unsigned char *der, unsigned int len, char *out, size_t *outlen) noexcept nogil

    # the function table, reached through a C macro-free accessor
    const char *qg_error "qg.error"
    const char *(*qg_check_version "qg.check_version")(const char *) noexcept nogil
    int (*qg_init "qg.init")(void **, unsigned int) noexcept nogil
    void (*qg_deinit "qg.deinit")(void *) noexcept nogil
    int (*qg_priority_set_direct "qg.priority_set_direct")(void *, const char *, const char **) noexcept nogil
    int (*qg_credentials_set "qg.credentials_set")(void *, int, void *) noexcept nogil
    void (*qg_transport_set_ptr "qg.transport_set_ptr")(void *, void *) noexcept nogil
    void (*qg_transport_set_push_function "qg.transport_set_push_function")(void *, qg_push_fn) noexcept nogil
    void (*qg_transport_set_pull_function "qg.transport_set_pull_function")(void *, qg_pull_fn) noexcept nogil
    void (*qg_transport_set_pull_timeout_function "qg.transport_set_pull_timeout_function")(void *, qg_pull_timeout_fn) noexcept nogil
    void (*qg_handshake_set_timeout "qg.handshake_set_timeout")(void *, unsigned int) noexcept nogil
    int (*qg_handshake "qg.handshake")(void *) noexcept nogil
    ssize_t (*qg_record_recv "qg.record_recv")(void *, void *, size_t) noexcept nogil
    size_t (*qg_record_check_pending "qg.record_check_pending")(void *) noexcept nogil
    int (*qg_bye "qg.bye")(void *, int) noexcept nogil
    const char *(*qg_strerror "qg.strerror")(int) noexcept nogil
    int (*qg_psk_allocate_client_credentials "qg.psk_allocate_client_credentials")(void **) noexcept nogil
    void (*qg_psk_free_client_credentials "qg.psk_free_client_credentials")(void *) noexcept nogil
    int (*qg_psk_set_client_credentials "qg.psk_set_client_credentials")(void *, const char *, const qg_datum *, int) noexcept nogil
    int (*qg_psk_allocate_server_credentials "qg.psk_allocate_server_credentials")(void **) noexcept nogil
    void (*qg_psk_free_server_credentials "qg.psk_free_server_credentials")(void *) noexcept nogil
    int (*qg_psk_set_server_credentials_file "qg.psk_set_server_credentials_file")(void *, const char *) noexcept nogil
    const char *(*qg_psk_server_get_username "qg.psk_server_get_username")(void *) noexcept nogil
    char *(*qg_session_get_desc "qg.session_get_desc")(void *) noexcept nogil
    void (**qg_free_fn "qg.free_fn")(void *) noexcept nogil

from libc.stdlib cimport calloc

#: GnuTLS status codes the Python layer tells apart (GNUTLS_E_*).
E_AGAIN = -28
E_INTERRUPTED = -52
E_PREMATURE_TERMINATION = -110
E_DECRYPTION_FAILED = -24
E_INSUFFICIENT_CREDENTIALS = -32
E_FATAL_ALERT_RECEIVED = -12
E_UNEXPECTED_PACKET_LENGTH = -9


def available() -> bool:
    """Whether ``libgnutls.so.30`` (3.6 or later) could be opened."""
    return qg_load() == 0


def load_error() -> str:
    """Why GnuTLS is not available ("" when it is)."""
    if qg_load() == 0:
        return ""
    return qg_error.decode("utf-8", "replace")


def version() -> str:
    """The GnuTLS version in use."""
    if qg_load() != 0:
        return ""
    return qg_check_version(NULL).decode()


def strerror(int code) -> str:
    """GnuTLS's text for a status code."""
    if code == QG_E_NOT_LOADED:
        return load_error()
    if qg_load() != 0:
        return f"GnuTLS error {code}"
    return qg_strerror(code).decode("utf-8", "replace")


def x509_dn(const uint8_t[::1] der) -> str:
    """The subject DN of a DER certificate exactly as GnuTLS (and so QEMU) prints it."""
    cdef size_t n = 1024
    cdef bytearray out
    cdef char *p
    cdef int ret
    if qg_load() != 0:
        raise RuntimeError(load_error())
    if not der.shape[0]:
        raise ValueError("empty certificate")
    while True:
        out = bytearray(n)
        p = out
        with nogil:
            ret = qg_x509_dn(&der[0], <unsigned int>der.shape[0], p, &n)
        if ret == QG_E_SHORT_MEMORY_BUFFER:
            continue
        if ret < 0:
            raise ValueError(strerror(ret))
        return bytes(out[:n]).split(b"\0", 1)[0].decode("utf-8", "replace")


cdef class Session:
    """One PSK session over a memory transport (see the module docstring).

    Args:
        server: the server endpoint (else the client).
        priority: a GnuTLS priority string.
        username, hexkey: the client's identity and key (hex, as ``keys.psk`` holds it).
        keyfile: the server's ``keys.psk`` (GnuTLS reads ``username:hexkey`` lines).

    ``status`` is 0 once set up, else a GnuTLS code (negative) for the
    caller to turn into an error; calls on a session that failed to set
    up return that code.
    """

    cdef void *session
    cdef void *client_creds
    cdef void *server_creds
    cdef qg_transport *t
    cdef readonly int status
    cdef readonly str failed_call

    def __cinit__(self, bint server, str priority, str username=None, str hexkey=None,
                  str keyfile=None):
        cdef int ret
        cdef qg_datum key
        cdef bytes b_prio, b_user, b_key, b_file
        self.status = QG_E_NOT_LOADED
        self.failed_call = "open libgnutls.so.30"
        if qg_load() != 0:
            return
        self.t = <qg_transport *>calloc(1, sizeof(qg_transport))
        if self.t == NULL:
            raise MemoryError()
        flags = QG_NONBLOCK | (QG_SERVER | QG_NO_TICKETS if server else QG_CLIENT)
        ret = qg_init(&self.session, flags)
        if ret < 0:
            self.session = NULL
            self._fail(ret, "gnutls_init")
            return
        self.t.session = self.session
        b_prio = priority.encode()
        ret = qg_priority_set_direct(self.session, b_prio, NULL)
        if ret < 0:
            self._fail(ret, "set priority")
            return
        if server:
            ret = qg_psk_allocate_server_credentials(&self.server_creds)
            if ret >= 0:
                b_file = keyfile.encode()
                ret = qg_psk_set_server_credentials_file(self.server_creds, b_file)
            if ret >= 0:
                ret = qg_credentials_set(self.session, QG_CRD_PSK, self.server_creds)
            if ret < 0:
                self._fail(ret, "set PSK server credentials")
                return
        else:
            ret = qg_psk_allocate_client_credentials(&self.client_creds)
            if ret >= 0:
                b_user = username.encode()
                b_key = hexkey.encode()
                key.data = <unsigned char *>b_key
                key.size = <unsigned int>len(b_key)
                ret = qg_psk_set_client_credentials(self.client_creds, b_user, &key,
                                                    QG_PSK_KEY_HEX)
            if ret >= 0:
                ret = qg_credentials_set(self.session, QG_CRD_PSK, self.client_creds)
            if ret < 0:
                self._fail(ret, "set PSK client credentials")
                return
        qg_transport_set_ptr(self.session, self.t)
        qg_transport_set_push_function(self.session, qg_push)
        qg_transport_set_pull_function(self.session, qg_pull)
        qg_transport_set_pull_timeout_function(self.session, qg_pull_timeout)
        qg_handshake_set_timeout(self.session, 0)  # the caller keeps the time
        self.status = 0
        self.failed_call = ""

    cdef void _fail(self, int code, str call):
        self.status = code
        self.failed_call = call

    def __dealloc__(self):
        if self.session != NULL:
            qg_deinit(self.session)
        if self.client_creds != NULL:
            qg_psk_free_client_credentials(self.client_creds)
        if self.server_creds != NULL:
            qg_psk_free_server_credentials(self.server_creds)
        if self.t != NULL:
            qg_transport_free(self.t)

    def handshake(self) -> int:
        """One handshake step: 0 done, ``E_AGAIN`` (wants input), else an error code."""
        cdef int ret
        if self.status:
            return self.status
        with nogil:
            ret = qg_handshake(self.session)
        if ret == QG_E_INTERRUPTED:
            ret = QG_E_AGAIN
        return ret

    def feed(self, const uint8_t[::1] data) -> None:
        """Ciphertext that arrived from the peer."""
        cdef int ret = 0
        if data.shape[0]:
            with nogil:
                ret = qg_queue_put(&self.t.inq, &data[0], data.shape[0])
        if ret < 0:
            raise MemoryError()

    def feed_eof(self) -> None:
        """The peer's direction ended."""
        self.t.eof = 1

    @property
    def buffered_input(self) -> int:
        """Ciphertext received but not yet taken by GnuTLS."""
        return self.t.inq.end - self.t.inq.start

    @property
    def pending_output(self) -> int:
        return self.t.out.end - self.t.out.start

    def take_output(self) -> bytes:
        """Ciphertext to send to the peer (all of it)."""
        cdef size_t n = self.t.out.end - self.t.out.start
        if not n:
            return b""
        out = bytes((<char *>self.t.out.data)[self.t.out.start:self.t.out.end])
        self.t.out.start = self.t.out.end = 0
        return out

    def recv_into(self, uint8_t[::1] buf) -> int:
        """Decrypt into ``buf``: bytes (0 = the peer closed), ``E_AGAIN``, or an error code."""
        cdef ssize_t ret
        if self.status:
            return self.status
        if not buf.shape[0]:
            return 0
        with nogil:
            ret = qg_record_recv(self.session, &buf[0], buf.shape[0])
        if ret == QG_E_INTERRUPTED:
            ret = QG_E_AGAIN
        return ret

    def send(self, const uint8_t[::1] data) -> int:
        """Encrypt all of ``data`` into the output queue: its length, or an error code."""
        cdef ssize_t ret
        if self.status:
            return self.status
        if not data.shape[0]:
            return 0
        with nogil:
            ret = qg_send_all(self.session, &data[0], data.shape[0])
        return ret

    def bye(self) -> int:
        """Queue a close_notify alert (our direction ends)."""
        if self.status:
            return self.status
        return qg_bye(self.session, QG_SHUT_WR)

    @property
    def username(self) -> str:
        """The PSK identity the client used (server side, after the handshake)."""
        cdef const char *name
        if self.status or self.server_creds == NULL:
            return ""
        name = qg_psk_server_get_username(self.session)
        return name.decode("utf-8", "replace") if name != NULL else ""

    @property
    def description(self) -> str:
        """GnuTLS's one-line summary of the session, e.g. ``(TLS1.3-PSK)-(ECDHE-X25519)-(AES-256-GCM)``."""
        cdef char *desc
        if self.status:
            return ""
        desc = qg_session_get_desc(self.session)
        if desc == NULL:
            return ""
        out = desc.decode("utf-8", "replace")
        qg_free_fn[0](desc)
        return out
