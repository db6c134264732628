"""Run a Python module as N ranks of one gloo job (``torchrun``-style environment), with a hard timeout.

Each rank is its own process started with ``MASTER_ADDR``/``MASTER_PORT``/``WORLD_SIZE``/``RANK``/``LOCAL_RANK``/
``NODE_RANK`` set, so ``torch.distributed.init_process_group("gloo")`` and Lightning (whose environment then
creates no processes of its own) both join the same job. A rank that hangs past the timeout is killed and the
test fails instead of stalling the suite.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class RankResult:
    """What one rank left behind: its exit code and its combined stdout/stderr."""

    rank: int
    returncode: int | None
    output: str


def free_port() -> int:
    """A TCP port nobody listens on now (for ``MASTER_PORT``)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_ranks(
    module: str, args: list[str], *, world_size: int = 2, timeout: float = 240.0, env: dict[str, str] | None = None
) -> list[RankResult]:
    """Run ``python -m module *args`` as ``world_size`` ranks; kill them all after ``timeout`` seconds.

    Returns:
        One :class:`RankResult` per rank (``returncode`` None: killed at the timeout).
    """
    port = str(free_port())
    procs: list[subprocess.Popen[str]] = []
    for rank in range(world_size):
        rank_env = {
            **os.environ,
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "WORLD_SIZE": str(world_size),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "NODE_RANK": "0",
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            **(env or {}),
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", module, *args],
                cwd=ROOT,
                env=rank_env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    deadline = time.monotonic() + timeout
    results = []
    for rank, proc in enumerate(procs):
        try:
            out, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            results.append(RankResult(rank, proc.returncode, out))
        except subprocess.TimeoutExpired:
            for other in procs:
                other.kill()
            out, _ = proc.communicate()
            results.append(RankResult(rank, None, out))
    return results


def check_ranks(results: list[RankResult]) -> None:
    """Raise ``AssertionError`` with every rank's output unless all ranks exited with code 0."""
    bad = [r for r in results if r.returncode != 0]
    if bad:
        report = "\n".join(f"--- rank {r.rank} (exit {r.returncode}) ---\n{r.output[-4000:]}" for r in results)
        raise AssertionError(f"{len(bad)} rank(s) failed or timed out:\n{report}")
