"""Peak memory of a command and every process it starts (torchrun's workers included), on Linux.

Every 0.2 s it sums the processes' proportional set size (Pss: a page shared by k processes counts 1/k,
so a memory-mapped cache read by four workers counts once) and their resident set size (Rss: shared pages
counted in each). It prints the peaks, and stops the command after ``--seconds``, or as soon as a line of
its output matches ``--until`` (a regular expression): SIGINT, as Ctrl-C, then SIGKILL 15 s later.

    python .ci/peak_memory.py --seconds=300 -- python resnet50.py --data_dir=...
    python .ci/peak_memory.py --until=^data: -- python resnet50.py --data_dir=...   # the data stage only
"""

import os
import re
import signal
import subprocess
import sys
import threading
import time


def tree(root: int) -> list[int]:
    """``root`` and its descendants, from /proc's parent links."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    parent = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found


def memory_kb(pid: int) -> tuple[int, int]:
    """(Pss, Rss) of one process in KiB, 0 when it has gone."""
    values = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("Pss", "Rss"):
                    values[key] = int(rest.split()[0])
    except OSError:
        pass
    return values.get("Pss", 0), values.get("Rss", 0)


def main() -> None:
    args, seconds, until = sys.argv[1:], float("inf"), None
    while args and args[0].startswith(("--seconds=", "--until=")):
        name, value = args.pop(0)[2:].split("=", 1)
        seconds, until = (float(value), until) if name == "seconds" else (seconds, re.compile(value))
    if args[:1] == ["--"]:
        args = args[1:]
    if not args:
        sys.exit("usage: python .ci/peak_memory.py [--seconds=S] [--until=REGEX] -- command ...")
    # A command started in the background of a shell inherits SIGINT ignored: restore it, so Ctrl-C works.
    process = subprocess.Popen(
        args,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        stdout=subprocess.PIPE,
        text=True,
    )
    start, peak_pss, peak_rss, most, interrupted = time.time(), 0, 0, 0, None

    def echo() -> None:  # pass the output on, and stop at the line that ends the measurement
        nonlocal seconds
        for line in process.stdout:
            print(line, end="", flush=True)
            if until is not None and until.search(line):
                seconds = 0

    threading.Thread(target=echo, daemon=True).start()
    while process.poll() is None:
        pids = tree(process.pid)
        sizes = [memory_kb(pid) for pid in pids]
        peak_pss = max(peak_pss, sum(p for p, _ in sizes))
        peak_rss = max(peak_rss, sum(r for _, r in sizes))
        most = max(most, len(pids))
        if interrupted is None and time.time() - start > seconds:
            os.killpg(process.pid, signal.SIGINT)
            interrupted = time.time()
        elif interrupted is not None and time.time() - interrupted > 15:
            os.killpg(process.pid, signal.SIGKILL)
        time.sleep(0.2)
    print(
        f"peak memory: {peak_pss * 1024 / 1e9:.2f} GB proportional (shared pages once), "
        f"{peak_rss * 1024 / 1e9:.2f} GB "
        f"resident summed over up to {most} processes; {time.time() - start:.0f} s, exit {process.returncode}"
    )


if __name__ == "__main__":
    main()
