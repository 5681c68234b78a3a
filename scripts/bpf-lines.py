#!/usr/bin/env python3
"""Puts the samples of a perf profile that fall inside Clovisor's tc
programs on the programs' source lines.

perf reports a sample in a JITed BPF program as bpf_prog_TAG_NAME+OFFSET;
without libbfd neither perf nor bpftool can annotate it. BenchmarkWireCost
writes each program's table of JIT offsets and source lines (from the
kernel's JITed line info) when CLOVISOR_JIT_LINES names a directory; the
offsets are the same for every load of the same object. Each sample goes
to the last line-info entry at or before its offset. A program's BPF
subprograms (its __noinline functions) have images of their own, which
perf names by the function (bpf_prog_TAG_end_exchange+OFFSET): their
tables are FUNCTION.lines, with offsets from the start of each image.
The benchmark also writes each program's machine code (PROGRAM.jit, the
images one after another, their lengths in PROGRAM.funcs), which
`objdump -b binary -m i386:x86-64 -D` disassembles.

    sudo CLOVISOR_JIT_LINES=/tmp/jit taskset -c 1 /tmp/tcs.test -test.run='^$' \\
        -test.bench='WireCost/iperf3' -test.benchtime=1x &
    sudo perf record -e cpu-clock -F 25000 -a -o /tmp/perf.data -- sleep 1.3   # while iperf3 runs
    sudo perf script -i /tmp/perf.data -F ip,sym,symoff -G | scripts/bpf-lines.py /tmp/jit

Options: --top N (30).
"""
import argparse
import bisect
import collections
import os
import re
import sys

SAMPLE = re.compile(r'bpf_prog_[0-9a-f]+_(\w+)\+0x([0-9a-f]+)')


def load(path):
    """Returns (offsets, [(line, text)]) sorted by offset."""
    rows = []
    with open(path) as f:
        for row in f:
            off, line, text = row.rstrip('\n').split('\t', 2)
            rows.append((int(off), int(line), text))
    rows.sort()
    return [r[0] for r in rows], [(r[1], r[2]) for r in rows]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('dir', help='the directory of the .lines files')
    ap.add_argument('--top', type=int, default=30)
    args = ap.parse_args()
    tables = {}
    for name in os.listdir(args.dir):
        if name.endswith('.lines'):
            tables[name[:-len('.lines')]] = load(os.path.join(args.dir, name))
    if not tables:
        sys.exit('no .lines files in %s' % args.dir)
    total = 0
    per_prog = collections.Counter()
    per_line = collections.defaultdict(collections.Counter)
    for row in sys.stdin:
        total += 1
        m = SAMPLE.search(row)
        if not m or m.group(1) not in tables:
            continue
        prog, off = m.group(1), int(m.group(2), 16)
        offsets, lines = tables[prog]
        i = bisect.bisect_right(offsets, off) - 1
        if i < 0:
            continue
        per_prog[prog] += 1
        per_line[prog][lines[i]] += 1
    print('%d samples, %d in the programs (%.2f%%)' % (total, sum(per_prog.values()),
                                                       100.0 * sum(per_prog.values()) / max(total, 1)))
    for prog, n in per_prog.most_common():
        print('\n%s: %d samples (%.2f%% of all)' % (prog, n, 100.0 * n / total))
        print('%6s %6s %5s  %s' % ('samples', '%prog', 'line', 'source'))
        for (line, text), k in per_line[prog].most_common(args.top):
            print('%6d %6.1f %5d  %s' % (k, 100.0 * k / n, line, text[:110]))


if __name__ == '__main__':
    main()
