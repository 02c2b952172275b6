"""A VM-like writer: RATE distinct pages per second, half into a private
anonymous buffer and half into a 64 MiB memfd it maps shared (the layout
of a VM whose guest RAM is a memfd). Both are filled once first (steady
state, as guest RAM is). Prints 'ready' when writing starts; writes on a
wall-clock schedule, so any interval of T seconds sees about RATE*T
distinct pages (the cycle through each buffer is far longer than T)."""
import mmap
import os
import sys
import time

rate = float(sys.argv[1]) if len(sys.argv) > 1 else 2000.0
seconds = float(sys.argv[2]) if len(sys.argv) > 2 else 60.0
PAGE = mmap.PAGESIZE
SIZE = 64 << 20
pages = SIZE // PAGE

anon = mmap.mmap(-1, SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
fd = os.memfd_create("guest-ram")
os.ftruncate(fd, SIZE)
guest = mmap.mmap(fd, SIZE, flags=mmap.MAP_SHARED)
for i in range(pages):
    anon[i * PAGE] = 1
    guest[i * PAGE] = 1

sys.stdout.write("ready\n")
sys.stdout.flush()
start = time.monotonic()
done = 0
while True:
    now = time.monotonic() - start
    if now > seconds:
        break
    due = int(now * rate)
    while done < due:
        buf = anon if done % 2 == 0 else guest
        page = (done // 2) % pages
        buf[page * PAGE] = (buf[page * PAGE] + 1) % 256
        done += 1
    time.sleep(0.002)
