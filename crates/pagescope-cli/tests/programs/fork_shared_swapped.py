"""A parent and a forked child holding the same swapped-out memory: a
MAP_SHARED|MAP_ANONYMOUS region (shmem) and a private anonymous region whose
swap slots the fork shares. Both are written, paged out (MADV_PAGEOUT, while
mapped once), then the process forks. Two more shared regions of UNMAPPED
pages: one written then dropped from the page tables (MADV_DONTNEED: in RAM,
mapped by no one), one written and left mapped in the parent only (the
child, whose page tables fork does not copy for shared mappings, sees it
resident but unmapped). Prints '<child pid> <shared addr> <private addr>'
and sleeps."""
import ctypes
import mmap
import os
import sys
import time

PAGE = mmap.PAGESIZE
SHARED = int(sys.argv[1]) if len(sys.argv) > 1 else 1024
PRIVATE = int(sys.argv[2]) if len(sys.argv) > 2 else 16384
UNMAPPED = int(sys.argv[3]) if len(sys.argv) > 3 else 256
dropped = mmap.mmap(-1, UNMAPPED * PAGE, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
kept = mmap.mmap(-1, UNMAPPED * PAGE, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
for i in range(UNMAPPED):
    dropped[i * PAGE] = 3
    kept[i * PAGE] = 4
dropped.madvise(mmap.MADV_DONTNEED)
shared = mmap.mmap(-1, SHARED * PAGE, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
private = mmap.mmap(-1, PRIVATE * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
for i in range(SHARED):
    shared[i * PAGE] = 1
for i in range(PRIVATE):
    private[i * PAGE] = 2
PAGEOUT = getattr(mmap, "MADV_PAGEOUT", 21)  # Linux 5.4+; Python 3.11 lacks the name
shared.madvise(PAGEOUT)
private.madvise(PAGEOUT)
addr = lambda m: ctypes.addressof(ctypes.c_char.from_buffer(m))
line = f"{addr(shared):#x} {addr(private):#x}"
child = os.fork()
if child == 0:
    ctypes.CDLL(None).prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL
    time.sleep(600)
    os._exit(0)
print(f"{child} {line}", flush=True)
time.sleep(600)
