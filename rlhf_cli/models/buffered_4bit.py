"""4-bit linears on the CPU that dequantize their weight into one buffer per size.

bitsandbytes (0.50) computes a 4-bit matmul on the CPU by dequantizing the whole weight into
fresh memory, once per forward and again in backward (`MatMul4Bit` saves only the packed
weight). Those blocks (up to 5.5 MiB for `builtin:large`) are allocated and freed between the
long-lived activations of a training forward; once glibc's dynamic mmap threshold has risen
they come from the heap and leave holes that RSS keeps: on PPO `1base-1lora` the 4-bit side's
peak stood ~100 MiB further above its steady state than the bf16 side's
(benchmarks/RESULTS.md, "QLoRA").

`BufferedLinear4bit` computes exactly what `Linear4bit` computes, with the same kernels in the
same order (bitsandbytes' CPU dequantization kernel, then `F.linear` in forward and
`torch.matmul` with the output gradient in backward), but dequantizes into a buffer shared by
every layer whose weight has the same size and dtype, so nothing of a weight's size is
allocated per call. Only the packed weight is saved for backward, as bitsandbytes does. The
CPU kernel has no `out=` variant registered (`dequantize_4bit.out` exists only for
CUDA/XPU/MPS), so we call the same native function its CPU kernel calls. Anything that path
does not cover (another device, a trained bias, bitsandbytes' inference repacking, shapes its
CPU kernel hands to a fallback) goes through `Linear4bit.forward` unchanged.
"""

from __future__ import annotations

import torch

_NATIVE_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
_buffers: dict[tuple[int, torch.dtype], torch.Tensor] = {}


def _native(quant_type: str, dtype: torch.dtype):
    """bitsandbytes' native CPU dequantizer for `quant_type` into `dtype`, or None."""
    from bitsandbytes.cextension import lib

    try:
        return getattr(lib, f"cdequantize_blockwise_cpu_{quant_type}_{_NATIVE_DTYPES[dtype]}")
    except (AttributeError, KeyError, RuntimeError):  # no native library: the mock raises
        return None


def _buffer(shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """The shared buffer for weights of `shape`'s size in `dtype`, viewed as `shape`."""
    key = (shape.numel(), dtype)
    if key not in _buffers:
        _buffers[key] = torch.empty(key[0], dtype=dtype)
    return _buffers[key].view(shape)


def _absmax(state) -> torch.Tensor:
    """The blocks' scales in fp32, as `bitsandbytes.functional.dequantize_4bit` builds them."""
    import bitsandbytes.functional as F

    if not state.nested:
        return state.absmax.float()
    absmax = F.dequantize_blockwise(state.absmax, state.state2)
    absmax += state.offset
    return absmax.float()


def _dequantized(packed: torch.Tensor, state) -> torch.Tensor:
    """The weight, dequantized into its shared buffer (valid until the next call)."""
    import ctypes

    from bitsandbytes.functional import get_ptr

    rows, columns = state.shape
    out = _buffer(state.shape, state.dtype)
    codes = packed.view(torch.uint8).reshape(rows, columns // 2)
    absmax = _absmax(state)
    _native(state.quant_type, state.dtype)(get_ptr(codes), get_ptr(absmax), get_ptr(out),
                                           ctypes.c_longlong(state.blocksize), ctypes.c_longlong(rows),
                                           ctypes.c_longlong(columns))
    return out


class _MatMul4BitBuffered(torch.autograd.Function):
    """`x @ W.T + b` for a 4-bit W, the gradient reaching only `x` (W and b are frozen)."""

    @staticmethod
    def forward(ctx, x, packed, state, bias):
        ctx.state = state
        ctx.save_for_backward(packed)
        return torch.nn.functional.linear(x, _dequantized(packed, state), bias)

    @staticmethod
    def backward(ctx, grad_output):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        (packed,) = ctx.saved_tensors
        weight = _dequantized(packed, ctx.state).to(grad_output.dtype)
        return torch.matmul(grad_output, weight), None, None, None


def _buffered_path_covers(layer, x: torch.Tensor) -> bool:
    """Whether the buffered path computes what `Linear4bit.forward` would (same kernels)."""
    state = getattr(layer.weight, "quant_state", None)
    if state is None or x.device.type != "cpu" or layer.weight.device.type != "cpu" or x.numel() == 0:
        return False
    if getattr(state, "packing_format_for_cpu", False) or len(state.shape) != 2:
        return False
    if layer.bias is not None and layer.bias.requires_grad:
        return False
    nested_ok = not state.nested or state.state2.blocksize == 256
    # bitsandbytes' CPU kernel sends odd widths and blocks of 2048 or more to a fallback.
    return (nested_ok and state.shape[1] % 2 == 0 and state.blocksize < 2048
            and _native(state.quant_type, state.dtype) is not None)


def buffered_linear4bit_class():
    """`BufferedLinear4bit`, a subclass of bitsandbytes' `Linear4bit` (imported on first use)."""
    import bitsandbytes as bnb

    global _CLASS
    if _CLASS is None:
        class BufferedLinear4bit(bnb.nn.Linear4bit):
            def forward(self, x: torch.Tensor):
                if not _buffered_path_covers(self, x):
                    return super().forward(x)
                # What Linear4bit.forward does around bnb.matmul_4bit.
                if not self.compute_type_is_set:
                    self.set_compute_type(x)
                    self.compute_type_is_set = True
                input_dtype = x.dtype
                if self.compute_dtype is not None:
                    x = x.to(self.compute_dtype)
                bias = self.bias
                if bias is not None:
                    if bias.dtype != x.dtype:
                        bias.data = bias.data.to(x.dtype)
                    bias = bias.to(self.compute_dtype)
                out = _MatMul4BitBuffered.apply(x, self.weight, self.weight.quant_state, bias)
                return out.to(input_dtype)

        _CLASS = BufferedLinear4bit
    return _CLASS


_CLASS = None


def use_buffered_linear4bit(model) -> int:
    """Turn every CPU `Linear4bit` of `model` into a `BufferedLinear4bit`; how many."""
    import bitsandbytes as bnb

    buffered = buffered_linear4bit_class()
    count = 0
    for module in model.modules():
        if type(module) is bnb.nn.Linear4bit and module.weight.device.type == "cpu":
            module.__class__ = buffered
            count += 1
    return count
