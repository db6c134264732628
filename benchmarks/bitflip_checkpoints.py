"""Silent checkpoint corruption: flip one random bit of a stored tensor in a checkpoint file, count undetected loads.

Run: ``python benchmarks/bitflip_checkpoints.py [--trials 1000] [--seed 0]``. For each format (dense,
compressed) it trains the tiny test model one step under :class:`~nz_lightning.NeuZipStrategy`, saves a checkpoint,
then per trial flips one bit at a random position inside the data of a random tensor storage of the file (the
``archive/data/*`` entries of torch's zip format) and reads it with ``NeuZipStrategy.load_checkpoint``. A trial is
*detected* when the load raises ``ValueError`` naming a tensor and the file; the target is 0 silent corruptions.
"""

from __future__ import annotations

import argparse
import os
import random
import struct
import sys
import tempfile
import warnings
import zipfile

_LOCAL_HEADER = struct.Struct("<4s5H3I2H")  # zip local file header (30 bytes)


def storage_spans(data: bytes) -> list[tuple[int, int]]:
    """``(offset, length)`` of each tensor storage's bytes in a ``torch.save`` zip file (stored uncompressed)."""
    import io

    spans = []
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        for info in archive.infolist():
            if "/data/" not in info.filename or info.file_size == 0:
                continue
            assert info.compress_type == zipfile.ZIP_STORED
            head = _LOCAL_HEADER.unpack_from(data, info.header_offset)
            start = info.header_offset + _LOCAL_HEADER.size + head[-2] + head[-1]
            spans.append((start, info.file_size))
    return spans


def flip_random_bit(data: bytes, rng: random.Random) -> bytes:
    """``data`` (a checkpoint file) with one bit flipped inside a random tensor storage."""
    start, length = rng.choice(storage_spans(data))
    pos, bit = start + rng.randrange(length), rng.randrange(8)
    out = bytearray(data)
    out[pos] ^= 1 << bit
    return bytes(out)


def make_checkpoint(fmt: str, path: str) -> None:
    """Train the tiny test model one step with ``checkpoint_format=fmt`` and save a checkpoint to ``path``."""
    from nz_lightning.lightning.strategy import NeuZipStrategy
    from tests.helpers.lit import build, loader, trainer

    model = build("adamw")
    t = trainer(NeuZipStrategy(checkpoint_format=fmt), max_steps=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.fit(model, loader(1))
    t.save_checkpoint(path)


def run_trials(fmt: str, trials: int, seed: int, directory: str) -> tuple[int, int]:
    """``(detected, silent)`` over ``trials`` single-bit flips of a ``fmt`` checkpoint."""
    from nz_lightning.lightning.strategy import NeuZipStrategy

    clean = os.path.join(directory, f"{fmt}.ckpt")
    make_checkpoint(fmt, clean)
    data = open(clean, "rb").read()
    NeuZipStrategy().load_checkpoint(clean)  # the clean file verifies
    rng = random.Random(seed)
    bad = os.path.join(directory, f"{fmt}-flipped.ckpt")
    detected = silent = 0
    for _ in range(trials):
        with open(bad, "wb") as f:
            f.write(flip_random_bit(data, rng))
        try:
            NeuZipStrategy().load_checkpoint(bad)
        except ValueError as err:
            if "tensor" not in str(err) or bad not in str(err):
                raise AssertionError(f"detected, but the error names no tensor or file: {err}") from err
            detected += 1
        else:
            silent += 1
    return detected, silent


def main(argv: list[str] | None = None) -> int:
    """Run the trials for both formats and print the counts; exit status 1 if any corruption went undetected."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    failed = False
    with tempfile.TemporaryDirectory() as directory:
        for fmt in ("dense", "compressed"):
            detected, silent = run_trials(fmt, args.trials, args.seed, directory)
            print(f"{fmt}: {args.trials} single-bit flips, {detected} detected, {silent} silent")
            failed |= silent > 0
    return int(failed)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main())
