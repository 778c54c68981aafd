/* asload: the bench's AudioSocket load client, in C so that it is never the bottleneck.
 *
 * The Python client (bench/client.py) fills one core near 1000 calls, so on a 2-core host it
 * cannot load a daemon pinned to the other core with 2000.  This program does the same work per
 * call on one epoll loop (a timerfd for the schedule): register over HTTP as Asterisk's CURL()
 * does, connect AudioSocket, send the UUID frame, then numbered 20 ms tone frames (the byte
 * layout of bench/frames.py) paced, bursty or jittered on the call's own phase; read the echo;
 * at the end send a hangup frame and close.  It judges nothing: it writes what happened as raw
 * records, and bench/cclient/__init__.py feeds them to the same EchoTracker and summary as the
 * Python client's, so both clients' figures come from one piece of code.
 *
 * Input: name=value arguments (see main); on stdin the 50 tone bodies (316 bytes each, frame
 * seq uses body seq % 50) and then each call's start (doubles, CLOCK_MONOTONIC s, ascending).
 * Output: `struct rec`s to the file out=PATH; on stdout "cpu S", "hold_share F" (CPU over wall
 * time in the hold window), "wall S", "blocked N" and one "fail CALL REASON" per failed call.
 * `asload identify` reads the bodies, then (u16 length, payload) pairs, and prints each
 * payload's identity: bench/frames.py `identify`, for tests.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <math.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#define FRAME_S 0.020
#define PAYLOAD 320
#define BODY (PAYLOAD - 4)
#define TONES 50
#define MARK 0x80000000u
#define IN_CAP 8192 /* bytes of a reply or of frames not yet whole, per call */
#define OUT_MAX (1 << 20) /* bytes the kernel has not taken, per call, before giving up */
#define TIMER UINT32_MAX  /* the timerfd's epoll tag; calls are tagged by index */

enum { WAITING, REG_CONNECT, REG_READ, AS_CONNECT, IN_CALL, DONE, FAILED };
enum { R_SETUP, R_SENT, R_RECV, R_LAG }; /* record kinds; the wrapper names them too */
enum { PACED, BURSTY, JITTERED };

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
    unsigned char *in, *out;
    size_t in_len, out_len, out_cap;
    char error[120];
};

static unsigned char bodies[TONES][BODY], zeros[BODY];
static struct call *calls;
static int ncalls, ep;
static struct rec *recs;
static size_t nrecs, caprecs;
static long blocked;
static uint64_t rng;
/* the plan */
static int as_port, http_port, first_index, pattern = PACED, burst = 5;
static double hold_from, stop_at, drain = 2.0, early = 0.0005, jitter = 0.010;
static double hold_cpu[2], hold_wall[2]; /* CPU, wall time when the loop saw the hold begin, end */
static const char *out_path, *reg_head = "", *reg_tail = "";

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

static void fail(struct call *c, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(c->error, sizeof c->error, fmt, ap);
    va_end(ap);
    c->state = FAILED;
    if (c->fd >= 0)
        close(c->fd);
    c->fd = -1;
}

static void watch(struct call *c, int out) { /* EPOLLOUT only while bytes wait for the kernel */
    struct epoll_event ev = {.events = EPOLLIN | (out ? EPOLLOUT : 0), .data.u32 = c - calls};
    if (out != c->want_out && epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev) == 0)
        c->want_out = out;
}

static void flush_out(struct call *c) {
    ssize_t n = send(c->fd, c->out, c->out_len, MSG_NOSIGNAL);
    if (n < 0 && errno != EAGAIN) {
        fail(c, "send: %s", strerror(errno));
        return;
    }
    if (n > 0)
        memmove(c->out, c->out + n, c->out_len -= n);
    watch(c, c->out_len > 0);
}

/* Write bytes; what the kernel does not take waits in the call's buffer, in order. */
static void put(struct call *c, const void *data, size_t len) {
    size_t done = 0;
    if (c->out_len) {
        blocked++;
    } else {
        ssize_t n = send(c->fd, data, len, MSG_NOSIGNAL);
        if (n < 0 && errno != EAGAIN) {
            fail(c, "send: %s", strerror(errno));
            return;
        }
        done = n > 0 ? (size_t)n : 0;
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

static void send_due(struct call *c, double due, unsigned char *buf) {
    double now = mono();
    int n = pattern == BURSTY ? burst : 1;
    record(R_LAG, c - calls, 0, now - due);
    for (int i = 0; i < n; i++) {
        uint32_t seq = c->next_frame++, word = seq | MARK;
        unsigned char *f = buf + i * (3 + PAYLOAD);
        f[0] = 0x10, f[1] = PAYLOAD >> 8, f[2] = PAYLOAD & 0xFF;
        for (int b = 0; b < 4; b++)
            f[3 + b] = word >> (8 * b);
        memcpy(f + 7, bodies[seq % TONES], BODY);
        record(R_SENT, c - calls, (int32_t)seq, now);
    }
    put(c, buf, n * (3 + PAYLOAD));
    if (c->state == IN_CALL)
        heap_push(next_due(c), c - calls);
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
    unsigned char hello[19] = {0x01, 0x00, 16};
    memcpy(hello + 3, c->id, 16);
    c->state = IN_CALL, c->due_base = now, c->next_frame = c->expect = 1;
    put(c, hello, sizeof hello);
    heap_push(pattern == BURSTY ? now + (burst - 1) * FRAME_S : now, c - calls);
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
    close(c->fd);
    c->fd = -1;
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
    connect_to(c, as_port, AS_CONNECT);
    return;
bad:
    fail(c, "registration: the body is not a UUID");
}

static void server_closed(struct call *c, double now, const char *why) {
    if (now < stop_at) {
        fail(c, "%s", c->error[0] ? c->error : why);
    } else {
        c->state = DONE;
        close(c->fd);
        c->fd = -1;
    }
}

static int frame_ok(int kind, unsigned len) {
    if (kind >= 0x10 && kind <= 0x18)
        return !(len & 1) && len <= IN_CAP - 3;
    return (kind == 0x00 && len == 0) || (kind == 0x01 && len == 16) ||
           ((kind == 0x03 || kind == 0xFF) && len == 1);
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
            int32_t ident = identify(f + 3, len);
            if (ident > 0 && (uint32_t)ident >= c->expect && (uint32_t)ident < c->next_frame)
                c->expect = ident + 1;
            record(R_RECV, c - calls, ident, now);
        } else if (kind == 0x00) {
            if (now < stop_at)
                fail(c, "server sent a hangup frame");
            c->in_len = 0;
            return;
        } else {
            record(R_RECV, c - calls, -1, now);
        }
        pos += 3 + len;
    }
    memmove(c->in, c->in + pos, c->in_len -= pos);
}

static void event(struct call *c, uint32_t mask) {
    double now = mono();
    if (c->state == REG_CONNECT || c->state == AS_CONNECT) {
        connected(c, now);
        return;
    }
    if ((mask & EPOLLOUT) && c->out_len) {
        flush_out(c);
        if (c->state == FAILED || !(mask & (EPOLLIN | EPOLLHUP | EPOLLERR)))
            return;
    }
    ssize_t n = recv(c->fd, c->in + c->in_len, IN_CAP - c->in_len, 0);
    if (n < 0 && (errno == EAGAIN || errno == EINTR))
        return;
    if (n < 0)
        snprintf(c->error, sizeof c->error, "recv: %s", strerror(errno));
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
    frames_in(c, now);
}

static int all_echoed(void) {
    for (int i = 0; i < ncalls; i++)
        if (calls[i].state == IN_CALL && calls[i].expect < calls[i].next_frame)
            return 0;
    return 1;
}

static void run(int tfd) {
    double end = stop_at + drain, armed = 0;
    unsigned char *buf = malloc((size_t)burst * (3 + PAYLOAD));
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

static unsigned char *read_all(int fd, size_t *len) {
    size_t cap = 1 << 16;
    unsigned char *data = malloc(cap);
    ssize_t n;
    for (*len = 0; (n = read(fd, data + *len, cap - *len)) > 0;)
        if ((*len += n) == cap)
            data = realloc(data, cap *= 2);
    return data;
}

static int identify_stdin(unsigned char *data, size_t len) {
    for (size_t pos = 0; pos + 2 <= len;) {
        size_t n = data[pos] | data[pos + 1] << 8;
        printf("%d\n", identify(data + pos + 2, n));
        pos += 2 + n;
    }
    return 0;
}

int main(int argc, char **argv) {
    size_t len;
    unsigned char *data = read_all(0, &len);
    if (len < sizeof bodies) {
        fprintf(stderr, "asload: stdin must start with the %d tone bodies\n", TONES);
        return 2;
    }
    memcpy(bodies, data, sizeof bodies);
    if (argc == 2 && !strcmp(argv[1], "identify"))
        return identify_stdin(data + sizeof bodies, len - sizeof bodies);
    for (int i = 1; i < argc; i++) {
        char *v = strchr(argv[i], '=');
        if (!v) {
            fprintf(stderr, "asload: arguments are name=value, not %s\n", argv[i]);
            return 2;
        }
        *v++ = 0;
#define ARG(name, conv) else if (!strcmp(argv[i], #name)) name = conv(v)
        if (0) {}
        ARG(as_port, atoi); ARG(http_port, atoi); ARG(first_index, atoi); ARG(burst, atoi);
        ARG(hold_from, atof); ARG(stop_at, atof); ARG(drain, atof); ARG(early, atof);
        ARG(jitter, atof);
        ARG(out_path, (const char *)); ARG(reg_head, (const char *)); ARG(reg_tail, (const char *));
        else if (!strcmp(argv[i], "seed")) rng = strtoull(v, NULL, 10);
        else if (!strcmp(argv[i], "pattern"))
            pattern = !strcmp(v, "bursty") ? BURSTY : !strcmp(v, "jittered") ? JITTERED : PACED;
        else {
            fprintf(stderr, "asload: unknown argument %s\n", argv[i]);
            return 2;
        }
    }
    if (!out_path || burst < 1) {
        fprintf(stderr, "asload: out=PATH is required, burst at least 1\n");
        return 2;
    }
    ncalls = (len - sizeof bodies) / sizeof(double);
    calls = calloc(ncalls + 1, sizeof *calls);
    heap = calloc(ncalls + 1, sizeof *heap);
    for (int i = 0; i < ncalls; i++) {
        memcpy(&calls[i].start, data + sizeof bodies + i * sizeof(double), sizeof(double));
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
    static const unsigned char hangup[3] = {0x00, 0x00, 0x00};
    for (int i = 0; i < ncalls; i++) { /* as Asterisk does: a hangup frame, then close */
        struct call *c = &calls[i];
        if (c->state == IN_CALL && !c->out_len) /* never inside a frame the kernel has half of */
            send(c->fd, hangup, sizeof hangup, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (c->fd >= 0)
            close(c->fd);
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
