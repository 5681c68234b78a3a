#!/usr/bin/env python3
"""Splits a perf profile of an overhead benchmark into its traced and
untraced runs and compares where the CPU went in each.

The overhead benchmarks (tcsessions/overhead_test.go) alternate untraced
and traced runs in one process; a BPF program's samples only occur while a
traced run is on. This script cuts the profile into windows (250 ms by
default), calls a window traced when it holds a sample of a BPF program
(a symbol starting with "bpf_prog_"), leaves out windows that are mostly
idle (the gaps between runs), and prints, per symbol and per command, the
share of the samples in traced and in untraced windows and the difference.

    perf record -C 1 -F 2999 -o perf.data -- sleep 38   # while the benchmark runs
    perf script -G -i perf.data -F comm,time,ip,sym | scripts/perf-split.py

Options: --window SECONDS, --max-idle FRACTION (0.05), --top N (20),
--workload COMM[,COMM...] (keep only windows where these commands have most
of the samples, e.g. iperf3: the benchmark's own work between runs, such
as the verifier loading the programs, is then left out).
"""
import argparse
import collections
import sys


def parse(lines):
    """Yields (time, comm, symbol) from perf script -F comm,time,ip,sym."""
    for line in lines:
        parts = line.split()
        # comm may hold spaces: the time is the first field ending in ':'.
        for i, p in enumerate(parts):
            if p.endswith(":"):
                try:
                    t = float(p[:-1])
                except ValueError:
                    break
                comm = " ".join(parts[:i]) or "?"
                rest = parts[i + 1:]
                sym = rest[1] if len(rest) > 1 else "?"
                yield t, comm, sym
                break


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--window", type=float, default=0.25)
    ap.add_argument("--max-idle", type=float, default=0.05)
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--workload", default="")
    args = ap.parse_args()

    workload = set(filter(None, args.workload.split(",")))
    samples = list(parse(sys.stdin))
    if not samples:
        sys.exit("perf-split: no samples on standard input (perf script -F comm,time,ip,sym)")
    t0 = samples[0][0]
    windows = collections.defaultdict(list)
    for t, comm, sym in samples:
        windows[int((t - t0) / args.window)].append((comm, sym))

    syms = {True: collections.Counter(), False: collections.Counter()}
    comms = {True: collections.Counter(), False: collections.Counter()}
    count = {True: 0, False: 0}
    for w in windows.values():
        idle = sum(1 for _, s in w if "halt" in s or s.startswith("default_idle"))
        if idle > len(w) * args.max_idle:
            continue
        if workload and sum(1 for c, _ in w if c in workload) * 2 <= len(w):
            continue
        traced = any(s.startswith("bpf_prog_") for _, s in w)
        syms[traced].update(s for _, s in w)
        comms[traced].update(c for c, _ in w)
        count[traced] += 1
    nt, nu = sum(syms[True].values()), sum(syms[False].values())
    if nt == 0 or nu == 0:
        sys.exit("perf-split: need both traced (%d samples) and untraced (%d samples) windows" % (nt, nu))
    print("traced: %d windows, %d samples; untraced: %d windows, %d samples" % (count[True], nt, count[False], nu))

    def share(c, k, n):
        return 100.0 * c[k] / n

    print("\nby command (share of samples, traced / untraced)")
    for k in sorted(set(comms[True]) | set(comms[False]), key=lambda k: -comms[True][k])[: args.top]:
        print("  %6.2f%% %6.2f%%  %s" % (share(comms[True], k, nt), share(comms[False], k, nu), k))

    diff = {k: share(syms[True], k, nt) - share(syms[False], k, nu) for k in set(syms[True]) | set(syms[False])}
    order = sorted(diff, key=lambda k: -diff[k])
    print("\nsymbols with the largest gain in traced windows (difference, traced, untraced)")
    for k in order[: args.top]:
        print("  %+6.2f%% %6.2f%% %6.2f%%  %s" % (diff[k], share(syms[True], k, nt), share(syms[False], k, nu), k))
    print("\nsymbols with the largest loss")
    for k in reversed(order[-min(args.top, 10):]):
        print("  %+6.2f%% %6.2f%% %6.2f%%  %s" % (diff[k], share(syms[True], k, nt), share(syms[False], k, nu), k))
    bpf = sum(v for k, v in syms[True].items() if k.startswith("bpf_prog_"))
    print("\nBPF programs: %.2f%% of the traced windows' samples" % (100.0 * bpf / nt))


if __name__ == "__main__":
    main()
