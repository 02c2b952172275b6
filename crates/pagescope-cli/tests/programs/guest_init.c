/*
 * The init of the migration tests' QEMU guest: a program that writes a
 * known pattern into its own memory at a known rate and checks that memory
 * against a ledger it keeps, so a migration that delivers a stale, torn or
 * mixed-up copy of guest RAM is seen from inside the guest.
 *
 * Kernel command line (all optional):
 *   ps.mib=N    MiB of memory to write and check (default 64)
 *   ps.rate=R   pages rewritten per second (default 2000)
 *   ps.check=S  seconds between two full checks (default 2)
 *
 * Every page holds a header {magic, index, version} and a body derived
 * from (index, version); the ledger (a separate allocation) holds each
 * page's version. A check compares every page's header with the ledger
 * and samples its body. Once a second it prints one line to the console:
 *
 *   ps-guest: seq=N uptime_ms=T written=W checks=C failures=F
 *
 * and on a failed page, before that line:
 *
 *   ps-guest: SELFCHECK FAIL page=I want=V got=V' (header|body)
 *
 * Build: gcc -static -O2 -o init guest_init.c
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096u
#define MAGIC 0x7073677565737431ull /* "psguest1" */

struct header {
    uint64_t magic;
    uint64_t index;
    uint64_t version;
};

static uint64_t mix(uint64_t x)
{
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdull;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ull;
    x ^= x >> 33;
    return x;
}

/* The body word `w` of page `index` at `version`. */
static uint64_t word(uint64_t index, uint64_t version, uint64_t w)
{
    return mix(index * 0x9e3779b97f4a7c15ull ^ version << 20 ^ w);
}

static void fill(unsigned char *page, uint64_t index, uint64_t version)
{
    uint64_t *words = (uint64_t *)page;
    for (uint64_t w = 3; w < PAGE / 8; w++)
        words[w] = word(index, version, w);
    struct header *h = (struct header *)page;
    h->index = index;
    h->version = version;
    h->magic = MAGIC;
}

static unsigned long param(const char *cmdline, const char *name, unsigned long dflt)
{
    const char *p = strstr(cmdline, name);
    if (!p)
        return dflt;
    return strtoul(p + strlen(name), NULL, 10);
}

static uint64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

static int console = 1;

static void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void say(const char *fmt, ...)
{
    char buf[256];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    if (n > 0)
        write(console, buf, (size_t)n < sizeof buf ? (size_t)n : sizeof buf - 1);
}

/* Checks every page; returns the number of bad pages (each reported). */
static unsigned long check(unsigned char *mem, const uint64_t *ledger, uint64_t pages)
{
    unsigned long bad = 0;
    for (uint64_t i = 0; i < pages; i++) {
        unsigned char *page = mem + i * PAGE;
        const struct header *h = (const struct header *)page;
        const uint64_t *words = (const uint64_t *)page;
        const char *what = NULL;
        if (h->magic != MAGIC || h->index != i || h->version != ledger[i])
            what = "header";
        else
            for (uint64_t w = 3 + i % 61; w < PAGE / 8; w += 61)
                if (words[w] != word(i, h->version, w)) {
                    what = "body";
                    break;
                }
        if (what) {
            if (bad < 8)
                say("ps-guest: SELFCHECK FAIL page=%llu want=%llu got=%llu (%s)\n",
                    (unsigned long long)i, (unsigned long long)ledger[i],
                    (unsigned long long)h->version, what);
            bad++;
        }
    }
    return bad;
}

int main(void)
{
    mkdir("/proc", 0555);
    mkdir("/dev", 0755);
    mount("proc", "/proc", "proc", 0, NULL);
    mount("devtmpfs", "/dev", "devtmpfs", 0, NULL);
    int fd = open("/dev/console", O_WRONLY);
    if (fd >= 0)
        console = fd;

    char cmdline[4096] = {0};
    int c = open("/proc/cmdline", O_RDONLY);
    if (c >= 0) {
        read(c, cmdline, sizeof cmdline - 1);
        close(c);
    }
    uint64_t pages = param(cmdline, "ps.mib=", 64) * (1024 * 1024 / PAGE);
    unsigned long rate = param(cmdline, "ps.rate=", 2000);
    unsigned long check_s = param(cmdline, "ps.check=", 2);

    unsigned char *mem = mmap(NULL, pages * PAGE, PROT_READ | PROT_WRITE,
                              MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    uint64_t *ledger = calloc(pages, sizeof *ledger);
    if (mem == MAP_FAILED || !ledger) {
        say("ps-guest: cannot allocate %llu pages\n", (unsigned long long)pages);
        for (;;)
            pause();
    }
    for (uint64_t i = 0; i < pages; i++)
        fill(mem + i * PAGE, i, 0);
    say("ps-guest: ready pages=%llu rate=%lu\n", (unsigned long long)pages, rate);

    /* Write in 10 ms ticks; a stride coprime to the page count visits every page. */
    uint64_t next = 0, stride = 7919, written = 0, seq = 0;
    unsigned long checks = 0, failures = 0;
    uint64_t start = now_ms(), last_report = start, last_check = start;
    double owed = 0;
    for (;;) {
        struct timespec tick = {0, 10 * 1000 * 1000};
        nanosleep(&tick, NULL);
        uint64_t t = now_ms();
        owed += rate / 100.0;
        for (; owed >= 1; owed -= 1) {
            uint64_t i = next;
            next = (next + stride) % pages;
            ledger[i]++;
            fill(mem + i * PAGE, i, ledger[i]);
            written++;
        }
        if (t - last_check >= check_s * 1000) {
            failures += check(mem, ledger, pages);
            checks++;
            last_check = now_ms();
        }
        if (t - last_report >= 1000) {
            say("ps-guest: seq=%llu uptime_ms=%llu written=%llu checks=%lu failures=%lu\n",
                (unsigned long long)seq++, (unsigned long long)(t - start),
                (unsigned long long)written, checks, failures);
            last_report = t;
        }
    }
}
