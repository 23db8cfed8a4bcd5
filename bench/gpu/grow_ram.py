"""Grow the GPU machine's RAM before measuring: some of these VMs start with
little RAM and grow it as it is used (H200.md), and ollama 0.5.7 and builder
both compare the CPU part of the model with MemAvailable. Touches up to
30 x 4 GiB, then lets it go; prints what /proc/meminfo says after."""

import numpy as np


def mem() -> tuple[int, int]:
    d = dict((line.split(":")[0], int(line.split()[1]) >> 20) for line in open("/proc/meminfo"))
    return d["MemTotal"], d["MemAvailable"]


total, avail = mem()
held = []
while total < 100 and avail > 6 and len(held) < 30:
    held.append(np.ones(4 << 30, dtype=np.uint8))
    total, avail = mem()
del held
print(f"RAM: MemTotal {mem()[0]} GiB, MemAvailable {mem()[1]} GiB")
