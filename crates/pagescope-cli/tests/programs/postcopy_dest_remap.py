"""A post-copy destination that maps more later: maps the first half of
FILE (PAGES pages, shared), prints `ready`, waits for `go` on stdin, then
maps the whole of FILE a second time, waits WAIT seconds, and reads every
page in random order through the new mapping, copying what it saw into
OUT at the page's offset, and creates OUT.done; then waits on stdin until
killed."""
import mmap
import os
import random
import sys
import time

path, pages, out, wait = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
os.ftruncate(fd, pages * 4096)
first = mmap.mmap(fd, pages // 2 * 4096, mmap.MAP_SHARED)
o = os.open(out, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
print("ready", flush=True)
sys.stdin.readline()
m = mmap.mmap(fd, pages * 4096, mmap.MAP_SHARED)
time.sleep(wait)
order = list(range(pages))
random.shuffle(order)
for p in order:
    os.pwrite(o, m[p * 4096:(p + 1) * 4096], p * 4096)
open(out + ".done", "w").close()
sys.stdin.readline()
