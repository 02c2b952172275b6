"""The post-copy source: a /dev/shm file of PAGES random pages, mapped
shared, written without pause (8 bytes of a random page at a time) so
pre-copy cannot converge. Prints `ready` once every page is filled."""
import mmap
import os
import random
import sys

path, pages = sys.argv[1], int(sys.argv[2])
fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
os.ftruncate(fd, pages * 4096)
m = mmap.mmap(fd, pages * 4096, mmap.MAP_SHARED)
for p in range(pages):
    m[p * 4096:(p + 1) * 4096] = os.urandom(4096)
print("ready", flush=True)
n = 0
while True:
    n += 1
    p = random.randrange(pages)
    m[p * 4096:p * 4096 + 8] = n.to_bytes(8, "little")
