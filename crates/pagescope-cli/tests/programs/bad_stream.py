"""A hostile sender for `pagescope receive`: connects to ADDR, plays CASE
(a malformed or lying stream, docs/stream-format.md), half-closes and
reads whatever the receiver answers until it closes. The test checks the
receiver's exit code, its one-line error and that nothing was written."""
import os
import socket
import struct
import sys

addr, case = sys.argv[1], sys.argv[2]
# "object": as to `receive --into FILE` (object mode, an object's store).
OBJECT = len(sys.argv) > 3 and sys.argv[3] == "object"
host, port = addr.rsplit(":", 1)
s = socket.create_connection((host, int(port)))
PAGE = 4096


def frame(kind, payload=b""):
    s.sendall(struct.pack("<IB", len(payload) + 1, kind) + payload)


def hello(magic=b"PGSCSTRM", version=1, mode=int(OBJECT)):
    body = magic + struct.pack("<HQQBI", version, 1, 1, mode, PAGE) + os.urandom(32)
    frame(1, body)


def read_frame():
    head = b""
    while len(head) < 4:
        got = s.recv(4 - len(head))
        if not got:
            return None
        head += got
    (n,) = struct.unpack("<I", head)
    body = b""
    while len(body) < n:
        got = s.recv(n - len(body))
        if not got:
            return None
        body += got
    return body


def open_store(pages=4, name=b"p1-1000", store=0, obj=int(OBJECT)):
    frame(11, struct.pack("<IBQ", store, obj, pages) + name)


def pages(store, first, sums, data):
    frame(13, struct.pack("<IQI", store, first, len(sums)) + b"".join(struct.pack("<Q", x) for x in sums) + data)


if case == "magic":
    hello(magic=b"NOTPGSCS")
elif case == "version":
    hello(version=9)
elif case == "mode":
    hello(mode=1 - int(OBJECT))
else:
    hello()
    read_frame()  # the receiver's hello
    if case == "huge":
        s.sendall(struct.pack("<IB", 0x7FFFFFFF, 13) + b"\0" * 64)
    elif case == "outside":
        open_store(4)
        pages(0, 3, [1, 1], b"\0" * 2 * PAGE)
    elif case == "toolarge":
        open_store(1 << 40)
    elif case == "badsum":
        open_store(4)
        pages(0, 0, [1234], b"\1" * PAGE)
    elif case == "datalen":
        open_store(4)
        pages(0, 0, [1, 1], b"\0" * PAGE)
    elif case == "unopened":
        pages(5, 0, [1], b"\0" * PAGE)
    elif case == "totals":
        open_store(4)
        frame(17, struct.pack("<QQQQ", 0, 0, 7, 1))
    elif case == "midrecord":
        open_store(4)
        s.sendall(struct.pack("<IB", 100, 13) + b"\0" * 10)
    elif case == "eof":
        open_store(4)
    elif case == "badname":
        open_store(4, name=b"../escape")
    elif case == "vma":
        open_store(4, obj=0)
    elif case == "two":
        open_store(4)
        open_store(4, name=b"o00_05-10", store=1)
    elif case == "abort":
        open_store(4)
        frame(18, b"the dump failed")
    else:
        sys.exit("unknown case " + case)
try:
    s.shutdown(socket.SHUT_WR)
    while read_frame() is not None:
        pass
except OSError:
    pass
