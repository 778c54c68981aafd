/* asload: the bench's load client in C, so that it is never the bottleneck.
 *
 * The Python client (bench/client.py) fills one core near 1000 calls, so on a 2-core host it
 * cannot load a daemon pinned to the other core with 2000.  This program does the same work per
 * call on one epoll loop (a timerfd for the schedule): register over HTTP as Asterisk's CURL()
 * does, then per transport=
 *
 *   audiosocket: connect AudioSocket, send the UUID frame, then numbered 20 ms PCM tone frames;
 *     at the end a hangup frame, then close;
 *   websocket, wss: connect to the chan_websocket endpoint (wss: TLS through OpenSSL, the
 *     server's certificate not verified), send the upgrade (ws_head + context id + ws_tail, made
 *     by bench/ws.py), check the 101 and its Sec-WebSocket-Accept (ws_accept) and subprotocol,
 *     send MEDIA_START as chan_websocket does with f(json), then numbered 20 ms mu-law tone
 *     frames as masked binary messages; read the server's frames (binary: the echo; ping:
 *     answered; text HANGUP or close before the end: the call failed; other text: skipped); at
 *     the end a close 1000, then drop TCP at once, as Asterisk does;
 *
 * frames paced, bursty or jittered on the call's own phase, with the byte layouts of
 * bench/frames.py and bench/ws.py.  It judges nothing: it writes what happened as raw records,
 * and bench/cclient/__init__.py feeds them to the same EchoTracker and summary as the Python
 * client's, so both clients' figures come from one piece of code.  Built with -DASLOAD_TLS
 * (and -lssl -lcrypto) it speaks wss; without, audiosocket and websocket only.
 *
 * Input: name=value arguments (see main); on stdin the 50 PCM tone bodies (316 bytes each,
 * frame seq uses body seq % 50), the 50 mu-law tone bodies (155 bytes each, the same way) and
 * then each call's start (doubles, CLOCK_MONOTONIC s, ascending).
 * Output: `struct rec`s to the file out=PATH; on stdout "cpu S", "hold_share F" (CPU over wall
 * time in the hold window), "wall S", "blocked N" and one "fail CALL REASON" per failed call.
 * `asload identify` (`asload identify-ulaw`) reads the bodies, then (u16 length, payload)
 * pairs, and prints each payload's identity: bench/frames.py `identify` (`identify_ulaw`), for
 * tests.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <math.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>
#ifdef ASLOAD_TLS
#include <openssl/err.h>
#include <openssl/ssl.h>
#else
typedef struct ssl_st SSL; /* never made: this build has no TLS, and refuses transport=wss */
#endif

#define FRAME_S 0.020
#define PAYLOAD 320 /* AudioSocket: 20 ms of PCM16, its first 4 bytes the sequence number */
#define BODY (PAYLOAD - 4)
#define ULAW 160 /* chan_websocket: 20 ms of mu-law, its first 5 bytes the sequence number */
#define ULAW_SEQ 5
#define ULAW_BODY (ULAW - ULAW_SEQ)
#define AS_FRAME (3 + PAYLOAD)
#define WS_FRAME (8 + ULAW) /* 0x82, 0x80|126, 16-bit length, mask, payload */
#define TONES 50
#define MARK 0x80000000u
#define IN_CAP 8192 /* bytes of a reply or of frames not yet whole, per call */
#define OUT_MAX (1 << 20) /* bytes the kernel has not taken, per call, before giving up */
#define TIMER UINT32_MAX  /* the timerfd's epoll tag; calls are tagged by index */
#define WS_TEXT 0x1
#define WS_BINARY 0x2
#define WS_CLOSE 0x8
#define WS_PING 0x9
#define WS_PONG 0xA
#define WS_MAX_FRAME (1 << 20) /* bench/ws.py refuses a server frame over this */

enum { WAITING, REG_CONNECT, REG_READ, AS_CONNECT, WS_CONNECT, TLS_HANDSHAKE, WS_UPGRADE,
       IN_CALL, DONE, FAILED };
enum { R_SETUP, R_SENT, R_RECV, R_LAG }; /* record kinds; the wrapper names them too */
enum { PACED, BURSTY, JITTERED };
enum { AUDIOSOCKET, WEBSOCKET, WSS };

struct rec { /* t: a CLOCK_MONOTONIC time, or the lag (s); value: frame number or identity */
    double t;
    int32_t call, value;
    uint8_t kind;
} __attribute__((packed));

struct call {
    int fd, state, want_out;
    double start, due_base;
    uint32_t next_frame, expect; /* next number to send; one past the highest echoed in order */
    unsigned char id[16];
    char ctx[37]; /* the context id as registration returned it (chan_websocket's ctx=) */
    SSL *tls;     /* wss only */
    unsigned char *in, *out;
    size_t in_len, out_len, out_cap;
    char error[120];
};

static unsigned char bodies[TONES][BODY], zeros[BODY];
static unsigned char ulaw_bodies[TONES][ULAW_BODY], ulaw_silence[ULAW];
static unsigned char masked_bodies[TONES][ULAW_BODY]; /* ulaw_bodies masked at payload offset 5 */
static const unsigned char ws_mask[4] = {0x5a, 0xc3, 0x17, 0xe9}; /* bench/ws.py MASK */
static struct call *calls;
static int ncalls, ep;
static struct rec *recs;
static size_t nrecs, caprecs;
static long blocked;
static uint64_t rng;
/* the plan */
static int as_port, http_port, ws_port, first_index, pattern = PACED, burst = 5;
static int transport = AUDIOSOCKET;
static double hold_from, stop_at, drain = 2.0, early = 0.0005, jitter = 0.010;
static double hold_cpu[2], hold_wall[2]; /* CPU, wall time when the loop saw the hold begin, end */
static const char *out_path, *reg_head = "", *reg_tail = "";
static const char *ws_head = "", *ws_tail = "", *ws_accept = ""; /* from bench/ws.py */
#ifdef ASLOAD_TLS
static SSL_CTX *tls_ctx;
#endif

static double mono(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static double cpu_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static uint64_t next_random(void) { /* splitmix64 */
    uint64_t z = (rng += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static void record(int kind, int call, int32_t value, double t) {
    if (nrecs == caprecs) {
        caprecs = caprecs ? 2 * caprecs : 1 << 16;
        if (!(recs = realloc(recs, caprecs * sizeof *recs))) {
            perror("asload: records");
            exit(1);
        }
    }
    recs[nrecs++] = (struct rec){t, call, value, (uint8_t)kind};
}

/* bench/frames.py identify: the frame's number, 0 for silence, -1 for anything else. */
static int32_t identify(const unsigned char *p, size_t n) {
    if (n != PAYLOAD)
        return -1;
    uint32_t word = p[0] | p[1] << 8 | p[2] << 16 | (uint32_t)p[3] << 24, seq = word & ~MARK;
    if (word == 0)
        return memcmp(p + 4, zeros, BODY) ? -1 : 0;
    if ((word & MARK) && seq && !memcmp(p + 4, bodies[seq % TONES], BODY))
        return (int32_t)seq;
    return -1;
}

/* bench/frames.py identify_ulaw: the same for a mu-law payload (7 bits of the number a byte). */
static int32_t identify_ulaw(const unsigned char *p, size_t n) {
    if (n != ULAW)
        return -1;
    if (!memcmp(p, ulaw_silence, ULAW))
        return 0;
    uint64_t seq = 0;
    for (int i = 0; i < ULAW_SEQ; i++) {
        if (!(p[i] & 0x80))
            return -1;
        seq |= (uint64_t)(p[i] & 0x7F) << (7 * i);
    }
    if (seq && seq < MARK && !memcmp(p + ULAW_SEQ, ulaw_bodies[seq % TONES], ULAW_BODY))
        return (int32_t)seq;
    return -1;
}

/* Close the call's connection (a TLS session is dropped without close_notify, as TCP is). */
static void drop(struct call *c) {
#ifdef ASLOAD_TLS
    if (c->tls)
        SSL_free(c->tls);
#endif
    c->tls = NULL;
    if (c->fd >= 0)
        close(c->fd);
    c->fd = -1;
}

static void fail(struct call *c, const char *fmt, ...) {
    char why[sizeof c->error]; /* fmt's arguments may be c->error itself */
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(why, sizeof why, fmt, ap);
    va_end(ap);
    memcpy(c->error, why, sizeof why);
    c->state = FAILED;
    drop(c);
}

#ifdef ASLOAD_TLS
static const char *tls_error(void) {
    unsigned long e = ERR_get_error();
    const char *why = e ? ERR_reason_error_string(e) : NULL;
    ERR_clear_error();
    return why ? why : e ? "error" : errno ? strerror(errno) : "the connection ended";
}
#endif

/* Bytes to the server (through TLS on wss): how many were taken, 0 if none can be now, -1 on
 * an error (c->error says which). */
static ssize_t out_bytes(struct call *c, const void *data, size_t len) {
#ifdef ASLOAD_TLS
    if (c->tls) {
        errno = 0;
        int n = SSL_write(c->tls, data, (int)len);
        if (n > 0)
            return n;
        int e = SSL_get_error(c->tls, n);
        if (e == SSL_ERROR_WANT_WRITE || e == SSL_ERROR_WANT_READ)
            return 0;
        if (e == SSL_ERROR_SYSCALL && errno)
            snprintf(c->error, sizeof c->error, "send: %s", strerror(errno));
        else
            snprintf(c->error, sizeof c->error, "TLS: %s", tls_error());
        ERR_clear_error();
        return -1;
    }
#endif
    ssize_t n = send(c->fd, data, len, MSG_NOSIGNAL);
    if (n >= 0 || errno == EAGAIN)
        return n > 0 ? n : 0;
    snprintf(c->error, sizeof c->error, "send: %s", strerror(errno));
    return -1;
}

/* Bytes from the server (through TLS on wss): how many, 0 at its end, -1 if none now, -2 on an
 * error (c->error says which). */
static ssize_t in_bytes(struct call *c, void *buf, size_t cap) {
#ifdef ASLOAD_TLS
    if (c->tls) {
        errno = 0;
        int n = SSL_read(c->tls, buf, (int)cap);
        if (n > 0)
            return n;
        int e = SSL_get_error(c->tls, n);
        if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE)
            return -1;
        if (e == SSL_ERROR_ZERO_RETURN) { /* close_notify */
            snprintf(c->error, sizeof c->error, "server ended the TLS session");
            return -2;
        }
        if ((e == SSL_ERROR_SYSCALL && !errno) /* TCP ended without close_notify */
            || ERR_GET_REASON(ERR_peek_error()) == SSL_R_UNEXPECTED_EOF_WHILE_READING) {
            ERR_clear_error();
            return 0;
        }
        if (e == SSL_ERROR_SYSCALL)
            snprintf(c->error, sizeof c->error, "recv: %s", strerror(errno));
        else
            snprintf(c->error, sizeof c->error, "TLS: %s", tls_error());
        ERR_clear_error();
        return -2;
    }
#endif
    ssize_t n = recv(c->fd, buf, cap, 0);
    if (n >= 0)
        return n;
    if (errno == EAGAIN || errno == EINTR)
        return -1;
    snprintf(c->error, sizeof c->error, "recv: %s", strerror(errno));
    return -2;
}

static void watch(struct call *c, int out) { /* EPOLLOUT only while bytes wait for the kernel */
    struct epoll_event ev = {.events = EPOLLIN | (out ? EPOLLOUT : 0), .data.u32 = c - calls};
    if (out != c->want_out && epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev) == 0)
        c->want_out = out;
}

static void flush_out(struct call *c) {
    ssize_t n = out_bytes(c, c->out, c->out_len);
    if (n < 0) {
        fail(c, "%s", c->error);
        return;
    }
    if (n > 0)
        memmove(c->out, c->out + n, c->out_len -= n);
    watch(c, c->out_len > 0);
}

/* Write bytes; what the kernel does not take waits in the call's buffer, in order.  (On wss an
 * SSL_write that could not finish is retried with the buffer's start, the same bytes, as
 * OpenSSL requires; SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER lets the buffer move meanwhile.) */
static void put(struct call *c, const void *data, size_t len) {
    size_t done = 0;
    if (c->out_len) {
        blocked++;
    } else {
        ssize_t n = out_bytes(c, data, len);
        if (n < 0) {
            fail(c, "%s", c->error);
            return;
        }
        done = n;
        if (done == len)
            return;
    }
    if (c->out_len + len - done > OUT_MAX) {
        fail(c, "send: %d bytes not taken by the kernel", OUT_MAX);
        return;
    }
    if (c->out_len + len - done > c->out_cap) {
        c->out_cap = c->out_len + len - done + 4096;
        c->out = realloc(c->out, c->out_cap);
    }
    memcpy(c->out + c->out_len, (const char *)data + done, len - done);
    c->out_len += len - done;
    flush_out(c);
}

static void connect_to(struct call *c, int port, int state) {
    struct sockaddr_in to = {.sin_family = AF_INET, .sin_port = htons(port),
                             .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    int one = 1, fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        fail(c, "socket: %s", strerrorname_np(errno));
        return;
    }
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (connect(fd, (struct sockaddr *)&to, sizeof to) < 0 && errno != EINPROGRESS) {
        fail(c, "connect: %s", strerrorname_np(errno));
        close(fd);
        return;
    }
    struct epoll_event ev = {.events = EPOLLOUT, .data.u32 = c - calls};
    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
    c->fd = fd, c->state = state, c->want_out = 1, c->in_len = c->out_len = 0;
}

static void begin(struct call *c, double now) {
    record(R_SETUP, c - calls, 0, now);
    if (http_port) {
        connect_to(c, http_port, REG_CONNECT);
        return;
    }
    for (int i = 0; i < 16; i += 8) { /* a peer without registration: a random UUID v4 */
        uint64_t r = next_random();
        memcpy(c->id + i, &r, 8);
    }
    c->id[6] = (c->id[6] & 0x0F) | 0x40, c->id[8] = (c->id[8] & 0x3F) | 0x80;
    connect_to(c, as_port, AS_CONNECT);
}

static double next_due(struct call *c) { /* when frame next_frame (or its burst) is written */
    double k = c->next_frame - 1;
    if (pattern == BURSTY)
        return c->due_base + (k + burst - 1) * FRAME_S;
    double due = c->due_base + k * FRAME_S;
    return pattern == JITTERED ? due + (next_random() >> 11) * 0x1p-53 * jitter : due;
}

/* The schedule: a binary min-heap of (due, call). */
static struct slot { double due; int call; } *heap;
static int heap_n;

static void heap_push(double due, int call) {
    int i = heap_n++;
    for (; i > 0 && heap[(i - 1) / 2].due > due; i = (i - 1) / 2)
        heap[i] = heap[(i - 1) / 2];
    heap[i] = (struct slot){due, call};
}

static struct slot heap_pop(void) {
    struct slot top = heap[0], last = heap[--heap_n];
    int i = 0;
    for (int child; (child = 2 * i + 1) < heap_n; i = child) {
        if (child + 1 < heap_n && heap[child + 1].due < heap[child].due)
            child++;
        if (last.due <= heap[child].due)
            break;
        heap[i] = heap[child];
    }
    heap[i] = last;
    return top;
}

/* One final masked client frame (bench/ws.py client_frame) into f; its length. */
static size_t ws_frame(unsigned char *f, int opcode, const void *payload, size_t n) {
    size_t pos = 2;
    f[0] = 0x80 | opcode;
    if (n < 126) {
        f[1] = 0x80 | n;
    } else { /* never 64 KiB or more here */
        f[1] = 0x80 | 126, f[2] = n >> 8, f[3] = n & 0xFF;
        pos = 4;
    }
    memcpy(f + pos, ws_mask, 4);
    for (size_t i = 0; i < n; i++)
        f[pos + 4 + i] = ((const unsigned char *)payload)[i] ^ ws_mask[i % 4];
    return pos + 4 + n;
}

/* Frame seq as bytes: AudioSocket's SLIN frame, or a masked binary message (bench/ws.py
 * audio_frame: only the 5 sequence bytes are masked per frame). */
static size_t audio_frame(unsigned char *f, uint32_t seq) {
    if (transport == AUDIOSOCKET) {
        uint32_t word = seq | MARK;
        f[0] = 0x10, f[1] = PAYLOAD >> 8, f[2] = PAYLOAD & 0xFF;
        for (int b = 0; b < 4; b++)
            f[3 + b] = word >> (8 * b);
        memcpy(f + 7, bodies[seq % TONES], BODY);
        return AS_FRAME;
    }
    f[0] = 0x80 | WS_BINARY, f[1] = 0x80 | 126, f[2] = ULAW >> 8, f[3] = ULAW & 0xFF;
    memcpy(f + 4, ws_mask, 4);
    for (int i = 0; i < ULAW_SEQ; i++)
        f[8 + i] = (0x80 | ((seq >> (7 * i)) & 0x7F)) ^ ws_mask[i % 4];
    memcpy(f + 8 + ULAW_SEQ, masked_bodies[seq % TONES], ULAW_BODY);
    return WS_FRAME;
}

static void send_due(struct call *c, double due, unsigned char *buf) {
    double now = mono();
    int n = pattern == BURSTY ? burst : 1;
    size_t len = 0;
    record(R_LAG, c - calls, 0, now - due);
    for (int i = 0; i < n; i++) {
        uint32_t seq = c->next_frame++;
        len += audio_frame(buf + len, seq);
        record(R_SENT, c - calls, (int32_t)seq, now);
    }
    put(c, buf, len);
    if (c->state == IN_CALL)
        heap_push(next_due(c), c - calls);
}

static void start_media(struct call *c, double now) {
    c->state = IN_CALL, c->due_base = now, c->next_frame = c->expect = 1;
    heap_push(pattern == BURSTY ? now + (burst - 1) * FRAME_S : now, c - calls);
}

static void send_upgrade(struct call *c) {
    char req[1024];
    int n = snprintf(req, sizeof req, "%s%s%s", ws_head, c->ctx, ws_tail);
    c->state = WS_UPGRADE;
    put(c, req, (size_t)n < sizeof req ? (size_t)n : sizeof req - 1);
}

/* Drive the TLS handshake; once done, send the upgrade. */
static void tls_handshake(struct call *c) {
#ifdef ASLOAD_TLS
    int r = SSL_do_handshake(c->tls);
    if (r == 1) {
        watch(c, 0);
        send_upgrade(c);
        return;
    }
    int e = SSL_get_error(c->tls, r);
    if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE)
        watch(c, e == SSL_ERROR_WANT_WRITE);
    else
        fail(c, "TLS: %s", tls_error());
#else
    fail(c, "TLS: this asload was built without OpenSSL");
#endif
}

static void connected(struct call *c, double now) {
    int err = 0;
    socklen_t len = sizeof err;
    getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
    if (err) {
        fail(c, "connect: %s", strerrorname_np(err));
        return;
    }
    watch(c, 0);
    if (c->state == REG_CONNECT) {
        char req[1024];
        int n = snprintf(req, sizeof req, "%s%d%s", reg_head, first_index + (int)(c - calls),
                         reg_tail);
        c->state = REG_READ;
        put(c, req, (size_t)n < sizeof req ? (size_t)n : sizeof req - 1);
        return;
    }
    if (c->state == WS_CONNECT) {
#ifdef ASLOAD_TLS
        if (transport == WSS) { /* no SNI, no verification: as the Python client */
            c->tls = SSL_new(tls_ctx);
            SSL_set_fd(c->tls, c->fd);
            SSL_set_connect_state(c->tls);
            c->state = TLS_HANDSHAKE;
            tls_handshake(c);
            return;
        }
#endif
        send_upgrade(c);
        return;
    }
    unsigned char hello[19] = {0x01, 0x00, 16};
    memcpy(hello + 3, c->id, 16);
    start_media(c, now);
    put(c, hello, sizeof hello);
}

static int hexval(int ch) {
    return ch >= '0' && ch <= '9' ? ch - '0' : ch >= 'a' && ch <= 'f' ? ch - 'a' + 10
         : ch >= 'A' && ch <= 'F' ? ch - 'A' + 10 : -1;
}

/* The whole reply is in (the server closed): 200 and a 36-character context id, or fail. */
static void registered(struct call *c) {
    char *text = (char *)c->in, *body = memmem(text, c->in_len, "\r\n\r\n", 4);
    size_t head_len = body ? (size_t)(body - text) : c->in_len, body_len = 0;
    int status = 0, n = 0;
    char *space = memchr(text, ' ', head_len);
    if (space)
        for (char *d = space + 1; d < text + head_len && *d >= '0' && *d <= '9'; d++)
            status = status * 10 + (*d - '0'), n++;
    if (body)
        body += 4, body_len = c->in_len - (body - text);
    drop(c);
    if (n == 0 || status != 200 || body_len != 36) {
        fail(c, "registration: HTTP %d", n ? status : 0);
        return;
    }
    for (int i = 0, j = 0; i < 36; i++) {
        if (i == 8 || i == 13 || i == 18 || i == 23) {
            if (body[i] != '-')
                goto bad;
            continue;
        }
        int v = hexval(body[i]);
        if (v < 0)
            goto bad;
        c->id[j / 2] = j % 2 ? c->id[j / 2] | v : v << 4;
        j++;
    }
    memcpy(c->ctx, body, 36);
    c->ctx[36] = 0;
    if (transport == AUDIOSOCKET)
        connect_to(c, as_port, AS_CONNECT);
    else
        connect_to(c, ws_port, WS_CONNECT);
    return;
bad:
    fail(c, "registration: the body is not a UUID");
}

static void server_closed(struct call *c, double now, const char *why) {
    if (now < stop_at) {
        fail(c, "%s", c->error[0] ? c->error : why);
    } else {
        c->state = DONE;
        drop(c);
    }
}

static int frame_ok(int kind, unsigned len) {
    if (kind >= 0x10 && kind <= 0x18)
        return !(len & 1) && len <= IN_CAP - 3;
    return (kind == 0x00 && len == 0) || (kind == 0x01 && len == 16) ||
           ((kind == 0x03 || kind == 0xFF) && len == 1);
}

static void received(struct call *c, int32_t ident, double now) {
    if (ident > 0 && (uint32_t)ident >= c->expect && (uint32_t)ident < c->next_frame)
        c->expect = ident + 1;
    record(R_RECV, c - calls, ident, now);
}

static void frames_in(struct call *c, double now) {
    size_t pos = 0;
    while (c->in_len - pos >= 3) {
        unsigned char *f = c->in + pos;
        unsigned kind = f[0], len = f[1] << 8 | f[2];
        if (!frame_ok(kind, len)) {
            fail(c, "bad frame from server: kind 0x%02X, %u bytes", kind, len);
            return;
        }
        if (c->in_len - pos < 3 + len)
            break;
        if (kind == 0x10) {
            received(c, identify(f + 3, len), now);
        } else if (kind == 0x00) {
            if (now < stop_at)
                fail(c, "server sent a hangup frame");
            c->in_len = 0;
            return;
        } else {
            received(c, -1, now);
        }
        pos += 3 + len;
    }
    memmove(c->in, c->in + pos, c->in_len -= pos);
}

/* One server message (bench/client.py websocket_data); 0 if the call ended with it. */
static int ws_message(struct call *c, int opcode, const unsigned char *p, size_t n, double now) {
    if (opcode == WS_BINARY) { /* whole frames in one message are allowed; a partial one is not */
        for (size_t at = 0; at < n; at += ULAW)
            received(c, identify_ulaw(p + at, n - at < ULAW ? n - at : ULAW), now);
    } else if (opcode == WS_PING) {
        unsigned char pong[8 + IN_CAP];
        put(c, pong, ws_frame(pong, WS_PONG, p, n));
    } else if (opcode == WS_CLOSE) {
        char why[sizeof c->error];
        int code = n >= 2 ? p[0] << 8 | p[1] : 1005, reason = n > 2 ? (int)(n - 2) : 0;
        snprintf(why, sizeof why, reason ? "server closed the websocket: %d %.*s"
                                         : "server closed the websocket: %d%.*s",
                 code, reason, (const char *)p + 2);
        c->error[0] = 0;
        server_closed(c, now, why);
        return 0;
    } else if (opcode == WS_TEXT && memmem(p, n, "HANGUP", 6) && now < stop_at) {
        fail(c, "server sent HANGUP");
        return 0;
    }
    return c->state != FAILED;
}

/* The server's frames in c->in (bench/ws.py ServerFrames): unmasked, final, no reserved bits. */
static void ws_frames_in(struct call *c, double now) {
    size_t pos = 0;
    while (c->in_len - pos >= 2) {
        unsigned char *f = c->in + pos;
        size_t have = c->in_len - pos, head = 2;
        uint64_t n = f[1];
        if ((f[1] & 0x80) || (f[0] & 0x70) || !(f[0] & 0x80)) {
            fail(c, "bad frame from server: frame header 0x%02x 0x%02x", f[0], f[1]);
            return;
        }
        if (n == 126) {
            if (have < 4)
                break;
            n = f[2] << 8 | f[3], head = 4;
        } else if (n == 127) {
            if (have < 10)
                break;
            n = 0, head = 10;
            for (int i = 2; i < 10; i++)
                n = n << 8 | f[i];
        }
        if (n > WS_MAX_FRAME || head + n > IN_CAP) { /* the latter: more than this client holds */
            fail(c, "bad frame from server: a %llu-byte frame", (unsigned long long)n);
            return;
        }
        if (have < head + n)
            break;
        if (!ws_message(c, f[0] & 0x0F, f + head, n, now))
            return;
        pos += head + n;
    }
    memmove(c->in, c->in + pos, c->in_len -= pos);
}

static int header_is(const char *line, const char *colon, const char *name) {
    const char *end = colon;
    while (line < end && (*line == ' ' || *line == '\t'))
        line++;
    while (end > line && (end[-1] == ' ' || end[-1] == '\t'))
        end--;
    return (size_t)(end - line) == strlen(name) && !strncasecmp(line, name, end - line);
}

/* bench/ws.py check_upgrade: NULL if head (status line and headers) accepts the upgrade, else
 * why not (in why). */
static const char *check_upgrade(const char *head, size_t len, char *why, size_t why_len) {
    const char *eol = memmem(head, len, "\r\n", 2), *end = head + len;
    const char *status_line_end = eol ? eol : end;
    const char *sp = memchr(head, ' ', status_line_end - head), *code_end = NULL;
    if (sp) {
        code_end = memchr(sp + 1, ' ', status_line_end - sp - 1);
        code_end = code_end ? code_end : status_line_end;
    }
    if (!sp || code_end - sp - 1 != 3 || memcmp(sp + 1, "101", 3)) {
        int shown = status_line_end - head > 60 ? 60 : (int)(status_line_end - head);
        snprintf(why, why_len, "upgrade answered '%.*s'", shown, head);
        return why;
    }
    const char *accept = NULL, *protocol = NULL;
    size_t accept_len = 0, protocol_len = 0;
    for (const char *line = status_line_end; line < end;) {
        line += 2; /* past "\r\n" */
        const char *line_end = memmem(line, end - line, "\r\n", 2);
        line_end = line_end ? line_end : end;
        const char *colon = memchr(line, ':', line_end - line), *v = colon ? colon + 1 : line_end;
        const char *v_end = line_end;
        while (v < v_end && (*v == ' ' || *v == '\t'))
            v++;
        while (v_end > v && (v_end[-1] == ' ' || v_end[-1] == '\t'))
            v_end--;
        if (colon && header_is(line, colon, "sec-websocket-accept"))
            accept = v, accept_len = v_end - v;
        else if (colon && header_is(line, colon, "sec-websocket-protocol"))
            protocol = v, protocol_len = v_end - v;
        line = line_end;
    }
    if (!accept || accept_len != strlen(ws_accept) || memcmp(accept, ws_accept, accept_len)) {
        snprintf(why, why_len, "wrong Sec-WebSocket-Accept");
        return why;
    }
    if (!protocol || protocol_len != 5 || memcmp(protocol, "media", 5)) {
        if (protocol)
            snprintf(why, why_len, "subprotocol '%.*s', not 'media'", (int)protocol_len, protocol);
        else
            snprintf(why, why_len, "subprotocol None, not 'media'");
        return why;
    }
    return NULL;
}

/* MEDIA_START as chan_websocket sends it with f(json): bench/ws.py media_start, byte for byte. */
static size_t media_start(struct call *c, unsigned char *frame) {
    char text[700];
    int index = first_index + (int)(c - calls);
    int n = snprintf(
        text, sizeof text,
        "{\"event\":\"MEDIA_START\",\"connection_id\":\"rapida\","
        "\"channel\":\"WebSocket/rapida/0x%012llx\",\"channel_id\":\"1795499200.%d\","
        "\"format\":\"ulaw\",\"optimal_frame_size\":%d,\"ptime\":20,"
        "\"channel_variables\":{\"DIALEDPEERNUMBER\":\"rapida/c(ulaw)f(json)v(ctx=%s)\","
        "\"MEDIA_WEBSOCKET_CONNECTION_ID\":\"rapida\","
        "\"MEDIA_WEBSOCKET_OPTIMAL_FRAME_SIZE\":\"%d\",\"__RAPIDA_CONTEXT_ID\":\"%s\"}}",
        0x5627C0000000ull + index, index, ULAW, c->ctx, ULAW, c->ctx);
    return ws_frame(frame, WS_TEXT, text, n);
}

/* The upgrade's answer is in c->in once its head is whole: check it, then MEDIA_START and the
 * call's frames begin (bench/client.py does not wait for anything from the server). */
static void upgrade_answered(struct call *c, double now) {
    char *in = (char *)c->in, *end = memmem(in, c->in_len, "\r\n\r\n", 4), why[100];
    if (!end) {
        if (c->in_len == IN_CAP)
            fail(c, "websocket: an upgrade answer over %d bytes", IN_CAP);
        return;
    }
    if (check_upgrade(in, end - in, why, sizeof why)) {
        fail(c, "websocket: %s", why);
        return;
    }
    size_t rest = c->in_len - (end + 4 - in);
    memmove(c->in, end + 4, rest);
    c->in_len = rest;
    unsigned char frame[8 + 700];
    put(c, frame, media_start(c, frame));
    if (c->state == FAILED)
        return;
    start_media(c, now);
    if (c->in_len)
        ws_frames_in(c, now);
}

static void event(struct call *c, uint32_t mask) {
    double now = mono();
    if (c->state == REG_CONNECT || c->state == AS_CONNECT || c->state == WS_CONNECT) {
        connected(c, now);
        return;
    }
    if (c->state == TLS_HANDSHAKE) {
        tls_handshake(c);
        return;
    }
    if ((mask & EPOLLOUT) && c->out_len) {
        flush_out(c);
        if (c->state == FAILED || !(mask & (EPOLLIN | EPOLLHUP | EPOLLERR)))
            return;
    }
    do { /* once for a socket (epoll comes back for more); TLS: until OpenSSL holds nothing */
        ssize_t n = in_bytes(c, c->in + c->in_len, IN_CAP - c->in_len);
        if (n == -1)
            return;
        if (c->state == REG_READ) {
            if (n > 0 && (c->in_len += n) == IN_CAP)
                fail(c, "registration: a reply over %d bytes", IN_CAP);
            else if (n <= 0)
                registered(c);
            return;
        }
        if (n <= 0) {
            server_closed(c, now, "server closed the call");
            return;
        }
        c->in_len += n;
        if (c->state == WS_UPGRADE)
            upgrade_answered(c, now);
        else if (transport == AUDIOSOCKET)
            frames_in(c, now);
        else
            ws_frames_in(c, now);
    } while (c->tls && c->fd >= 0 && c->in_len < IN_CAP);
}

static int all_echoed(void) {
    for (int i = 0; i < ncalls; i++)
        if (calls[i].state == IN_CALL && calls[i].expect < calls[i].next_frame)
            return 0;
    return 1;
}

static void run(int tfd) {
    double end = stop_at + drain, armed = 0;
    unsigned char *buf = malloc((size_t)burst * AS_FRAME);
    struct epoll_event evs[256];
    int next_start = 0;
    for (;;) {
        double now = mono();
        if (!hold_wall[1] && now >= hold_from) {
            int i = hold_wall[0] ? 1 : 0;
            if (i == 0 || now >= stop_at)
                hold_cpu[i] = cpu_now(), hold_wall[i] = now;
        }
        if (now >= end || (now >= stop_at && all_echoed()))
            break;
        while (next_start < ncalls && calls[next_start].start <= now)
            begin(&calls[next_start++], now);
        while (now < stop_at && heap_n && heap[0].due <= now + early) {
            struct slot s = heap_pop();
            if (calls[s.call].state == IN_CALL)
                send_due(&calls[s.call], s.due, buf);
        }
        double wake = end;
        if (heap_n && now < stop_at) { /* on a grid of `early` steps: one timer re-arm a step
                                        * at most, not one after each send (each is a VM exit) */
            double at = ((int64_t)((heap[0].due - early) / early) + 1) * early;
            wake = at < stop_at ? at : stop_at;
        }
        if (next_start < ncalls && calls[next_start].start < wake)
            wake = calls[next_start].start;
        if (wake != armed) { /* one-shot, absolute; a time already past fires at once */
            time_t sec = (time_t)wake;
            struct itimerspec it = {.it_value = {sec, (long)((wake - sec) * 1e9)}};
            timerfd_settime(tfd, TFD_TIMER_ABSTIME, &it, NULL);
            armed = wake;
        }
        int n = epoll_wait(ep, evs, 256, -1);
        for (int i = 0; i < n; i++) {
            if (evs[i].data.u32 == TIMER) {
                uint64_t ticks;
                if (read(tfd, &ticks, sizeof ticks) > 0)
                    armed = 0;
            } else if (calls[evs[i].data.u32].fd >= 0) {
                event(&calls[evs[i].data.u32], evs[i].events);
            }
        }
    }
    free(buf);
}

/* As Asterisk does at the end: AudioSocket, a hangup frame (never inside a frame the kernel has
 * half of); chan_websocket, a close 1000 after whatever still waits; then close at once. */
static void hang_up(struct call *c) {
    static const unsigned char hangup[3] = {0x00, 0x00, 0x00};
    if (c->state == IN_CALL && transport == AUDIOSOCKET && !c->out_len)
        send(c->fd, hangup, sizeof hangup, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (c->state == IN_CALL && transport != AUDIOSOCKET) {
        unsigned char close_frame[8];
        size_t n = ws_frame(close_frame, WS_CLOSE, "\x03\xe8", 2);
        if (c->out_len == 0) {
            out_bytes(c, close_frame, n);
        } else if (c->out_len + n <= c->out_cap) { /* bench/client.py: pending bytes, then it */
            memcpy(c->out + c->out_len, close_frame, n);
            out_bytes(c, c->out, c->out_len + n);
        }
    }
    drop(c);
}

static unsigned char *read_all(int fd, size_t *len) {
    size_t cap = 1 << 16;
    unsigned char *data = malloc(cap);
    ssize_t n;
    for (*len = 0; (n = read(fd, data + *len, cap - *len)) > 0;)
        if ((*len += n) == cap)
            data = realloc(data, cap *= 2);
    return data;
}

static int identify_stdin(unsigned char *data, size_t len, int ulaw) {
    for (size_t pos = 0; pos + 2 <= len;) {
        size_t n = data[pos] | data[pos + 1] << 8;
        printf("%d\n", ulaw ? identify_ulaw(data + pos + 2, n) : identify(data + pos + 2, n));
        pos += 2 + n;
    }
    return 0;
}

int main(int argc, char **argv) {
    size_t len, tables = sizeof bodies + sizeof ulaw_bodies;
    unsigned char *data = read_all(0, &len);
    if (len < tables) {
        fprintf(stderr, "asload: stdin must start with the %d PCM and %d mu-law tone bodies\n",
                TONES, TONES);
        return 2;
    }
    memcpy(bodies, data, sizeof bodies);
    memcpy(ulaw_bodies, data + sizeof bodies, sizeof ulaw_bodies);
    memset(ulaw_silence, 0xFF, sizeof ulaw_silence);
    for (int t = 0; t < TONES; t++)
        for (int i = 0; i < ULAW_BODY; i++)
            masked_bodies[t][i] = ulaw_bodies[t][i] ^ ws_mask[(ULAW_SEQ + i) % 4];
    if (argc == 2 && (!strcmp(argv[1], "identify") || !strcmp(argv[1], "identify-ulaw")))
        return identify_stdin(data + tables, len - tables, !strcmp(argv[1], "identify-ulaw"));
    for (int i = 1; i < argc; i++) {
        char *v = strchr(argv[i], '=');
        if (!v) {
            fprintf(stderr, "asload: arguments are name=value, not %s\n", argv[i]);
            return 2;
        }
        *v++ = 0;
#define ARG(name, conv) else if (!strcmp(argv[i], #name)) name = conv(v)
        if (0) {}
        ARG(as_port, atoi); ARG(http_port, atoi); ARG(ws_port, atoi); ARG(first_index, atoi);
        ARG(burst, atoi); ARG(hold_from, atof); ARG(stop_at, atof); ARG(drain, atof);
        ARG(early, atof); ARG(jitter, atof);
        ARG(out_path, (const char *)); ARG(reg_head, (const char *)); ARG(reg_tail, (const char *));
        ARG(ws_head, (const char *)); ARG(ws_tail, (const char *)); ARG(ws_accept, (const char *));
        else if (!strcmp(argv[i], "seed")) rng = strtoull(v, NULL, 10);
        else if (!strcmp(argv[i], "pattern"))
            pattern = !strcmp(v, "bursty") ? BURSTY : !strcmp(v, "jittered") ? JITTERED : PACED;
        else if (!strcmp(argv[i], "transport") && !strcmp(v, "audiosocket")) transport = AUDIOSOCKET;
        else if (!strcmp(argv[i], "transport") && !strcmp(v, "websocket")) transport = WEBSOCKET;
        else if (!strcmp(argv[i], "transport") && !strcmp(v, "wss")) transport = WSS;
        else {
            fprintf(stderr, "asload: unknown argument %s=%s\n", argv[i], v);
            return 2;
        }
    }
    if (!out_path || burst < 1) {
        fprintf(stderr, "asload: out=PATH is required, burst at least 1\n");
        return 2;
    }
    if (transport != AUDIOSOCKET && (!http_port || !ws_port)) {
        fprintf(stderr, "asload: chan_websocket calls need http_port= and ws_port=\n");
        return 2;
    }
#ifdef ASLOAD_TLS
    if (transport == WSS) { /* the bench's own lab certificate: not verified */
        tls_ctx = SSL_CTX_new(TLS_client_method());
        SSL_CTX_set_verify(tls_ctx, SSL_VERIFY_NONE, NULL);
        SSL_CTX_set_mode(tls_ctx, SSL_MODE_ENABLE_PARTIAL_WRITE |
                                      SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
    }
#else
    if (transport == WSS) {
        fprintf(stderr, "asload: built without OpenSSL (-DASLOAD_TLS): no transport=wss\n");
        return 2;
    }
#endif
    signal(SIGPIPE, SIG_IGN); /* OpenSSL writes to the socket without MSG_NOSIGNAL */
    ncalls = (len - tables) / sizeof(double);
    calls = calloc(ncalls + 1, sizeof *calls);
    heap = calloc(ncalls + 1, sizeof *heap);
    for (int i = 0; i < ncalls; i++) {
        memcpy(&calls[i].start, data + tables + i * sizeof(double), sizeof(double));
        calls[i].fd = -1;
        calls[i].in = malloc(IN_CAP);
    }
    prctl(PR_SET_TIMERSLACK, 1UL); /* wake on the microsecond asked, not up to 50 us late */
    ep = epoll_create1(EPOLL_CLOEXEC);
    int tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
    struct epoll_event ev = {.events = EPOLLIN, .data.u32 = TIMER};
    epoll_ctl(ep, EPOLL_CTL_ADD, tfd, &ev);
    double cpu0 = cpu_now(), wall0 = mono();
    run(tfd);
    for (int i = 0; i < ncalls; i++) {
        struct call *c = &calls[i];
        hang_up(c);
        if (c->state == IN_CALL)
            c->state = DONE;
        else if (c->state != DONE && c->state != FAILED)
            fail(c, "not set up before the end");
    }
    double cpu1 = cpu_now(), wall = mono() - wall0;
    FILE *out = fopen(out_path, "wb");
    if (!out || fwrite(recs, sizeof *recs, nrecs, out) != nrecs || fclose(out)) {
        perror(out_path);
        return 1;
    }
    printf("cpu %.6f\nwall %.6f\nblocked %ld\n", cpu1 - cpu0, wall, blocked);
    printf("hold_share %.6f\n", hold_wall[1] > hold_wall[0] && hold_wall[0]
           ? (hold_cpu[1] - hold_cpu[0]) / (hold_wall[1] - hold_wall[0]) : NAN);
    for (int i = 0; i < ncalls; i++)
        if (calls[i].state == FAILED)
            printf("fail %d %s\n", i, calls[i].error);
    return 0;
}
