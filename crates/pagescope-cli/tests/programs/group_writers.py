"""A group of processes sharing one MAP_SHARED|MAP_ANONYMOUS segment that
every member keeps writing: the parent forks MEMBERS-1 children and all of
them, the parent included, write pages of the segment in a loop. Prints
'ready PID PID ...' (every member, the parent first)."""
import mmap
import os
import sys
import time

members = int(sys.argv[1]) if len(sys.argv) > 1 else 4
PAGE = mmap.PAGESIZE
SIZE = 8 << 20
pages = SIZE // PAGE
seg = mmap.mmap(-1, SIZE, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
for i in range(pages):
    seg[i * PAGE] = 1


def write_forever(me):
    import ctypes
    n = 0
    while True:
        for k in range(64):
            p = (me * 7919 + n * 64 + k) % pages
            seg[p * PAGE + me] = (seg[p * PAGE + me] + 1) % 256
        n += 1
        time.sleep(0.001)


kids = []
r, w = os.pipe()
for me in range(1, members):
    pid = os.fork()
    if pid == 0:
        import ctypes
        ctypes.CDLL(None).prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL
        os.close(r)
        os.write(w, b"x")
        write_forever(me)
    kids.append(pid)
os.close(w)
for _ in kids:
    os.read(r, 1)
sys.stdout.write("ready %d %s\n" % (os.getpid(), " ".join(map(str, kids))))
sys.stdout.flush()
write_forever(0)
