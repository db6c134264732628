"""Kill-and-resume trials of ``train.py``: SIGKILL a run after a checkpoint, resume it from ``last.ckpt``, compare.

Each trial starts ``python train.py +strategy=neuzip`` (a small, shuffled, multi-epoch configuration that checkpoints
every few steps, with ``last.ckpt``), waits until a chosen periodic checkpoint exists, waits a random few
milliseconds more, sends SIGKILL, resumes with ``ckpt_path=<run>/checkpoints/last.ckpt`` and compares the resumed
run's ``final.ckpt`` (weights and optimizer state) bit for bit with an uninterrupted run of the same configuration.
::

    python benchmarks/kill_resume.py                # 10 trials
    python benchmarks/kill_resume.py --trials 3 --steps 30 --every 4
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]


def overrides(run_dir: Path, steps: int, every: int, extra: Sequence[str] = ()) -> list[str]:
    """Hydra overrides of a small neuzip run into ``run_dir``: ~11 shuffled batches per epoch, checkpoints every
    ``every`` steps (all kept, plus ``last.ckpt``), no validation, no progress bar.
    """
    return [
        "+strategy=neuzip",
        f"hydra.run.dir={run_dir}",
        f"trainer.max_steps={steps}",
        "trainer.limit_val_batches=0",
        "trainer.log_every_n_steps=1",
        "trainer.enable_model_summary=false",
        "data.max_bytes=6000",
        "data.seq_len=64",
        "data.batch_size=8",
        "~callbacks.rich_progress_bar",
        f"callbacks.model_checkpoint.every_n_train_steps={every}",
        "callbacks.model_checkpoint.save_top_k=-1",
        "callbacks.model_checkpoint.save_last=true",
        *extra,
    ]


def _command(args: Sequence[str]) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), *args]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "1"}


def train(run_dir: Path, steps: int, every: int, extra: Sequence[str] = (), timeout: float = 600) -> Path:
    """Run ``train.py`` to the end; return its ``final.ckpt``.

    Raises:
        RuntimeError: The run failed (its output is in the message).
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    log = run_dir / "train.log"
    with open(log, "w") as fh:
        code = subprocess.run(
            _command(overrides(run_dir, steps, every, extra)),
            cwd=ROOT,
            env=_env(),
            stdout=fh,
            stderr=subprocess.STDOUT,
            timeout=timeout,
        ).returncode
    if code != 0:
        raise RuntimeError(f"train.py exited with {code} in {run_dir}:\n{log.read_text()[-4000:]}")
    return run_dir / "checkpoints" / "final.ckpt"


def train_and_kill(run_dir: Path, steps: int, every: int, kill_step: int, delay_s: float, timeout: float = 600) -> bool:
    """Start ``train.py``, SIGKILL it ``delay_s`` after ``step<kill_step>.ckpt`` appears.

    Returns:
        True if the process was killed, False if it had already finished.

    Raises:
        RuntimeError: It exited with an error, or no checkpoint appeared within ``timeout`` seconds.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    log = run_dir / "train.log"
    marker = run_dir / "checkpoints" / f"step{kill_step}.ckpt"
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            _command(overrides(run_dir, steps, every)), cwd=ROOT, env=_env(), stdout=fh, stderr=subprocess.STDOUT
        )
        try:
            deadline = time.monotonic() + timeout
            while not marker.exists():
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"train.py exited with {proc.returncode} before {marker.name}:\n{log.read_text()}"
                    )
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no {marker} after {timeout} s")
                time.sleep(0.005)
            time.sleep(delay_s)
            if proc.poll() is not None:
                return False
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _tensors(obj: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor in nested dicts/lists, by path."""
    out: dict[str, torch.Tensor] = {}
    if isinstance(obj, torch.Tensor):
        out[prefix] = obj
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            out.update(_tensors(v, f"{prefix}/{k}"))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(_tensors(v, f"{prefix}/{i}"))
    return out


def differences(a: Path, b: Path) -> list[str]:
    """Tensors of the model weights and optimizer state that differ (bits, dtype or shape) between two checkpoints."""
    ca, cb = (torch.load(p, map_location="cpu", weights_only=True) for p in (a, b))
    ta = _tensors({"state_dict": ca["state_dict"], "optimizer_states": ca.get("optimizer_states", [])})
    tb = _tensors({"state_dict": cb["state_dict"], "optimizer_states": cb.get("optimizer_states", [])})
    diff = sorted(set(ta) ^ set(tb))
    for key in sorted(set(ta) & set(tb)):
        x, y = ta[key], tb[key]
        same = x.dtype == y.dtype and x.shape == y.shape
        if same:
            xb, yb = x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8)
            same = torch.equal(xb, yb)
        if not same:
            diff.append(key)
    if ca.get("global_step") != cb.get("global_step"):
        diff.append(f"global_step {ca.get('global_step')} != {cb.get('global_step')}")
    return diff


def loader_state(ckpt: Path) -> list[dict[str, Any]]:
    """The training loader states Lightning saved in a checkpoint (empty if the loader is not stateful)."""
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    return list(state["loops"]["fit_loop"]["state_dict"].get("combined_loader", []))


@dataclass
class Trial:
    """One kill-and-resume trial.

    Attributes:
        kill_step: The checkpoint step after which the run was killed.
        delay_s: Extra wait between that checkpoint's appearance and SIGKILL.
        killed: Whether the process was still running when killed.
        resumed_from: The loader state in the ``last.ckpt`` the run resumed from.
        final: The resumed run's ``final.ckpt``.
        differences: Tensors that differ from the uninterrupted run (empty: bit-identical); None before comparing.
    """

    kill_step: int
    delay_s: float
    killed: bool
    resumed_from: list[dict[str, Any]]
    final: Path
    differences: list[str] | None = None


def trial(work: Path, steps: int, every: int, kill_step: int, delay_s: float) -> Trial:
    """Kill a run after checkpoint ``kill_step`` (+ ``delay_s``) and resume it from ``last.ckpt`` to the end."""
    killed_dir, resumed_dir = work / "killed", work / "resumed"
    killed = train_and_kill(killed_dir, steps, every, kill_step, delay_s)
    last = killed_dir / "checkpoints" / "last.ckpt"
    final = train(resumed_dir, steps, every, [f"ckpt_path={last}"])
    return Trial(kill_step, delay_s, killed, loader_state(last), final)


def run_trials(
    work: Path,
    plan: Sequence[tuple[int, float]],
    steps: int = 30,
    every: int = 4,
    parallel: int = 2,
) -> tuple[Path, list[Trial]]:
    """The uninterrupted reference run and one kill-and-resume trial per ``(kill_step, delay_s)`` of ``plan``
    (``parallel`` processes at a time), each compared with the reference.

    Returns:
        The reference's ``final.ckpt`` and the trials, their ``differences`` filled in.
    """
    with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        ref = pool.submit(train, work / "reference", steps, every)
        futures = [pool.submit(trial, work / f"trial{i}", steps, every, k, d) for i, (k, d) in enumerate(plan)]
        reference = ref.result()
        trials = [f.result() for f in futures]
    for t in trials:
        t.differences = differences(t.final, reference)
    return reference, trials


def random_plan(trials: int, steps: int, every: int, seed: int = 0) -> list[tuple[int, float]]:
    """Kill points drawn from the periodic checkpoints (``every``, ``2 every``, ... below ``steps``), each with a
    random 0-300 ms delay, so kills land mid-epoch, at epoch ends and during checkpoint writes."""
    rng = random.Random(seed)
    points = list(range(every, steps, every))
    return [(rng.choice(points), rng.uniform(0.0, 0.3)) for _ in range(trials)]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the trials and print one line each and a summary; exit status 1 unless all are bit-identical."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--steps", type=int, default=30, help="max_steps of every run (about 11 batches an epoch)")
    parser.add_argument("--every", type=int, default=4, help="checkpoint every N steps")
    parser.add_argument("--parallel", type=int, default=2, help="training processes at a time")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill points")
    parser.add_argument("--work", type=Path, default=None, help="directory of the runs (default: a temporary one)")
    args = parser.parse_args(argv)
    import tempfile

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kill_resume_") as tmp:
        work = args.work or Path(tmp)
        plan = random_plan(args.trials, args.steps, args.every, args.seed)
        _, results = run_trials(work, plan, args.steps, args.every, args.parallel)
    ok = 0
    for i, t in enumerate(results):
        same = not t.differences
        ok += same
        where = t.resumed_from[0] if t.resumed_from else "no loader state"
        verdict = "bit-identical" if same else f"DIFFERS in {len(t.differences)}: {t.differences[:3]}"
        print(f"trial {i}: killed after step {t.kill_step} +{t.delay_s * 1000:.0f} ms, resumed at {where}: {verdict}")
    print(f"{ok}/{len(results)} kill-and-resume trials bit-identical ({time.perf_counter() - start:.0f} s)")
    return 0 if ok == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
