/* A target blocked in one system call, for the EINTR tests
 * (tests/eintr.rs builds it with cc).
 *
 *   blocking CALL TIMEOUT_MS
 *
 * Sets CALL up, prints "ready", then blocks in CALL (TIMEOUT_MS < 0: no
 * timeout). When the call returns it prints one line and exits:
 *   "returned CALL rc=RC errno=NAME elapsed_ms=MS usr1=N"
 * SIGUSR1 has a handler (no SA_RESTART) that counts in usr1; SIGUSR2
 * makes the program print "alive" (the test's way to check it is still
 * blocked is that nothing was printed). */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/aio_abi.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/inotify.h>
#include <sys/ipc.h>
#include <sys/msg.h>
#include <sys/select.h>
#include <sys/sem.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>
#include <linux/futex.h>

static volatile sig_atomic_t usr1;
static void on_usr1(int s) { (void)s; usr1++; }

static void *reader(void *arg) {
    char b;
    (void)!read(*(int *)arg, &b, 1);
    return NULL;
}

static double now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

static struct timespec ts_of(long ms) {
    struct timespec t = {ms / 1000, (ms % 1000) * 1000000L};
    return t;
}

static int sock_timeo(int fd, int opt, long ms) {
    struct timeval tv = {ms / 1000, (ms % 1000) * 1000};
    if (ms < 0) return 0;
    return setsockopt(fd, SOL_SOCKET, opt, &tv, sizeof tv);
}

int main(int argc, char **argv) {
    if (argc < 3) { fprintf(stderr, "usage: blocking CALL TIMEOUT_MS\n"); return 2; }
    const char *call = argv[1];
    long ms = atol(argv[2]);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_usr1; /* no SA_RESTART */
    sigaction(SIGUSR1, &sa, NULL);
    setvbuf(stdout, NULL, _IONBF, 0);
    long rc = -1;
    int fds[2];
    struct timespec t = ts_of(ms);
    struct timespec *tp = ms < 0 ? NULL : &t;
    double t0;
#define READY() do { puts("ready"); t0 = now_ms(); } while (0)
    if (!strcmp(call, "epoll_wait_threaded")) {
        /* A second thread blocked in read(): an injection should pick it. */
        static int p[2];
        pthread_t th;
        pipe(p);
        pthread_create(&th, NULL, reader, &p[0]);
        usleep(50000);
        int ep = epoll_create1(0);
        struct epoll_event ev[1];
        READY();
        rc = epoll_wait(ep, ev, 1, (int)ms);
    } else if (!strcmp(call, "epoll_wait") || !strcmp(call, "epoll_pwait") || !strcmp(call, "epoll_pwait2")) {
        int ep = epoll_create1(0);
        struct epoll_event ev[1];
        READY();
        if (!strcmp(call, "epoll_wait")) rc = epoll_wait(ep, ev, 1, (int)ms);
        else if (!strcmp(call, "epoll_pwait")) rc = epoll_pwait(ep, ev, 1, (int)ms, NULL);
        else rc = syscall(SYS_epoll_pwait2, ep, ev, 1, tp, NULL, 8);
    } else if (!strcmp(call, "semop") || !strcmp(call, "semtimedop")) {
        int id = semget(IPC_PRIVATE, 1, 0600);
        struct sembuf op = {0, -1, 0};
        READY();
        rc = !strcmp(call, "semop") ? semop(id, &op, 1) : semtimedop(id, &op, 1, tp);
        semctl(id, 0, IPC_RMID);
    } else if (!strcmp(call, "sigtimedwait") || !strcmp(call, "sigwaitinfo")) {
        sigset_t set;
        sigemptyset(&set);
        sigaddset(&set, SIGRTMIN);
        sigprocmask(SIG_BLOCK, &set, NULL);
        siginfo_t si;
        READY();
        rc = !strcmp(call, "sigwaitinfo") ? sigwaitinfo(&set, &si) : sigtimedwait(&set, &si, tp ? tp : &(struct timespec){3600, 0});
    } else if (!strcmp(call, "io_getevents")) {
        aio_context_t ctx = 0;
        syscall(SYS_io_setup, 4, &ctx);
        struct io_event e[1];
        READY();
        rc = syscall(SYS_io_getevents, ctx, 1, 1, e, tp);
    } else if (!strcmp(call, "recv_timeo") || !strcmp(call, "recvmmsg")) {
        socketpair(AF_UNIX, SOCK_STREAM, 0, fds);
        char b[8];
        if (!strcmp(call, "recv_timeo")) {
            sock_timeo(fds[0], SO_RCVTIMEO, ms < 0 ? 3600000 : ms);
            READY();
            rc = recv(fds[0], b, sizeof b, 0);
        } else {
            struct iovec io = {b, sizeof b};
            struct mmsghdr m;
            memset(&m, 0, sizeof m);
            m.msg_hdr.msg_iov = &io;
            m.msg_hdr.msg_iovlen = 1;
            struct timespec big = {3600, 0};
            READY();
            rc = recvmmsg(fds[0], &m, 1, 0, tp ? tp : &big);
        }
    } else if (!strcmp(call, "accept_timeo")) {
        int l = socket(AF_UNIX, SOCK_STREAM, 0);
        struct sockaddr_un a = {.sun_family = AF_UNIX};
        snprintf(a.sun_path + 1, sizeof a.sun_path - 1, "blocking-%d", getpid());
        bind(l, (struct sockaddr *)&a, sizeof a);
        listen(l, 1);
        sock_timeo(l, SO_RCVTIMEO, ms < 0 ? 3600000 : ms);
        READY();
        rc = accept(l, NULL, NULL);
    } else if (!strcmp(call, "send_timeo")) {
        socketpair(AF_UNIX, SOCK_STREAM, 0, fds);
        char b[4096] = {0};
        fcntl(fds[0], F_SETFL, O_NONBLOCK);
        while (send(fds[0], b, sizeof b, 0) > 0) {}
        fcntl(fds[0], F_SETFL, 0);
        sock_timeo(fds[0], SO_SNDTIMEO, ms < 0 ? 3600000 : ms);
        READY();
        rc = send(fds[0], b, sizeof b, 0);
    } else if (!strcmp(call, "msgrcv") || !strcmp(call, "msgsnd")) {
        int q = msgget(IPC_PRIVATE, 0600);
        struct { long type; char text[1024]; } m = {1, {0}};
        if (!strcmp(call, "msgsnd")) {
            while (msgsnd(q, &m, sizeof m.text, IPC_NOWAIT) == 0) {}
            READY();
            rc = msgsnd(q, &m, sizeof m.text, 0);
        } else {
            READY();
            rc = msgrcv(q, &m, sizeof m.text, 0, 0);
        }
        msgctl(q, IPC_RMID, NULL);
    } else if (!strcmp(call, "futex")) {
        static uint32_t word;
        READY();
        rc = syscall(SYS_futex, &word, FUTEX_WAIT_PRIVATE, 0, tp, NULL, 0);
    } else if (!strcmp(call, "nanosleep")) {
        struct timespec big = {3600, 0};
        READY();
        rc = nanosleep(tp ? tp : &big, NULL);
    } else if (!strcmp(call, "clock_nanosleep_abs")) {
        struct timespec at;
        clock_gettime(CLOCK_MONOTONIC, &at);
        at.tv_sec += ms < 0 ? 3600 : ms / 1000;
        at.tv_nsec += ms < 0 ? 0 : (ms % 1000) * 1000000L;
        if (at.tv_nsec >= 1000000000L) { at.tv_sec++; at.tv_nsec -= 1000000000L; }
        READY();
        rc = clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &at, NULL);
        if (rc) { errno = (int)rc; rc = -1; }
    } else if (!strcmp(call, "poll") || !strcmp(call, "ppoll") || !strcmp(call, "select") || !strcmp(call, "pselect") || !strcmp(call, "read")) {
        pipe(fds);
        struct pollfd p = {fds[0], POLLIN, 0};
        fd_set r;
        FD_ZERO(&r);
        FD_SET(fds[0], &r);
        struct timeval tv = {ms / 1000, (ms % 1000) * 1000};
        char b[8];
        READY();
        if (!strcmp(call, "poll")) rc = poll(&p, 1, (int)ms);
        else if (!strcmp(call, "ppoll")) rc = ppoll(&p, 1, tp, NULL);
        else if (!strcmp(call, "select")) rc = select(fds[0] + 1, &r, NULL, NULL, ms < 0 ? NULL : &tv);
        else if (!strcmp(call, "pselect")) rc = pselect(fds[0] + 1, &r, NULL, NULL, tp, NULL);
        else rc = read(fds[0], b, sizeof b);
    } else if (!strcmp(call, "inotify_read")) {
        int in = inotify_init1(0);
        inotify_add_watch(in, "/", IN_DELETE_SELF);
        char b[4096];
        READY();
        rc = read(in, b, sizeof b);
    } else if (!strcmp(call, "pause")) {
        READY();
        rc = pause();
    } else {
        fprintf(stderr, "unknown call %s\n", call);
        return 2;
    }
    int e = errno;
    printf("returned %s rc=%ld errno=%s elapsed_ms=%.0f usr1=%d\n", call, rc,
           rc < 0 ? strerrorname_np(e) : "0", now_ms() - t0, (int)usr1);
    return 0;
}
