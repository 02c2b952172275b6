"""A pre-fork server: the parent maps a MAP_SHARED|MAP_ANONYMOUS segment
and forks RATE children per second for SECONDS; each child writes PAGES
pages of the segment (each stamped with its page index and the child's
serial number) and exits at once. Every child appends one line to LOG:
  serial pid t_start t_end page page ...
(CLOCK_MONOTONIC seconds before its first and after its last write), so a
test knows exactly which pages were written when. Prints 'ready' once the
segment is mapped and touched; stops forking on SIGTERM or after SECONDS,
then waits (sleeping) until killed."""
import mmap
import os
import signal
import struct
import sys
import time

rate = float(sys.argv[1])
seconds = float(sys.argv[2])
log = sys.argv[3]
per_child = int(sys.argv[4]) if len(sys.argv) > 4 else 10
PAGE = mmap.PAGESIZE
SIZE = 16 << 20
pages = SIZE // PAGE
seg = mmap.mmap(-1, SIZE, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
for i in range(pages):
    seg[i * PAGE] = 1
fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
running = [True]
signal.signal(signal.SIGTERM, lambda *_: running.__setitem__(0, False))
sys.stdout.write("ready\n")
sys.stdout.flush()
clock = lambda: time.clock_gettime(time.CLOCK_MONOTONIC)
start = clock()
serial = 0
while running[0] and clock() - start < seconds:
    serial += 1
    first = (serial * per_child) % pages
    if os.fork() == 0:
        t0 = clock()
        mine = [(first + j) % pages for j in range(per_child)]
        for p in mine:
            seg[p * PAGE:p * PAGE + 16] = struct.pack("<QQ", p, serial)
        t1 = clock()
        line = "%d %d %.6f %.6f %s\n" % (serial, os.getpid(), t0, t1, " ".join(map(str, mine)))
        os.write(fd, line.encode())
        os._exit(0)
    try:
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass
    except ChildProcessError:
        pass
    due = start + serial / rate
    delay = due - clock()
    if delay > 0:
        time.sleep(delay)
while True:
    try:
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass
    except ChildProcessError:
        pass
    time.sleep(0.05)
