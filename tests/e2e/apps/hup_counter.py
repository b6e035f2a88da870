"""An app that reloads on SIGHUP, for the config-change notification tests: it names its process
(`/proc/self/comm`, as an executable's name would), writes its pid to a pid file, counts each
SIGHUP into a file, and prints READY once its handler is in place.

usage: hup_counter.py NAME COUNT_FILE PID_FILE
"""

import ctypes
import os
import signal
import sys
import time

PR_SET_NAME = 15

name, count_file, pid_file = sys.argv[1:4]
ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_NAME, name.encode()[:15], 0, 0, 0)
count = 0


def on_hup(signum, frame):
    global count
    count += 1
    tmp = count_file + ".tmp"
    with open(tmp, "w") as f:
        f.write(str(count))
    os.replace(tmp, count_file)


signal.signal(signal.SIGHUP, on_hup)
with open(pid_file + ".tmp", "w") as f:
    f.write(f"{os.getpid()}\n")
os.replace(pid_file + ".tmp", pid_file)
print("READY", flush=True)
while True:
    time.sleep(3600)
