"""A forked pair sharing MAP_SHARED|MAP_ANONYMOUS memory (the way a
pre-forking server or PostgreSQL shares its buffers): the parent writes
nothing after the fork; the child writes RATE distinct pages per second
into the shared region and some into its own private heap copy. Prints
'ready <child pid>' when the child writes."""
import mmap
import os
import sys
import time

rate = float(sys.argv[1]) if len(sys.argv) > 1 else 500.0
seconds = float(sys.argv[2]) if len(sys.argv) > 2 else 60.0
PAGE = mmap.PAGESIZE
SIZE = 32 << 20
pages = SIZE // PAGE
shared = mmap.mmap(-1, SIZE, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
for i in range(pages):
    shared[i * PAGE] = 1
r, w = os.pipe()
child = os.fork()
if child == 0:
    import ctypes
    ctypes.CDLL(None).prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL: die with the parent
    os.close(r)
    os.write(w, b"x")
    start = time.monotonic()
    done = 0
    while time.monotonic() - start < seconds:
        due = int((time.monotonic() - start) * rate)
        while done < due:
            p = done % pages
            shared[p * PAGE] = (shared[p * PAGE] + 1) % 256
            done += 1
        time.sleep(0.002)
    os._exit(0)
os.close(w)
os.read(r, 1)
sys.stdout.write("ready %d\n" % child)
sys.stdout.flush()
os.waitpid(child, 0)
