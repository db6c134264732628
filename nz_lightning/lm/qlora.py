"""QLoRA and quantized-weight baselines through bitsandbytes, on CPU as well as CUDA.

Lightning's ``BitsandbytesPrecision`` refuses every accelerator but CUDA ("Bitsandbytes is only supported on CUDA
GPUs"), and its layer classes quantize only on a CUDA device. bitsandbytes itself (>= 0.49) ships a CPU library:
``bnb.nn.Linear4bit`` (nf4, fp4, with or without double quantization) and ``bnb.nn.Linear8bitLt`` (LLM.int8) run
forward and backward on CPU with bf16, fp16 or fp32 inputs. This module is the small adapter a user would write on
top of bitsandbytes' own modules:

* :func:`quantize_model` replaces, in place, every ``nn.Linear`` of a model (except the output head and LoRA
  adapters) by a bitsandbytes layer holding the quantized weight, frozen;
* :class:`BitsandbytesQuantPrecision` is a Lightning precision plugin (the ``conf/quant/*.yaml`` configs select it)
  that does so for the model a ``LightningModule`` builds in ``configure_model``. While ``configure_model`` runs,
  the plugin's :meth:`~BitsandbytesQuantPrecision.module_init_context` sets the compute dtype as the default dtype
  and makes :func:`active_quantization` return its settings: :func:`nz_lightning.lm.lora.apply_lora`, which the LM
  modules call at the end of ``configure_model``, quantizes the base model *before* peft adds the adapters, so that
  peft wraps the bitsandbytes layers with its own bitsandbytes LoRA layers, as in QLoRA. Models without adapters are
  quantized in :meth:`~BitsandbytesQuantPrecision.convert_module` (Lightning calls it before moving the model to
  its device and before ``configure_optimizers``).

Modes are Lightning's names: ``int8`` (LLM.int8: int8 values, one fp32 absmax scale per output row, outlier
threshold 6.0), ``nf4`` / ``fp4`` (4-bit codes, one fp32 absmax per block of 64 weights) and ``nf4-dq`` / ``fp4-dq``
(the block absmax values themselves quantized to 8 bits, one fp32 scale per 256 of them). The output head stays in
the model's dtype, as in Hugging Face's bitsandbytes integration (``ignore_modules``). Unlike Lightning's plugin,
``int8`` accepts bf16 and fp32 compute as well as fp16 (bitsandbytes' CPU path handles all three).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, ExitStack
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
from lightning.fabric.plugins.precision.utils import _convert_fp_tensor, _DtypeContextManager
from lightning.pytorch.plugins.precision import Precision
from lightning_utilities import apply_to_collection
from torch import Tensor, nn

from nz_lightning.lm.bnb_import import INSTALL_HINT, import_bitsandbytes

__all__ = [
    "COMPUTE_DTYPES",
    "INSTALL_HINT",
    "MODES",
    "BitsandbytesQuantPrecision",
    "QuantSettings",
    "active_quantization",
    "held_weight_bytes",
    "import_bitsandbytes",
    "is_quantized_linear",
    "quantize_linear",
    "quantize_model",
    "quantized_layers",
]

MODES = ("int8", "fp4", "nf4", "fp4-dq", "nf4-dq")
"""Quantization modes (Lightning's names; ``-dq``: double quantization of the 4-bit block scales)."""

COMPUTE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
"""Compute dtypes bitsandbytes' layers accept (inputs are cast to it; 4-bit weights are dequantized to it)."""

BLOCKSIZE_4BIT = 64
"""Weights per 4-bit quantization block (bitsandbytes' default; one absmax per block)."""


_ACTIVE: ContextVar[QuantSettings | None] = ContextVar("nz_lightning_bnb_quantization", default=None)


@dataclass(frozen=True)
class QuantSettings:
    """What to quantize and how.

    Attributes:
        mode: One of :data:`MODES`.
        dtype: Compute dtype (one of :data:`COMPUTE_DTYPES`).
        ignore_modules: Module-name prefixes whose linear layers stay as they are (default: the output head).
        threshold: LLM.int8's outlier threshold (``int8`` only; 0 disables the outlier decomposition).
    """

    mode: str
    dtype: torch.dtype = torch.bfloat16
    ignore_modules: tuple[str, ...] = ("lm_head",)
    threshold: float = 6.0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown bitsandbytes quantization mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if self.dtype not in COMPUTE_DTYPES:
            names = ", ".join(str(d).removeprefix("torch.") for d in COMPUTE_DTYPES)
            raise ValueError(
                f"bitsandbytes {self.mode}: unsupported compute dtype {self.dtype} (the quant config's `dtype`); "
                f"choose one of {names}"
            )


def active_quantization() -> QuantSettings | None:
    """The settings of the :class:`BitsandbytesQuantPrecision` whose ``module_init_context`` is active, else None."""
    return _ACTIVE.get()


# -- quantizing layers ----------------------------------------------------------------------------------------------


def is_quantized_linear(module: nn.Module) -> bool:
    """Whether ``module`` is a bitsandbytes 4-bit or int8 linear layer (False when bitsandbytes is not imported)."""
    bnb = sys.modules.get("bitsandbytes")
    return bnb is not None and isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))


def quantized_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, layer)`` of every bitsandbytes linear layer of ``model``."""
    return [(n, m) for n, m in model.named_modules() if is_quantized_linear(m)]


def quantize_linear(linear: nn.Linear, settings: QuantSettings) -> nn.Module:
    """A bitsandbytes layer holding ``linear``'s weight quantized (on ``linear``'s device), weight and bias frozen.

    Args:
        linear: A plain ``nn.Linear`` with materialized fp32 / bf16 / fp16 weights (not modified).
        settings: Mode, compute dtype and int8 threshold.

    Returns:
        ``bnb.nn.Linear4bit`` (weight: ``Params4bit``, uint8 codes) or ``bnb.nn.Linear8bitLt`` (weight:
        ``Int8Params``, int8 values with per-row ``SCB`` scales).

    Raises:
        ValueError: The weight is on the meta device or not fp32 / bf16 / fp16.
    """
    bnb = import_bitsandbytes()
    weight = linear.weight.detach()
    if weight.device.type == "meta":
        raise ValueError("cannot quantize a linear layer on the meta device: materialize its weights first")
    if weight.dtype not in COMPUTE_DTYPES:
        raise ValueError(f"bitsandbytes quantizes fp32 / bf16 / fp16 weights, got a {weight.dtype} linear layer")
    with _DtypeContextManager(torch.float32):  # bitsandbytes builds its code books in the default dtype: keep fp32
        new = _quantized_layer(bnb, linear, weight, settings)
    if linear.bias is not None:
        new.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    return new.train(linear.training)


def _quantized_layer(bnb: Any, linear: nn.Linear, weight: Tensor, settings: QuantSettings) -> nn.Module:
    device = weight.device
    bias = linear.bias is not None
    new: nn.Module
    if settings.mode == "int8":
        new = bnb.nn.Linear8bitLt(
            linear.in_features, linear.out_features, bias=bias, has_fp16_weights=False,
            threshold=settings.threshold, device="meta",
        )  # fmt: skip
        new.weight = bnb.nn.Int8Params(weight.clone(), requires_grad=False, has_fp16_weights=False).to(device)
    else:
        quant_type, double = settings.mode[:3], settings.mode.endswith("-dq")
        new = bnb.nn.Linear4bit(
            linear.in_features, linear.out_features, bias=bias, compute_dtype=settings.dtype,
            compress_statistics=double, quant_type=quant_type, device="meta",
        )  # fmt: skip
        params = bnb.nn.Params4bit(
            weight.clone(), requires_grad=False, blocksize=BLOCKSIZE_4BIT, compress_statistics=double,
            quant_type=quant_type, module=new,
        )  # fmt: skip
        new.weight = params.to(device)  # quantizes
        # bitsandbytes repacks 4-bit weights into an AVX-512 BF16 layout on the first CPU forward in eval mode and then
        # runs every later forward through an op without autograd support, training ones included: after a
        # validation pass, gradients through the base layers would be silently wrong. Keep the standard layout.
        setattr(new, "support_avx512bf16_for_cpu", False)  # noqa: B010  (a plain attribute of Linear4bit)
    return new


def _is_adapter(name: str) -> bool:
    return any(part.startswith(("lora_", "lokr_", "loha_")) for part in name.split("."))


def quantize_model(model: nn.Module, settings: QuantSettings) -> nn.Module:
    """Replace the model's linear layers by bitsandbytes ones, in place (idempotent: quantized layers are kept).

    Skipped: layers under a name prefix of ``settings.ignore_modules`` (the output head by default), LoRA adapter
    layers, and the layers a Hugging Face model lists in ``_keep_in_fp32_modules`` (T5's ``wo``, whose forward casts
    its input to the weight's dtype), as Hugging Face's bitsandbytes integration does. Every parameter left in a
    quantized layer is frozen.

    Args:
        model: Any module with ``nn.Linear`` layers.
        settings: Mode, compute dtype, ignored modules.

    Returns:
        ``model``.

    Raises:
        TypeError: The model has no linear layer at all.
        ValueError: LoRA adapters already wrap plain linear layers (quantize before adding them, as
            :func:`nz_lightning.lm.lora.apply_lora` does inside the plugin's context), or a weight is on the meta
            device or has an unsupported dtype.
    """
    import_bitsandbytes()
    if not any(isinstance(m, nn.Linear) for m in model.modules()):
        raise TypeError(f"bitsandbytes {settings.mode}: the model has no nn.Linear layer to quantize")
    keep = {k for m in model.modules() for k in (getattr(m, "_keep_in_fp32_modules", None) or [])}
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if not isinstance(child, nn.Linear) or is_quantized_linear(child) or _is_adapter(name):
                continue
            if _ignored(name, settings.ignore_modules) or keep.intersection(name.split(".")):
                continue
            if child_name == "base_layer":
                raise ValueError(
                    f"{name}: LoRA adapters were added before quantization; quantize the base model first (build it "
                    "in configure_model under the bitsandbytes plugin, which quantizes before apply_lora)"
                )
            setattr(parent, child_name, quantize_linear(child, settings))
    return model


def _ignored(name: str, prefixes: Iterable[str]) -> bool:
    parts = name.split(".")
    # peft nests the model (base_model.model.<name>): match the prefix against every suffix of the name
    return any(".".join(parts[i:]).startswith(p) for p in prefixes for i in range(len(parts)))


def held_weight_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes the model's weights hold, split into quantized layers and everything else (each storage once).

    Returns:
        ``quantized``: packed 4-bit codes / int8 values of bitsandbytes layers plus their quantization state (block
        absmax, code book, nested state, int8 row scales); ``dense``: every other parameter and buffer (output head,
        embeddings, norms, biases, LoRA adapters); ``total``: the sum; ``trainable``: bytes of trainable
        parameters; ``quantized_numel``: original elements of the quantized weights.
    """
    seen: set[int] = set()

    def nbytes(t: Any) -> int:
        if not isinstance(t, Tensor) or t.device.type == "meta":
            return 0
        key = t.untyped_storage().data_ptr()
        if key in seen:
            return 0
        seen.add(key)
        return t.untyped_storage().nbytes()

    quantized = numel = 0
    for _, layer in quantized_layers(model):
        w: Any = layer.weight
        quantized += nbytes(w)
        state = getattr(w, "quant_state", None)
        if state is not None:
            numel += int(torch.Size(state.shape).numel())
            for t in (state.absmax, state.code, getattr(state, "offset", None)):
                quantized += nbytes(t)
            nested = getattr(state, "state2", None)
            if nested is not None:
                quantized += nbytes(nested.absmax) + nbytes(nested.code)
        else:  # LLM.int8: the row scales sit on the weight until the first forward, then on the layer's state
            numel += w.numel()
            quantized += nbytes(getattr(w, "SCB", None)) + nbytes(getattr(getattr(layer, "state", None), "SCB", None))
    dense = sum(nbytes(t) for t in [*model.parameters(), *model.buffers()])
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return {
        "quantized": quantized,
        "dense": dense,
        "total": quantized + dense,
        "trainable": trainable,
        "quantized_numel": numel,
    }


# -- the Lightning plugin --------------------------------------------------------------------------------------------


class BitsandbytesQuantPrecision(Precision):
    """Quantize a model's linear layers with bitsandbytes, on CPU or CUDA (``conf/quant/*.yaml``).

    A stand-in for Lightning's ``BitsandbytesPrecision``, which only runs on CUDA. The model is built by the
    ``LightningModule``'s ``configure_model`` with the compute dtype as default dtype; its linear layers are then
    quantized (before LoRA adapters are added, see the module docstring) and frozen. Inputs are cast to the compute
    dtype in each step; outputs back to the default dtype.

    Args:
        mode: One of :data:`MODES`.
        dtype: Compute dtype, one of :data:`COMPUTE_DTYPES` (default bf16).
        ignore_modules: Name prefixes of linear layers to keep unquantized (default: ``{"lm_head"}``).
        threshold: LLM.int8 outlier threshold (``int8`` only).

    Raises:
        ImportError: bitsandbytes is not installed (the message names the package and the install command).
        ValueError: Unknown mode or unsupported dtype (the message names the setting).
    """

    def __init__(
        self,
        mode: str,
        dtype: torch.dtype | None = None,
        ignore_modules: Iterable[str] | None = None,
        threshold: float = 6.0,
    ) -> None:
        super().__init__()
        ignored = ("lm_head",) if ignore_modules is None else tuple(ignore_modules)
        self.settings = QuantSettings(str(mode), dtype or torch.bfloat16, ignored, float(threshold))
        import_bitsandbytes()
        self.mode, self.dtype = self.settings.mode, self.settings.dtype

    def convert_module(self, module: nn.Module) -> nn.Module:
        """Quantize the linear layers the model still holds dense (none when ``configure_model`` quantized them)."""
        return quantize_model(module, self.settings)

    def tensor_init_context(self) -> AbstractContextManager:
        """Tensors created in this context default to the compute dtype."""
        return _DtypeContextManager(self.dtype)

    def module_init_context(self) -> AbstractContextManager:
        """Compute dtype as default dtype, and :func:`active_quantization` returns this plugin's settings."""
        stack = ExitStack()
        stack.enter_context(self.tensor_init_context())
        stack.enter_context(_activate(self.settings))
        return stack

    def forward_context(self) -> AbstractContextManager:
        """Steps run with the compute dtype as default dtype."""
        return _DtypeContextManager(self.dtype)

    def convert_input(self, data: Any) -> Any:
        """Floating-point inputs to the compute dtype."""
        return apply_to_collection(data, function=_convert_fp_tensor, dtype=Tensor, dst_type=self.dtype)

    def convert_output(self, data: Any) -> Any:
        """Floating-point outputs to the default dtype."""
        return apply_to_collection(data, function=_convert_fp_tensor, dtype=Tensor, dst_type=torch.get_default_dtype())


@contextlib.contextmanager
def _activate(settings: QuantSettings) -> Iterator[None]:
    token = _ACTIVE.set(settings)
    try:
        yield
    finally:
        _ACTIVE.reset(token)
