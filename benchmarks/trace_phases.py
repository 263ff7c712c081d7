"""Peak RSS of each phase of a PPO run, and glibc's heap at its end (Linux only).

    PYTHONPATH=$PWD .venv/bin/python benchmarks/trace_phases.py TRACE.json ppo --recipe R -o RUN --overwrite

Runs `rlhf` in this process (everything after TRACE.json is its command line) and wraps PPO's
phases: generate, score, experience (the no-grad pass), forward (one pass's loss), fwd+bwd (a
micro-batch's passes), update (one optimizer step) and the whole ITERATION. A phase's peak is
exact, not sampled: the kernel's high-water mark (VmHWM) is reset when a phase starts (writing
5 to /proc/self/clear_refs) and read when it ends; an enclosing phase keeps the larger of its
own and its inner phases' peaks. At each end it records RSS split into anonymous and file pages
(a bf16 base read from a bf16 checkpoint stays mapped: its pages are file pages, and rows of
the embedding that no token looks up are never read in) and glibc's `mallinfo2`: the heap in
use, the free heap the arena keeps (fragmentation), and the bytes served by mmap. This is how
benchmarks/RESULTS.md ("QLoRA") split the 4-bit and bf16 sides' peaks.
"""

from __future__ import annotations

import ctypes
import functools
import json
import sys
import time

_MIB = 2**20


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
        "keepcost")]


def _status_mib() -> dict[str, float]:
    found = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                found[key] = int(value.split()[0]) / 1024
    return found


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")


class Tracer:
    """A stack of open phases; `records` gets one row per phase that ended."""

    def __init__(self):
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
        self.mallinfo, self.stack, self.records, self.start = libc.mallinfo2, [], [], time.time()

    def enter(self, name: str) -> None:
        if self.stack:  # the enclosing phase's peak so far, before the reset
            self.stack[-1]["peak"] = max(self.stack[-1]["peak"], _status_mib()["VmHWM"])
        _reset_peak()
        rss = _status_mib()["VmRSS"]
        self.stack.append({"phase": name, "rss_in": rss, "peak": rss, "t_in": time.time()})

    def leave(self) -> None:
        phase, now, heap = self.stack.pop(), _status_mib(), self.mallinfo()
        phase["peak"] = max(phase["peak"], now["VmHWM"])
        self.records.append({
            "phase": phase["phase"], "t": round(time.time() - self.start, 1),
            "seconds": round(time.time() - phase["t_in"], 2), "rss_in": round(phase["rss_in"]),
            "peak": round(phase["peak"]), "rss_out": round(now["VmRSS"]), "anon_out": round(now["RssAnon"]),
            "file_out": round(now["RssFile"]), "heap_in_use": round(heap.uordblks / _MIB),
            "heap_free": round(heap.fordblks / _MIB), "mmapped": round(heap.hblkhd / _MIB)})
        if self.stack:
            self.stack[-1]["peak"] = max(self.stack[-1]["peak"], phase["peak"])
        _reset_peak()

    def wrap(self, name: str, fn):
        @functools.wraps(fn)
        def traced(*args, **kwargs):
            self.enter(name)
            try:
                return fn(*args, **kwargs)
            finally:
                self.leave()
        return traced


def instrument(tracer: Tracer) -> None:
    """Wrap PPO's phases where stages/ppo looks them up (module globals and PPO's methods)."""
    import rlhf_cli.stages.ppo.run as run
    import rlhf_cli.stages.ppo.update as update

    run.sample = tracer.wrap("generate", run.sample)
    run.make_experience = tracer.wrap("experience", run.make_experience)
    update.minibatch_loss = tracer.wrap("forward", update.minibatch_loss)
    update._run_passes = tracer.wrap("fwd+bwd", update._run_passes)
    update.minibatch_update = tracer.wrap("update", update.minibatch_update)
    run.PPO.score = tracer.wrap("score", run.PPO.score)
    run.PPO.iteration = tracer.wrap("ITERATION", run.PPO.iteration)


def main(argv: list[str]) -> int:
    out, rlhf_argv = argv[0], argv[1:]
    tracer = Tracer()
    instrument(tracer)
    from rlhf_cli.cli import app

    try:
        app(rlhf_argv, standalone_mode=False)
    finally:
        with open(out, "w") as file:
            json.dump(tracer.records, file, indent=1)
        for row in tracer.records:
            print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
