"""An agent-like parent for `trustdb run` tests: it runs each tool with its own stderr and
reports, as one JSON line, each tool's exit status and what its stderr carried.

Run it as `python3 -I -S -c AGENT CASES_JSON` inside the tree (a file would be an untrusted
script). A case is [name, argv, extra_env, stderr], where stderr is:
- `pipe`: a pipe the agent reads to EOF (what an agent does with a tool's output);
- `file`: a file in the workdir, read after the tool exits;
- hostile ones, where the line must not be written and the handler must not stall: `fullpipe`
  and `fullsocket` (full, never read), `fullfifo` (a named FIFO, full, never read),
  `stoppedpty` (a terminal whose output is stopped), `rdonly` (a file opened read-only),
  `proc` (/proc/self/comm, opened for write).
"""

AGENT = r'''
import json, os, socket, subprocess, sys, termios

def full(w):
    os.set_blocking(w, False)
    try:
        while True:
            os.write(w, b"z" * 4096)
    except BlockingIOError:
        pass
    os.set_blocking(w, True)

def stderr_for(kind, name):
    keep = []
    if kind == "file":
        return os.open(f"{name}.err", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), keep
    if kind == "fullpipe":
        r, w = os.pipe(); full(w); keep.append(r); return w, keep
    if kind == "fullsocket":
        a, b = socket.socketpair(); full(a.fileno()); keep.append(b); return a.detach(), keep
    if kind == "fullfifo":
        os.mkfifo(f"{name}.fifo")
        r = os.open(f"{name}.fifo", os.O_RDONLY | os.O_NONBLOCK)
        w = os.open(f"{name}.fifo", os.O_WRONLY); full(w); keep.append(r); return w, keep
    if kind == "stoppedpty":
        m, s = os.openpty(); termios.tcflow(s, termios.TCOOFF); keep.append(m); return s, keep
    if kind == "rdonly":
        with open(f"{name}.ro", "w"):
            pass
        return os.open(f"{name}.ro", os.O_RDONLY), keep
    if kind == "proc":
        return os.open("/proc/self/comm", os.O_WRONLY), keep
    raise ValueError(kind)

out = {}
for name, argv, extra, kind in json.loads(sys.argv[1]):
    env = dict(os.environ, **extra)
    if kind == "pipe":
        p = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
                           timeout=60)
        out[name] = {"rc": p.returncode, "stderr": p.stderr.decode(errors="replace")}
        continue
    try:
        fd, keep = stderr_for(kind, name)
    except OSError as e:
        out[name] = {"rc": None, "stderr": f"no such stderr here: {e}"}
        continue
    p = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=fd, env=env, timeout=60)
    os.close(fd)
    text = open(f"{name}.err").read() if kind == "file" else ""
    out[name] = {"rc": p.returncode, "stderr": text}
print(json.dumps(out))
'''
