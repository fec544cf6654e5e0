"""Run a function on N gloo processes on 127.0.0.1, with bounded time, and collect results.

One launch runs many checks (a launch costs seconds: each child imports torch). Every rank
writes its records to ``<out>/rank<r>.json``; the parent returns them. Bounded everywhere:
the process group's timeout bounds each collective, and a wall-clock deadline kills the
children, so a mistake fails the test instead of hanging CI.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: torch_bugs
from torch_bugs import average_gloo_reduce_scatter

COLLECTIVE_TIMEOUT = timedelta(seconds=45)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn: Callable, world: int, port: int, out: str, args: tuple) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # two cores shared by `world` processes
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=COLLECTIVE_TIMEOUT,
    )
    average_gloo_reduce_scatter()  # torch < 2.9 sums where FSDP2 averages (see there)
    records: list[dict[str, Any]] = []
    fn(rank, world, records, *args)  # an exception ends this rank; the parent reports it
    Path(out, f"rank{rank}.json").write_text(json.dumps(records))
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    # Interpreter teardown after destroy_process_group aborts now and then (gloo threads,
    # ~1 run in 10 under FSDP1): leave without it. Errors were raised above, not here.
    os._exit(0)


def launch(fn: Callable, world: int, *args: Any, deadline: float = 150.0) -> list[list[dict]]:
    """Run ``fn(rank, world, records, *args)`` on ``world`` ranks; return each rank's records.

    ``fn`` must be importable by name (a module-level function). Raises with the failing
    rank's traceback if a rank raises, or ``TimeoutError`` after ``deadline`` seconds.
    """
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory() as out:
        ctx = mp.start_processes(
            _entry, args=(fn, world, free_port(), out, args), nprocs=world, join=False,
            start_method="spawn",
        )
        end = time.monotonic() + deadline
        try:
            while not ctx.join(timeout=1.0):
                if time.monotonic() > end:
                    raise TimeoutError(f"{fn.__name__} on {world} ranks ran over {deadline} s")
        finally:
            for proc in ctx.processes:  # only our own children, by handle
                if proc.is_alive():
                    proc.kill()
                    proc.join(5)
        return [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(world)]
