"""The ``nz-lightning`` command: inspect, compress and restore safetensors checkpoints, and the end-to-end demo."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import torch
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from nz_lightning.formats.atomic import atomic_write
from nz_lightning.formats.nzsf import (
    InspectReport,
    ProgressFn,
    compress_file,
    decompress_file,
    inspect_file,
    sha256_file,
)
from nz_lightning.kernels import BACKENDS
from nz_lightning.tensor.sizes import WeightSizes

T = TypeVar("T")


def _console() -> Console:
    return Console(highlight=False, width=None if sys.stdout.isatty() else 132)


def _size(n: int) -> str:
    return f"{n / 2**20:.2f} MiB ({n:,} B)"


def _resolve_backend(name: str | None) -> str | None:
    """The backend to force: ``name``, or ``None`` (device default) unless the numba CPU backend cannot load."""
    if name is not None:
        return name
    try:
        importlib.import_module("nz_lightning.kernels.cpu")
    except ImportError as e:
        print(f"nz-lightning: note: numba CPU backend unavailable ({e}); using the torch backend", file=sys.stderr)
        return "torch"
    return None


@contextlib.contextmanager
def _progress_bar(label: str) -> Iterator[ProgressFn]:
    """A transient rich progress bar on stderr, driven through the returned progress hook."""
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeElapsedColumn())
    console = Console(stderr=True)
    quiet = not console.is_terminal  # no bar (nor its stray newlines) in logs and pipes
    progress = Progress(*columns, TextColumn("{task.fields[tensor]}"), console=console, transient=True, disable=quiet)
    with progress as bar:
        task = bar.add_task(label, total=None, tensor="")

        def update(name: str, done: int, total: int) -> None:
            bar.update(task, completed=done, total=total, tensor=name)

        yield update


def float_sizes(report: InspectReport) -> WeightSizes:
    """:class:`WeightSizes` of a report's float (BF16/F16/F32) tensors, as the file stores them.

    ``dense_bytes`` are the tensors' bytes in the ``.safetensors`` file, ``serialized_bytes`` (= ``held_bytes``)
    their record payloads in the container (a blob's serialized size), so ``bits_per_weight`` is the report's
    ``float_bits_per_weight`` and ``compression_ratio`` is original / stored bytes over all of them; the
    ``compressed_*`` fields stay 0.

    Args:
        report: From :func:`~nz_lightning.formats.nzsf.inspect_file` or ``compress_file``.
    """
    floats = [t for t in report.tensors if t.exponent_entropy is not None]
    return sum((WeightSizes(t.numel, t.original_bytes, t.stored_bytes, t.stored_bytes) for t in floats), WeightSizes())


def _print_report(console: Console, report: InspectReport) -> None:
    """Per-tensor table, float totals and whole-file sizes.

    ``bits/weight`` is serialized bits per element (``8 * stored bytes / numel``, as
    :attr:`CompressedTensor.bits_per_weight` and :attr:`WeightSizes.bits_per_weight`); ``ratio`` is dense (original)
    bytes / serialized (stored) bytes.
    """
    table = Table(title=f"{report.path} ({report.source})", show_footer=True)
    floats = float_sizes(report)
    footer = [
        "total (BF16/F16/F32)",
        "",
        "",
        f"{report.float_numel:,}",
        f"{report.float_exponent_entropy:.3f}",
        f"{report.float_entropy_bound:.3f}",
        f"{report.float_bits_per_weight:.3f}",
        f"{floats.compression_ratio:.3f}" if floats.serialized_bytes else "-",
        "",
    ]
    headers = ("tensor", "dtype", "shape", "numel", "H(exp) bits", "bound b/w", "bits/weight", "ratio", "stored")
    for header, foot in zip(headers, footer, strict=True):
        table.add_column(header, footer=foot, justify="left" if header in ("tensor", "dtype", "stored") else "right")
    for t in report.tensors:
        coded = t.exponent_entropy is not None
        table.add_row(
            t.name,
            t.dtype,
            "x".join(map(str, t.shape)) or "scalar",
            f"{t.numel:,}",
            f"{t.exponent_entropy:.3f}" if coded else "-",
            f"{t.entropy_bound:.3f}" if t.entropy_bound is not None else "-",
            f"{t.bits_per_weight:.3f}",
            f"{t.ratio:.3f}",
            t.mode,
        )
    console.print(table)
    what = "container" if report.source == "nzsf" else "container (predicted)"
    console.print(f"original file: {_size(report.original_size)}; gap bytes: {report.gap_bytes:,}")
    console.print(f"{what}: {_size(report.container_size)}; ratio {report.ratio:.3f}")
    console.print(
        f"float weights: {report.float_bits_per_weight:.3f} bits/weight achieved, entropy bound "
        f"(sign+mantissa + H(exp)) {report.float_entropy_bound:.3f}"
    )


def _cmd_inspect(args: argparse.Namespace) -> int:
    with _progress_bar("inspect") as progress:
        report = inspect_file(args.file, backend=_resolve_backend(args.backend), progress=progress)
    _print_report(_console(), report)
    return 0


def _refuse_same_file(src: str, dst: str) -> None:
    """Refuse an output that is the input (same path after resolving links, or the same file).

    Raises:
        ValueError: ``dst`` resolves to ``src``.
    """
    same = os.path.realpath(src) == os.path.realpath(dst)
    with contextlib.suppress(OSError):
        same = same or os.path.samefile(src, dst)
    if same:
        raise ValueError(f"output {dst} is the input file {src}; write to another path")


def _cmd_compress(args: argparse.Namespace) -> int:
    _refuse_same_file(args.input, args.output)
    start = time.perf_counter()
    with _progress_bar("compress") as progress:
        report = compress_file(args.input, args.output, backend=_resolve_backend(args.backend), progress=progress)
    console = _console()
    console.print(f"{args.input}: {_size(report.original_size)}")
    console.print(f"{args.output}: {_size(report.container_size)}")
    console.print(
        f"ratio {report.ratio:.3f}, float weights {report.float_bits_per_weight:.3f} bits/weight, "
        f"{time.perf_counter() - start:.2f} s"
    )
    return 0


def _cmd_decompress(args: argparse.Namespace) -> int:
    _refuse_same_file(args.input, args.output)
    start = time.perf_counter()
    with _progress_bar("decompress") as progress:
        digest = decompress_file(args.input, args.output, backend=_resolve_backend(args.backend), progress=progress)
    console = _console()
    size_in, size_out = Path(args.input).stat().st_size, Path(args.output).stat().st_size
    console.print(f"{args.input}: {_size(size_in)} -> {args.output}: {_size(size_out)}")
    console.print(f"sha256 {digest} (verified), {time.perf_counter() - start:.2f} s")
    return 0


def write_demo_checkpoint(
    path: str | Path, *, hidden: int = 256, layers: int = 4, vocab: int = 4096, seed: int = 0
) -> int:
    """Write a random-init Llama-style bf16 checkpoint (``safetensors.torch.save``, written atomically).

    Not ``save_file``: its file gets mode 0600 whatever the umask, unlike every other file the CLI writes.

    Weights are N(0, 0.02) like Hugging Face's init, norm weights are ones; the MLP width is 8/3 of ``hidden``
    rounded up to a multiple of 32.

    Args:
        path: Destination ``.safetensors`` file.
        hidden, layers, vocab: Model dimensions.
        seed: Seed of the generator.

    Returns:
        The number of parameters written.
    """
    from safetensors.torch import save

    inter = 32 * math.ceil(8 * hidden / 3 / 32)
    gen = torch.Generator().manual_seed(seed)

    def normal(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * 0.02).to(torch.bfloat16)

    tensors = {"model.embed_tokens.weight": normal(vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            tensors[f"{p}self_attn.{proj}.weight"] = normal(hidden, hidden)
        tensors[f"{p}mlp.gate_proj.weight"] = normal(inter, hidden)
        tensors[f"{p}mlp.up_proj.weight"] = normal(inter, hidden)
        tensors[f"{p}mlp.down_proj.weight"] = normal(hidden, inter)
        tensors[f"{p}input_layernorm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
        tensors[f"{p}post_attention_layernorm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
    tensors["model.norm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
    tensors["lm_head.weight"] = normal(vocab, hidden)
    with atomic_write(path) as out:
        out.write(save(tensors, metadata={"format": "pt"}))
    return sum(t.numel() for t in tensors.values())


def _cmd_demo(args: argparse.Namespace) -> int:
    console, backend = _console(), _resolve_backend(args.backend)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    original, container, restored = out / "model.safetensors", out / "model.nzsf", out / "restored.safetensors"
    times: dict[str, float] = {}

    def timed(label: str, run: Callable[[ProgressFn], T]) -> T:
        t0 = time.perf_counter()
        with _progress_bar(label) as progress:
            result = run(progress)
        times[label] = time.perf_counter() - t0
        return result

    start = time.perf_counter()
    params = timed(
        "write checkpoint",
        lambda _: write_demo_checkpoint(
            original, hidden=args.hidden, layers=args.layers, vocab=args.vocab, seed=args.seed
        ),
    )
    timed("compress", lambda p: compress_file(original, container, backend=backend, progress=p))
    report = timed("inspect", lambda p: inspect_file(container, backend=backend, progress=p))
    timed("decompress", lambda p: decompress_file(container, restored, backend=backend, progress=p))
    _print_report(console, report)
    same = sha256_file(original) == sha256_file(restored)
    summary = Table(title="nz-lightning demo: random-init Llama-style bf16 checkpoint", show_header=False)
    rows = [
        ("model", f"hidden {args.hidden}, layers {args.layers}, vocab {args.vocab}, seed {args.seed}"),
        ("parameters", f"{params:,}"),
        ("original", f"{original}: {_size(report.original_size)}"),
        ("compressed", f"{container}: {_size(report.container_size)}"),
        ("ratio", f"{report.ratio:.3f}"),
        ("bits/weight", f"{report.float_bits_per_weight:.3f} (bound {report.float_entropy_bound:.3f})"),
        *((f"time: {k}", f"{v:.2f} s") for k, v in times.items()),
        ("time: total", f"{time.perf_counter() - start:.2f} s"),
        ("byte-identical restore", "yes (sha256 match)" if same else "NO: sha256 mismatch"),
    ]
    for row in rows:
        summary.add_row(*row)
    console.print(summary)
    if not same:
        print(f"nz-lightning: error: {restored} differs from {original}", file=sys.stderr)
        return 1
    return 0


def _positive(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return int(text)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nz-lightning", description="Lossless NeuZip compression of .safetensors checkpoints (NZSF containers)."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--backend", choices=BACKENDS, default=None, help="force a codec backend (default: by device)")
        return p

    p = command("inspect", "per-tensor statistics of a .safetensors file or an NZSF container")
    p.add_argument("file", help=".safetensors file or NZSF container")
    p.set_defaults(func=_cmd_inspect)
    p = command("compress", "compress a .safetensors file into an NZSF container")
    p.add_argument("input")
    p.add_argument("output")
    p.set_defaults(func=_cmd_compress)
    p = command("decompress", "restore the byte-identical .safetensors file from an NZSF container")
    p.add_argument("input")
    p.add_argument("output")
    p.set_defaults(func=_cmd_decompress)
    p = command("demo", "write a random-init Llama-style checkpoint, compress, inspect, restore and verify it")
    p.add_argument("--out-dir", required=True, help="where model.safetensors, model.nzsf and restored.safetensors go")
    p.add_argument("--hidden", type=_positive, default=256, help="hidden size (default: %(default)s)")
    p.add_argument("--layers", type=_positive, default=4, help="decoder layers (default: %(default)s)")
    p.add_argument("--vocab", type=_positive, default=4096, help="vocabulary size (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.set_defaults(func=_cmd_demo)
    return parser


def _message(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror and e.filename is not None:
        return f"{e.strerror}: {e.filename}"
    return " ".join(str(e).split()) or type(e).__name__


def main(argv: list[str] | None = None) -> int:
    """Run the ``nz-lightning`` command line.

    Args:
        argv: Arguments without the program name (default: ``sys.argv[1:]``).

    Returns:
        0 on success, 1 when the demo's restored file differs, 2 on usage errors, missing files, corrupt input or
        any other failure (one ``nz-lightning: error: ...`` line on stderr, no traceback).
    """
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2
    try:
        return int(args.func(args))
    except (OSError, ValueError, TypeError) as e:
        print(f"nz-lightning: error: {_message(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("nz-lightning: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print("nz-lightning: error: out of memory", file=sys.stderr)
        return 2
    except Exception as e:  # every failure is one line and exit code 2, never a traceback
        print(f"nz-lightning: error: {type(e).__name__}: {_message(e)}", file=sys.stderr)
        return 2
