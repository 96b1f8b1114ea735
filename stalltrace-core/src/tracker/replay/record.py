#!/usr/bin/env python3
"""Records a replay fixture: what the kernel programs see of one TCP connection of a real
client, from the client's own system calls (strace), as lines `<ms> <in|out> <bytes> <hex>`
(time since the first transfer, direction, bytes moved, the first 64 of them as the kernel
captures them: iov[0] of vectored calls), and `<ms> state FIN_WAIT1` where the client shuts
its sending side down (`shutdown(2)`: its FIN goes out, as the kernel's state tracepoint
reports it).

    record.py PORT EXPECT [--full] -- COMMAND...   > fixture.txt

PORT is the server port the client connects to; EXPECT (`idle` or `outstanding`) is the
verdict the connection must get once it has been quiet past the threshold (at each pause of a
second or more, and at its end; a `# expect at end:` line added by hand may differ, for an
answer that came last). The tracker's
replay tests run every fixture through the kernel programs' own accounting. With `--full`,
each line holds every byte moved (all `iovec` entries), as the HTTP/2 frame walk reads them.
"""
import re
import subprocess
import sys
import tempfile

CALL = re.compile(r"^(?:\[pid\s+)?(\d+)\]?\s+(\d+\.\d+)\s+(\w+)\((\d+),(.*)\)\s+=\s+(-?\d+)")
DATA = re.compile(r'"((?:\\x[0-9a-f]{2})*)"')
OUT = {"write", "writev", "send", "sendto", "sendmsg"}
IN = {"read", "readv", "recv", "recvfrom", "recvmsg"}


def joined(lines):
    """The trace's lines with each call that another thread interrupted (`<unfinished ...>`,
    then `<... call resumed>`) put back together, at the time it began."""
    pending = {}
    for line in lines:
        pid = line.split(" ", 1)[0]
        if line.endswith("<unfinished ...>"):
            pending[pid] = line[: -len("<unfinished ...>")].rstrip()
        elif " resumed>" in line and pid in pending:
            yield pending.pop(pid) + line.split(" resumed>", 1)[1]
        else:
            yield line


def main():
    port, expect = sys.argv[1], sys.argv[2]
    full = "--full" in sys.argv[3:sys.argv.index("--")]
    command = sys.argv[sys.argv.index("--") + 1:]
    with tempfile.NamedTemporaryFile("r") as trace:
        size = "1048576" if full else "64"
        subprocess.run(["strace", "-f", "-ttt", "-xx", "-s", size, "-o", trace.name,
                        "-e", "trace=connect,shutdown," + ",".join(sorted(OUT | IN))] + command,
                       stdout=sys.stderr, check=False)
        lines = trace.read().splitlines()
    socket_fd, start = None, None
    print(f"# recorded from: {' '.join(command)}")
    print("# role: client")
    print(f"# expect: {expect}")
    for line in joined(lines):
        match = CALL.match(line)
        if not match:
            continue
        _pid, at, call, fd, args, ret = match.groups()
        if call == "connect" and f"htons({port})" in args:
            socket_fd = fd
            continue
        if call == "shutdown" and fd == socket_fd and "SHUT_RD" != args.strip() and int(ret) == 0:
            start = start if start is not None else float(at)
            print(f"{round((float(at) - start) * 1000)} state FIN_WAIT1")
            continue
        if fd != socket_fd or int(ret) <= 0 or (call not in OUT and call not in IN):
            continue
        strings = DATA.findall(args) if full else DATA.findall(args)[:1]
        head = b"".join(bytes.fromhex(s.replace("\\x", "")) for s in strings)
        start = start if start is not None else float(at)
        ms = round((float(at) - start) * 1000)
        direction = "out" if call in OUT else "in"
        keep = int(ret) if full else min(64, int(ret))
        print(f"{ms} {direction} {ret} {head[:keep].hex()}")


if __name__ == "__main__":
    main()
