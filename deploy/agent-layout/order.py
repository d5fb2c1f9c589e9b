#!/usr/bin/env python3
"""Writes the symbol ordering file of the shipped agent.

Arguments: the linker map of an `agent`-profile build, the profiled binary's
path (as callgrind names it), then callgrind dumps of that binary made with
--dump-instr=yes. Prints, one per line, the symbol of every function whose
code ran, in the order the dumps first show it; a summary goes to stderr.
"""

import bisect
import re
import sys

# An input section of the map: VMA, LMA, size, alignment, then
# `object:(.text.SYMBOL)`; `.text.unlikely.`-style prefixes are LLVM's.
SECTION = re.compile(
    r"^\s*([0-9a-f]+)\s+[0-9a-f]+\s+([0-9a-f]+)\s+\d+\s+\S.*:\((\.text\.[^)]+)\)\s*$"
)
PREFIX = re.compile(r"^\.text\.(unlikely\.|hot\.|startup\.|exit\.)?")
ADDRESS = re.compile(r"0x[0-9a-f]+")


def sections(map_path):
    found = []
    with open(map_path, errors="replace") as lines:
        for line in lines:
            m = SECTION.match(line)
            if not m:
                continue
            start, size = int(m.group(1), 16), int(m.group(2), 16)
            symbol = PREFIX.sub("", m.group(3))
            if size and symbol:
                found.append((start, size, symbol))
    found.sort()
    return found


def dump_number(path):
    """Callgrind numbers its dumps `.out.1`, `.out.2`, …; the final one has none."""
    m = re.search(r"\.out\.(\d+)$", path)
    return int(m.group(1)) if m else 1 << 30


def main():
    map_path, binary, dumps = sys.argv[1], sys.argv[2], sys.argv[3:]
    known = sections(map_path)
    starts = [s[0] for s in known]
    order, seen, size = [], set(), 0
    for path in sorted(dumps, key=dump_number):
        obj = None
        with open(path, errors="replace") as lines:
            for line in lines:
                if line.startswith("ob="):
                    obj = line[3:].strip()
                elif obj == binary and (line.startswith("0x") or line.startswith("fn=0x")):
                    address = int(ADDRESS.search(line).group(0), 16)
                    i = bisect.bisect_right(starts, address) - 1
                    if i < 0 or address >= known[i][0] + known[i][1]:
                        continue
                    symbol = known[i][2]
                    if symbol not in seen:
                        seen.add(symbol)
                        order.append(symbol)
                        size += known[i][1]
    if not order:
        sys.exit(f"no code of {binary} in the dumps: was it the binary profiled?")
    for symbol in order:
        print(symbol)
    total = sum(s[1] for s in known)
    print(
        f"{len(order)} of {len(known)} functions ran: {size / 1e6:.2f} of {total / 1e6:.2f} MB",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
