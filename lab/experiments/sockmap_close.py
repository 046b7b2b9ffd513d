#!/usr/bin/env python3
"""What the kernel does to redirected bytes still queued (unread) at a
socket when that socket leaves the SOCKHASH.

Run inside the app's cgroup and network namespace, with tproxy attached to
that cgroup intercepting port PORT (both sockets here are in the cgroup, so
tproxy accelerates the pair). Prints one line per case: how many bytes the
reader got of those the writer sent.

  case half-close: the reader shuts down its write side, the writer then
      sends a reply and closes: the reader's socket goes FIN_WAIT2 ->
      TIME_WAIT (the kernel unhashes it, which drops it from the map)
      before the reader reads the reply.
  case close-wait: the same without the reader's shutdown: the reader's
      socket goes CLOSE_WAIT and stays in the map until it is closed.
  case map-gone:   the writer sends, nobody reads; the caller stops tproxy
      (the map goes) while the bytes are queued; then the reader reads.
"""
import socket, sys, time

PORT = int(sys.argv[1]) if len(sys.argv) > 1 else 8000
CASE = sys.argv[2] if len(sys.argv) > 2 else "half-close"
N = 100_000

lst = socket.socket(); lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
lst.bind(("127.0.0.1", PORT)); lst.listen(8)
reader = socket.create_connection(("127.0.0.1", PORT))   # the "proxy" (active) side
writer, _ = lst.accept()                                 # the "app" (passive) side
time.sleep(0.05)

def read_all(s, timeout=3.0):
    s.settimeout(timeout); got = 0
    try:
        while True:
            b = s.recv(65536)
            if not b: return got, "eof"
            got += len(b)
    except Exception as e:
        return got, type(e).__name__ + ":" + str(e)

if CASE == "half-close":
    reader.shutdown(socket.SHUT_WR)
    assert writer.recv(10) == b""
    writer.sendall(b"r" * N); writer.close()
    time.sleep(0.5)           # FIN arrives: reader FIN_WAIT2 -> TIME_WAIT
    got, end = read_all(reader)
elif CASE in ("half-close-waiting", "half-close-waiting-rcvtimeo"):
    # The reader is already blocked in recv() when the reply and FIN come.
    import struct, threading
    reader.shutdown(socket.SHUT_WR)
    assert writer.recv(10) == b""
    if CASE.endswith("rcvtimeo"):
        reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 5, 0))
    out = {}
    def rd():
        got, eagain = 0, 0
        while True:
            try:
                b = reader.recv(65536)
            except BlockingIOError:
                # A blocking socket must not say EAGAIN; count and retry.
                eagain += 1
                if eagain > 1000: out["r"] = (got, "eagain x1000"); return
                continue
            except Exception as e:
                out["r"] = (got, type(e).__name__ + ":" + str(e)); return
            if not b: out["r"] = (got, f"eof after {eagain} spurious EAGAIN"); return
            got += len(b)
    t = threading.Thread(target=rd); t.start(); time.sleep(0.2)
    writer.sendall(b"r" * N); writer.close()
    t.join(10)
    got, end = out.get("r", (0, "hung"))
elif CASE == "close-wait":
    writer.sendall(b"r" * N); writer.close()
    time.sleep(0.5)
    got, end = read_all(reader)
elif CASE == "map-gone":
    writer.sendall(b"r" * N)
    print("queued; stop tproxy now", flush=True)
    sys.stdin.readline()      # the caller stops tproxy, then sends a line
    writer.close()
    got, end = read_all(reader)
print(f"case={CASE} sent={N} got={got} end={end}", flush=True)
