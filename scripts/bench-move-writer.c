/*
 * The target of scripts/bench-move: a process holding MIB MiB of private
 * anonymous memory, every word non-zero and different per page (as the
 * dump benchmark's child in crates/pagescope-bench/src/dump.rs), that
 * rewrites RATE pages per second at pseudo-random places (one word each,
 * xorshift positions, in 1 ms steps) once the memory is filled.
 *
 * Usage: bench-move-writer MIB RATE READY_FILE
 *   READY_FILE is created (holding the buffer's address) once every page
 *   is written; the process then writes until it is killed.
 * Standard descriptors should be /dev/null and the process in a session of
 * its own (CRIU dumps it: no terminal, no pipes).
 *
 * Build: cc -O2 -o bench-move-writer bench-move-writer.c
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096u

static uint64_t now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

int main(int argc, char **argv)
{
    if (argc != 4) {
        fprintf(stderr, "usage: %s MIB RATE READY_FILE\n", argv[0]);
        return 2;
    }
    uint64_t pages = strtoull(argv[1], NULL, 10) * (1u << 20) / PAGE;
    uint64_t rate = strtoull(argv[2], NULL, 10);
    uint64_t *m = mmap(NULL, pages * PAGE, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) {
        perror("mmap");
        return 1;
    }
    for (uint64_t p = 0; p < pages; p++) {
        uint64_t *page = m + p * (PAGE / 8);
        for (uint64_t w = 0; w < PAGE / 8; w++)
            page[w] = (p + 1) * 0x9e3779b97f4a7c15ull ^ (w + 1);
    }
    char tmp[4096];
    snprintf(tmp, sizeof tmp, "%s.tmp", argv[3]);
    FILE *f = fopen(tmp, "w");
    if (!f || fprintf(f, "%p\n", (void *)m) < 0 || fclose(f) != 0 || rename(tmp, argv[3]) != 0) {
        perror("ready file");
        return 1;
    }
    uint64_t x = 0x12345678u, value = 1, done = 0, since = now_us();
    for (;;) {
        uint64_t due = (now_us() - since) * rate / 1000000u;
        while (done < due) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            m[(x % pages) * (PAGE / 8) + 1] = ++value;
            done++;
        }
        usleep(1000);
    }
}
