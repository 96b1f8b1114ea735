#!/usr/bin/env python3
"""Records a replay fixture: what the kernel programs see of one TCP connection of a real
client, from the client's own system calls (strace), as lines `<ms> <in|out> <bytes> <hex>`
(time since the first transfer, direction, bytes moved, the first 64 of them as the kernel
captures them: iov[0] of vectored calls).

    record.py PORT EXPECT -- COMMAND...   > fixture.txt

PORT is the server port the client connects to; EXPECT (`idle` or `outstanding`) is the
verdict the connection must get once it has been quiet past the threshold. The tracker's
replay tests run every fixture through the kernel programs' own accounting.
"""
import re
import subprocess
import sys
import tempfile

CALL = re.compile(r"^(?:\[pid\s+)?(\d+)\]?\s+(\d+\.\d+)\s+(\w+)\((\d+),(.*)\)\s+=\s+(-?\d+)")
DATA = re.compile(r'"((?:\\x[0-9a-f]{2})*)"')
OUT = {"write", "writev", "send", "sendto", "sendmsg"}
IN = {"read", "readv", "recv", "recvfrom", "recvmsg"}


def main():
    port, expect = sys.argv[1], sys.argv[2]
    command = sys.argv[sys.argv.index("--") + 1:]
    with tempfile.NamedTemporaryFile("r") as trace:
        subprocess.run(["strace", "-f", "-ttt", "-xx", "-s", "64", "-o", trace.name,
                        "-e", "trace=connect," + ",".join(sorted(OUT | IN))] + command,
                       stdout=sys.stderr, check=False)
        lines = trace.read().splitlines()
    socket_fd, start = None, None
    print(f"# recorded from: {' '.join(command)}")
    print("# role: client")
    print(f"# expect: {expect}")
    for line in lines:
        match = CALL.match(line)
        if not match:
            continue
        _pid, at, call, fd, args, ret = match.groups()
        if call == "connect" and f"htons({port})" in args:
            socket_fd = fd
            continue
        if fd != socket_fd or int(ret) <= 0 or (call not in OUT and call not in IN):
            continue
        data = DATA.search(args)
        head = bytes.fromhex(data.group(1).replace("\\x", "")) if data else b""
        start = start if start is not None else float(at)
        ms = round((float(at) - start) * 1000)
        direction = "out" if call in OUT else "in"
        print(f"{ms} {direction} {ret} {head[:min(64, int(ret))].hex()}")


if __name__ == "__main__":
    main()
