#!/usr/bin/env python3
"""hold_gpu.py: emulate a smaller card by holding the rest of a GPU's memory.

Runs on the GPU machine (any NVIDIA host with PyTorch and CUDA). Allocates,
with plain cudaMalloc (torch.empty(..., dtype=uint8, device="cuda") through
PyTorch's caching allocator, never managed memory), everything but
LEAVE_GIB of the GPU's free memory as this process sees it after its own
CUDA context is made, then sleeps until killed. Start it in its own session
and kill it by its pid when done:

    setsid python3 bench/gpu/hold_gpu.py --leave-gib 16 --device 0 > hold.log 2>&1 &
    ... wait for the line "holding" ...
    kill $PID

What other processes then see (cuMemGetInfo, nvidia-smi memory.free) is
about LEAVE_GIB free; nvidia-smi's memory.total is still the whole card's:
which is why a planner that reads memory.total over-plans on a shared GPU.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

import torch

MiB = 1 << 20
GiB = 1 << 30
CHUNK = 1 * GiB


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--leave-gib", type=float, required=True, help="memory left free for others, GiB")
    ap.add_argument("--device", type=int, default=0)
    args = ap.parse_args()
    dev = torch.device("cuda", args.device)
    torch.cuda.set_device(dev)
    torch.empty(1, device=dev)  # make the context first: it takes memory too
    leave = int(args.leave_gib * GiB)
    held = []
    free, total = torch.cuda.mem_get_info(dev)
    print(f"before: free {free // MiB} MiB of {total // MiB} MiB", flush=True)
    # take whole chunks, then 2 MiB steps (cudaMalloc's granularity) to the target
    for step in (CHUNK, 64 * MiB, 2 * MiB):
        while True:
            free, _ = torch.cuda.mem_get_info(dev)
            if free - step < leave:
                break
            held.append(torch.empty(step, dtype=torch.uint8, device=dev))
    torch.cuda.synchronize(dev)
    free, total = torch.cuda.mem_get_info(dev)
    taken = sum(t.numel() for t in held)
    print(
        f"holding {taken // MiB} MiB in {len(held)} allocations: free {free // MiB} MiB "
        f"({free / GiB:.3f} GiB) of {total // MiB} MiB, pid {os.getpid()}",
        flush=True,
    )
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    sys.exit(main())
