/*
 * bench_loadgen.c: the C load generator of `deno task bench`.
 *
 * The bench compiles it at run time (`cc -O2`) into a temporary folder and
 * runs it in place of `bench_load.ts` when a C compiler is there. It sends
 * exactly the bytes `bench_load.ts` would: the bench builds them with
 * `bench_payload.ts` and hands them over in a payload file (format below),
 * so the keys, values and datagram packing have one source only.
 *
 *   bench_loadgen --payload FILE --transport udp|tcp --count N --host H --port P
 *                 [--rate N] [--tick-us N] [--connections N] [--senders N]
 *
 * Control protocol (the same as bench_load.ts): it reads the payload and
 * connects, prints `ready`, waits for a `go` line on standard input, sends
 * exactly N metrics, prints one JSON line
 *   {"sent":N,"sends":N,"errors":N,"startedAt":MS,"endedAt":MS}
 * (times in ms since the epoch) and exits when standard input ends. On a
 * fatal error it prints {"error":"..."} and exits with status 1. It dies
 * with its parent (PR_SET_PDEATHSIG), so it never outlives the bench.
 *
 * UDP: one thread, `--senders` connected sockets (default 8, so that a
 * proxy with SO_REUSEPORT threads sees several flows); datagram k goes to
 * socket k % senders; each socket's share of a tick goes out in one
 * sendmmsg(2). TCP: one thread per connection (default 4), plain blocking
 * writes of at most 128 KiB cut on metric boundaries. With --rate, every
 * --tick-us (default 1000) it sends what is due at that rate since the
 * start (clock_nanosleep on an absolute deadline); without, as fast as it
 * can.
 *
 * Payload file, little-endian:
 *   "SPLG" u32:version(1) u32:lines u32:bytes u32:datagrams
 *   u32 offsets[lines + 1]   start of line i in the bytes; offsets[lines] = bytes
 *   u32 first[datagrams]     first line of datagram d
 *   u32 metrics[datagrams]   lines in datagram d (it ends before the last line's '\n')
 *   bytes
 * Lines end in '\n' (ascii) or are statsite binary frames; TCP writes slices
 * of the bytes, UDP sends the datagrams.
 */

#define _GNU_SOURCE
#include <errno.h>
#include <netdb.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define WRITE_BYTES (128 * 1024) /* largest TCP write */
#define BATCH 256                /* most datagrams per sendmmsg */
#define MAX_SENDERS 64
#define MAX_ERRORS 10000

struct payload {
    uint32_t lines;
    uint32_t nbytes;
    uint32_t datagrams;
    const uint32_t *offsets;
    const uint32_t *first;
    const uint32_t *metrics;
    const uint8_t *bytes;
};

struct options {
    const char *payload;
    const char *transport;
    const char *host;
    const char *port;
    uint64_t count;
    double rate;
    uint64_t tick_ns;
    int connections;
    int senders;
};

static struct payload P;
static struct options O;

static void fail(const char *what, int err) {
    char msg[512];
    if (err != 0) {
        snprintf(msg, sizeof msg, "%s: %s", what, strerror(err));
    } else {
        snprintf(msg, sizeof msg, "%s", what);
    }
    /* The message holds no quotes or backslashes except from strerror, which has none. */
    printf("{\"error\":\"%s\"}\n", msg);
    fflush(stdout);
    exit(1);
}

static uint64_t mono_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static double wall_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec * 1000.0 + (double)ts.tv_nsec / 1e6;
}

static void sleep_until(uint64_t deadline_ns) {
    struct timespec ts = {(time_t)(deadline_ns / 1000000000u), (long)(deadline_ns % 1000000000u)};
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR) {
    }
}

static uint32_t u32(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

/* Reads and checks the payload file; the arrays are copied out so they are aligned. */
static void load_payload(const char *path) {
    FILE *f = fopen(path, "rb");
    if (f == NULL) fail("cannot open the payload", errno);
    if (fseek(f, 0, SEEK_END) != 0) fail("cannot read the payload", errno);
    long size = ftell(f);
    rewind(f);
    if (size < 20) fail("payload too short", 0);
    uint8_t *raw = malloc((size_t)size);
    if (raw == NULL) fail("out of memory", 0);
    if (fread(raw, 1, (size_t)size, f) != (size_t)size) fail("cannot read the payload", errno);
    fclose(f);
    if (memcmp(raw, "SPLG", 4) != 0 || u32(raw + 4) != 1) fail("not a version 1 payload", 0);
    P.lines = u32(raw + 8);
    P.nbytes = u32(raw + 12);
    P.datagrams = u32(raw + 16);
    uint64_t words = (uint64_t)P.lines + 1 + 2 * (uint64_t)P.datagrams;
    if (P.lines == 0 || 20 + 4 * words + P.nbytes != (uint64_t)size) fail("payload size mismatch", 0);
    uint32_t *table = malloc(words * 4);
    if (table == NULL) fail("out of memory", 0);
    for (uint64_t i = 0; i < words; i++) table[i] = u32(raw + 20 + 4 * i);
    P.offsets = table;
    P.first = table + P.lines + 1;
    P.metrics = P.first + P.datagrams;
    P.bytes = raw + 20 + 4 * words;
    if (P.offsets[P.lines] != P.nbytes) fail("payload offsets mismatch", 0);
    for (uint32_t i = 0; i < P.lines; i++) {
        if (P.offsets[i] >= P.offsets[i + 1]) fail("payload offsets not increasing", 0);
    }
    for (uint32_t d = 0; d < P.datagrams; d++) {
        if (P.metrics[d] == 0 || (uint64_t)P.first[d] + P.metrics[d] > P.lines) {
            fail("payload datagram out of range", 0);
        }
    }
}

/* A socket of type `type` connected to the target. */
static int connect_target(int type) {
    struct addrinfo hints = {0}, *res, *ai;
    hints.ai_socktype = type;
    int err = getaddrinfo(O.host, O.port, &hints, &res);
    if (err != 0) fail(gai_strerror(err), 0);
    int fd = -1, last = 0;
    for (ai = res; ai != NULL; ai = ai->ai_next) {
        fd = socket(ai->ai_family, ai->ai_socktype, ai->ai_protocol);
        if (fd < 0) {
            last = errno;
            continue;
        }
        if (connect(fd, ai->ai_addr, ai->ai_addrlen) == 0) break;
        last = errno;
        close(fd);
        fd = -1;
    }
    freeaddrinfo(res);
    if (fd < 0) fail("cannot connect", last);
    return fd;
}

/* Metrics due by `now` at `rate` per second since `start`, a tick ahead, at most `quota`. */
static uint64_t due_by(uint64_t quota, double rate, uint64_t start, uint64_t now) {
    double due = rate * (double)(now - start + O.tick_ns) / 1e9;
    if (due >= (double)quota) return quota;
    uint64_t n = (uint64_t)due;
    return (double)n < due ? n + 1 : n;
}

/* ---- UDP: one thread, sendmmsg per socket ---- */

static int udp_fds[MAX_SENDERS];
static struct mmsghdr udp_msgs[MAX_SENDERS][BATCH];
static struct iovec udp_iovs[MAX_SENDERS][BATCH];
static uint32_t udp_lines[MAX_SENDERS][BATCH];
static int udp_queued[MAX_SENDERS];
static uint64_t udp_sent, udp_sends, udp_errors;
static uint32_t udp_next;   /* next datagram of the payload */
static unsigned udp_socket; /* socket of the next datagram */

static void udp_flush(int s) {
    int off = 0, n = udp_queued[s];
    while (off < n) {
        int r = sendmmsg(udp_fds[s], udp_msgs[s] + off, (unsigned)(n - off), 0);
        if (r < 0) {
            if (errno == EINTR) continue;
            /* The first datagram failed (e.g. ECONNREFUSED after an ICMP error): skip it. */
            if (++udp_errors > MAX_ERRORS) fail("too many send errors", errno);
            off++;
            continue;
        }
        for (int i = off; i < off + r; i++) udp_sent += udp_lines[s][i];
        udp_sends += (uint64_t)r;
        off += r;
    }
    udp_queued[s] = 0;
}

/* Sends whole datagrams until `due` metrics are done or `*left` is 0 (the last one may be cut). */
static uint64_t udp_send(uint64_t due, uint64_t *left) {
    uint64_t done = 0;
    while (done < due && *left > 0) {
        int full = 0;
        while (done < due && *left > 0 && !full) {
            unsigned s = udp_socket;
            udp_socket = udp_socket + 1 == (unsigned)O.senders ? 0 : udp_socket + 1;
            uint32_t d = udp_next;
            udp_next = udp_next + 1 == P.datagrams ? 0 : udp_next + 1;
            uint32_t m = P.metrics[d];
            if (m > *left) m = (uint32_t)*left;
            uint32_t from = P.offsets[P.first[d]];
            uint32_t to = P.offsets[P.first[d] + m] - 1; /* without the last line's '\n' */
            int q = udp_queued[s]++;
            udp_iovs[s][q].iov_base = (void *)(P.bytes + from);
            udp_iovs[s][q].iov_len = to - from;
            udp_lines[s][q] = m;
            *left -= m;
            done += m;
            full = udp_queued[s] == BATCH;
        }
        for (int s = 0; s < O.senders; s++) {
            if (udp_queued[s] > 0) udp_flush(s);
        }
    }
    return done;
}

static void run_udp(void) {
    for (int s = 0; s < O.senders; s++) {
        udp_fds[s] = connect_target(SOCK_DGRAM);
        for (int i = 0; i < BATCH; i++) {
            udp_msgs[s][i].msg_hdr.msg_iov = &udp_iovs[s][i];
            udp_msgs[s][i].msg_hdr.msg_iovlen = 1;
        }
    }
}

static void send_udp(void) {
    uint64_t left = O.count;
    if (O.rate <= 0) {
        udp_send(left, &left);
        return;
    }
    uint64_t start = mono_ns(), deadline = start, done = 0;
    while (left > 0) {
        uint64_t due = due_by(O.count, O.rate, start, mono_ns());
        if (due > done) done += udp_send(due - done, &left);
        deadline += O.tick_ns;
        uint64_t now = mono_ns();
        if (deadline + O.tick_ns < now) deadline = now; /* fell behind: no burst of empty ticks */
        if (deadline > now) sleep_until(deadline);
    }
}

/* ---- TCP: a thread per connection, blocking writes ---- */

struct tcp_conn {
    pthread_t thread;
    int fd;
    uint32_t pos; /* next line of the payload */
    uint64_t quota;
    uint64_t start;
    uint64_t sent, sends;
    int err;
};

static uint32_t per_write;

static int write_all(int fd, const uint8_t *p, size_t n) {
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0) {
            if (errno == EINTR) continue;
            return errno;
        }
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

/* Writes `n` metrics from the connection's position, in writes of at most `per_write`. */
static int tcp_send(struct tcp_conn *c, uint64_t n) {
    while (n > 0) {
        uint64_t take = n;
        if (take > P.lines - c->pos) take = P.lines - c->pos;
        if (take > per_write) take = per_write;
        uint32_t from = P.offsets[c->pos], to = P.offsets[c->pos + take];
        int err = write_all(c->fd, P.bytes + from, to - from);
        if (err != 0) return err;
        c->sends++;
        c->sent += take;
        n -= take;
        c->pos = (uint32_t)((c->pos + take) % P.lines);
    }
    return 0;
}

static void *tcp_thread(void *arg) {
    struct tcp_conn *c = arg;
    if (O.rate <= 0) {
        c->err = tcp_send(c, c->quota);
        return NULL;
    }
    double rate = O.rate / O.connections;
    uint64_t deadline = c->start;
    while (c->sent < c->quota) {
        uint64_t due = due_by(c->quota, rate, c->start, mono_ns());
        if (due > c->sent && (c->err = tcp_send(c, due - c->sent)) != 0) return NULL;
        deadline += O.tick_ns;
        uint64_t now = mono_ns();
        if (deadline + O.tick_ns < now) deadline = now;
        if (deadline > now) sleep_until(deadline);
    }
    return NULL;
}

static struct tcp_conn *tcp_conns;

static void run_tcp(void) {
    tcp_conns = calloc((size_t)O.connections, sizeof *tcp_conns);
    if (tcp_conns == NULL) fail("out of memory", 0);
    uint32_t avg = P.nbytes / P.lines;
    per_write = WRITE_BYTES / (avg > 0 ? avg : 1);
    if (per_write == 0) per_write = 1;
    for (int i = 0; i < O.connections; i++) {
        struct tcp_conn *c = &tcp_conns[i];
        c->fd = connect_target(SOCK_STREAM);
        c->pos = (uint32_t)((uint64_t)i * P.lines / (uint64_t)O.connections);
        c->quota = O.count / (uint64_t)O.connections + ((uint64_t)i < O.count % (uint64_t)O.connections);
    }
}

static void send_tcp(uint64_t *sent, uint64_t *sends) {
    uint64_t start = mono_ns();
    for (int i = 0; i < O.connections; i++) {
        tcp_conns[i].start = start;
        int err = pthread_create(&tcp_conns[i].thread, NULL, tcp_thread, &tcp_conns[i]);
        if (err != 0) fail("cannot start a thread", err);
    }
    int err = 0;
    for (int i = 0; i < O.connections; i++) {
        pthread_join(tcp_conns[i].thread, NULL);
        *sent += tcp_conns[i].sent;
        *sends += tcp_conns[i].sends;
        if (tcp_conns[i].err != 0) err = tcp_conns[i].err;
    }
    if (err != 0) fail("write failed", err);
}

/* ---- main ---- */

static uint64_t number(const char *name, const char *text) {
    char *end;
    errno = 0;
    unsigned long long n = strtoull(text, &end, 10);
    if (errno != 0 || *end != '\0' || end == text || text[0] == '-') {
        char msg[128];
        snprintf(msg, sizeof msg, "--%s must be an integer >= 0", name);
        fail(msg, 0);
    }
    return n;
}

static void parse_args(int argc, char **argv) {
    O.host = "127.0.0.1";
    O.tick_ns = 1000000;
    O.connections = 4;
    O.senders = 8;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (strncmp(a, "--", 2) != 0 || i + 1 >= argc) fail("usage: see bench_loadgen.c", 0);
        const char *v = argv[++i];
        a += 2;
        if (strcmp(a, "payload") == 0) O.payload = v;
        else if (strcmp(a, "transport") == 0) O.transport = v;
        else if (strcmp(a, "host") == 0) O.host = v;
        else if (strcmp(a, "port") == 0) O.port = v;
        else if (strcmp(a, "count") == 0) O.count = number(a, v);
        else if (strcmp(a, "rate") == 0) O.rate = (double)number(a, v);
        else if (strcmp(a, "tick-us") == 0) O.tick_ns = number(a, v) * 1000;
        else if (strcmp(a, "connections") == 0) O.connections = (int)number(a, v);
        else if (strcmp(a, "senders") == 0) O.senders = (int)number(a, v);
        else fail("unknown option", 0);
    }
    if (O.payload == NULL || O.transport == NULL || O.port == NULL) {
        fail("--payload, --transport and --port are required", 0);
    }
    if (strcmp(O.transport, "udp") != 0 && strcmp(O.transport, "tcp") != 0) {
        fail("--transport must be udp or tcp", 0);
    }
    if (O.tick_ns < 10000) O.tick_ns = 10000;
    if (O.connections < 1) O.connections = 1;
    if (O.senders < 1) O.senders = 1;
    if (O.senders > MAX_SENDERS) O.senders = MAX_SENDERS;
}

int main(int argc, char **argv) {
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    signal(SIGPIPE, SIG_IGN);
    parse_args(argc, argv);
    load_payload(O.payload);
    int udp = strcmp(O.transport, "udp") == 0;
    if (udp && P.datagrams == 0) fail("the payload has no datagrams", 0);
    if (udp) run_udp();
    else run_tcp();

    printf("ready\n");
    fflush(stdout);
    char line[256];
    for (;;) {
        if (fgets(line, sizeof line, stdin) == NULL) return 0;
        if (strncmp(line, "go", 2) == 0 && (line[2] == '\n' || line[2] == '\r' || line[2] == '\0')) {
            break;
        }
    }

    uint64_t sent = 0, sends = 0, errors = 0;
    double started = wall_ms();
    if (udp) {
        send_udp();
        sent = udp_sent;
        sends = udp_sends;
        errors = udp_errors;
    } else {
        send_tcp(&sent, &sends);
    }
    double ended = wall_ms();
    printf("{\"sent\":%llu,\"sends\":%llu,\"errors\":%llu,\"startedAt\":%.3f,\"endedAt\":%.3f}\n",
           (unsigned long long)sent, (unsigned long long)sends, (unsigned long long)errors, started,
           ended);
    fflush(stdout);
    /* Wait for the end of standard input, so the bench can read this process's CPU time first. */
    while (fgets(line, sizeof line, stdin) != NULL) {
    }
    return 0;
}
