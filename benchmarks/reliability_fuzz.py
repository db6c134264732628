"""Fuzzing of the NZCT blob decoder, one backend per process (run by ``benchmarks/reliability.py``).

``python benchmarks/reliability_fuzz.py --backend cpu --cases 50 --out fuzz-cpu.json``: for each dtype (bf16, fp16,
fp32) and mode (lossless rANS, raw, constant, lossy) it compresses structured weights (N(0, 0.02) with a few
outliers), mutates the blob ``--cases`` times in each of two ways, decodes every mutant with
``CompressedTensor.from_bytes(...).decompress(backend=...)`` and counts the outcomes:

* ``as_is``: the mutated bytes are decoded as they are; the blob's CRC-32 should reject all of them, so a decode
  that differs from the original without an error is a *silent corruption*.
* ``crc_fixed``: the trailing CRC-32 is recomputed after the mutation, so the structural validation and the
  decoder's consistency checks are exercised; a different result without an error is then a well-formed blob
  (``valid_other``), not a silent corruption.

Outcomes: ``rejected`` (ValueError), ``identical`` (decoded bit-identical), ``silent`` / ``valid_other`` (decoded
different, no error), ``crash`` (any other exception type), ``hang`` (over ``--case-timeout`` seconds).
For the triton backend run it with ``TRITON_INTERPRET=1`` in the environment (set before triton is imported).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import struct
import sys
import time
import zlib
from collections import Counter
from typing import Any

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MODES = ("rans", "raw", "const", "lossy")
LOSSY_BITS = {"bf16": 3, "fp16": 4, "fp32": 7}
MUTATIONS = ("byte_flip", "bit_flip", "truncate", "insert", "header_field")


class CaseTimeout(Exception):
    """Raised by the alarm handler when one decode runs over its time limit."""


def _alarm(signum: int, frame: Any) -> None:
    raise CaseTimeout


def weights(dtype: torch.dtype, n: int, seed: int) -> torch.Tensor:
    """Structured weights: N(0, 0.02) with 0.1 % outliers up to ±4 (like trained linear layers)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, generator=g) * 0.02
    idx = torch.randint(0, n, (max(1, n // 1000),), generator=g)
    w[idx] = (torch.rand(idx.numel(), generator=g) - 0.5) * 8
    return w.reshape(-1, 64).to(dtype)


def original(mode: str, dname: str, n: int, seed: int) -> tuple[bytes, torch.Tensor]:
    """A blob of the given mode and the tensor its unmutated decode gives."""
    from nz_lightning.kernels import MODE_CONST, MODE_LOSSY, MODE_RANS, MODE_RAW, compress

    dtype = DTYPES[dname]
    if mode == "rans":
        ct = compress(weights(dtype, n, seed))
        want = MODE_RANS
    elif mode == "raw":  # random bit patterns do not compress
        g = torch.Generator().manual_seed(seed)
        bits = torch.randint(0, 256, (n * torch.finfo(dtype).bits // 8,), dtype=torch.uint8, generator=g)
        ct = compress(bits.view(dtype).reshape(-1, 64))
        want = MODE_RAW
    elif mode == "const":
        ct = compress(torch.full((n // 64, 64), 0.125, dtype=dtype))
        want = MODE_CONST
    else:
        ct = compress(weights(dtype, n, seed), mantissa_bits=LOSSY_BITS[dname], block_size=64)
        want = MODE_LOSSY
    if ct.mode != want:
        raise RuntimeError(f"{mode}/{dname}: compress chose mode {ct.mode}, expected {want}")
    return ct.to_bytes(), ct.decompress(backend="torch")


def mutate(blob: bytes, rng: random.Random, kind: str) -> bytes:
    """One random mutation of ``blob`` (before any CRC fix)."""
    b = bytearray(blob)
    if kind == "byte_flip":
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(len(b))] = rng.randrange(256)
    elif kind == "bit_flip":
        p = rng.randrange(len(b))
        b[p] ^= 1 << rng.randrange(8)
    elif kind == "truncate":
        del b[rng.randrange(len(b)) :]
    elif kind == "insert":
        p = rng.randrange(len(b) + 1)
        b[p:p] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    else:  # a header field (first 64 bytes: magic, version, dtype, mode, ndim, shape, coder/lossy header)
        p = rng.randrange(min(64, len(b) - 4))
        width = rng.choice((1, 2, 4, 8))
        value = rng.choice((0, 1, 0xFF, 0x7F, 0x80, rng.randrange(256)))
        for i in range(width):
            if p + i < len(b) - 4:
                b[p + i] = value if i == 0 else rng.choice((0, value))
    if bytes(b) == blob:  # make sure something changed
        b[rng.randrange(len(b))] ^= 0x01
    return bytes(b)


def fix_crc(data: bytes) -> bytes:
    """``data`` with its last four bytes replaced by the CRC-32 of the rest (as the blob format stores it)."""
    if len(data) < 5:
        return data
    return data[:-4] + struct.pack("<I", zlib.crc32(data[:-4]))


def classify(data: bytes, ref: torch.Tensor, backend: str, crc_fixed: bool, timeout: float) -> tuple[str, str]:
    """Decode ``data`` and return ``(outcome, detail)``."""
    from nz_lightning.kernels import CompressedTensor

    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        out = CompressedTensor.from_bytes(data).decompress(backend=backend)
    except CaseTimeout:
        return "hang", ""
    except ValueError as e:
        return "rejected", str(e)[:160]
    except Exception as e:  # noqa: BLE001 - every other type is what we count
        return "crash", f"{type(e).__name__}: {str(e)[:200]}"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    if out.shape == ref.shape and out.dtype == ref.dtype:
        ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[ref.element_size()]
        if torch.equal(out.view(ints), ref.view(ints)):
            return "identical", ""
    return ("valid_other" if crc_fixed else "silent"), f"shape {tuple(out.shape)} dtype {out.dtype}"


def run(backend: str, cases: int, n: int, seed: int, timeout: float) -> dict[str, Any]:
    """Fuzz every (dtype, mode) with ``cases`` mutants per CRC variant; return counts and examples of failures."""
    signal.signal(signal.SIGALRM, _alarm)
    rng = random.Random(seed)
    rows, failures = [], []
    start = time.perf_counter()
    for dname in DTYPES:
        for mode in MODES:
            blob, ref = original(mode, dname, n, seed)
            for crc_fixed in (False, True):
                counts: Counter[str] = Counter()
                for i in range(cases):
                    kind = MUTATIONS[i % len(MUTATIONS)]
                    data = mutate(blob, rng, kind)
                    data = fix_crc(data) if crc_fixed else data
                    outcome, detail = classify(data, ref, backend, crc_fixed, timeout)
                    counts[outcome] += 1
                    if outcome in ("silent", "crash", "hang") and len(failures) < 20:
                        failures.append({"dtype": dname, "mode": mode, "crc_fixed": crc_fixed,
                                         "mutation": kind, "outcome": outcome, "detail": detail,
                                         "blob_hex": data[:96].hex()})  # fmt: skip
                rows.append({"dtype": dname, "mode": mode, "crc_fixed": crc_fixed, "blob_bytes": len(blob),
                             "cases": cases, **counts})  # fmt: skip
    return {"backend": backend, "elements": n, "rows": rows, "failures": failures,
            "seconds": round(time.perf_counter() - start, 1)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Parse the options, fuzz one backend and write the JSON result."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", required=True, choices=("torch", "cpu", "triton"))
    p.add_argument("--cases", type=int, default=50, help="mutants per (dtype, mode, CRC variant)")
    p.add_argument("--elements", type=int, default=4096, help="elements of each original tensor (a multiple of 64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--case-timeout", type=float, default=30.0)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if args.backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        print("triton on CPU needs TRITON_INTERPRET=1 in the environment", file=sys.stderr)
        return 2
    result = run(args.backend, args.cases, args.elements, args.seed, args.case_timeout)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main())
