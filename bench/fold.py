#!/usr/bin/env python3
"""Folds `perf script` call stacks into one line per stack (root first,
frames joined by ';', then the sample count), the input flame graph tools
take, and prints the heaviest stacks and the inclusive share of chosen frames.

    perf script -i perf.data | bench/fold.py out.folded [TOP] [FRAME ...]
"""
import collections
import sys


def stacks(lines):
    frames = []
    for line in lines:
        line = line.rstrip("\n")
        if not line:
            if frames:
                yield frames
            frames = []
            continue
        if line[0] in " \t":
            parts = line.split(None, 1)
            if len(parts) == 2:
                sym = parts[1].rsplit(" (", 1)[0]
                sym = sym.split("+0x", 1)[0]
                frames.append(sym)
        # a header line (comm pid time event) starts a new sample
    if frames:
        yield frames


def main():
    out = sys.argv[1]
    top = int(sys.argv[2]) if len(sys.argv) > 2 else 20
    wanted = sys.argv[3:]
    folded = collections.Counter()
    inclusive = collections.Counter()
    total = 0
    for frames in stacks(sys.stdin):
        frames.reverse()
        folded[";".join(frames)] += 1
        total += 1
        for w in wanted:
            if any(w in f for f in frames):
                inclusive[w] += 1
    with open(out, "w") as f:
        for k, v in sorted(folded.items()):
            f.write(f"{k} {v}\n")
    print(f"{total} samples")
    for w in wanted:
        print(f"{100 * inclusive[w] / max(total, 1):5.1f}%  incl. {w}")
    print("heaviest stacks (leaf last 3 frames):")
    for k, v in folded.most_common(top):
        print(f"{100 * v / max(total, 1):5.1f}%  {';'.join(k.split(';')[-3:])}")


if __name__ == "__main__":
    main()
