"""Writes nothing until told, then executes a new program (python again)
that writes 16 MiB per pass; with 'fork' it forks a child that does the
writing instead. Prints 'ready' first."""
import sys
import time

WRITER = ("import time\nb=bytearray(16<<20)\n"
          "while True:\n    for i in range(0,len(b),4096): b[i]=(b[i]+1)%256\n    time.sleep(0.01)\n")
mode = sys.argv[1]
delay = float(sys.argv[2])
sys.stdout.write("ready\n")
sys.stdout.flush()
time.sleep(delay)
if mode == "exec":
    import os
    os.execv(sys.executable, [sys.executable, "-c", WRITER])
else:
    import os
    if os.fork() == 0:
        import ctypes
        ctypes.CDLL(None).prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL: die with the parent
        exec(WRITER)
    time.sleep(3600)
