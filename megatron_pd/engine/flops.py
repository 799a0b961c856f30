"""FLOP accounting: forward FLOPs per token of a GPT, training FLOPs, and the device peak.

Forward FLOPs per token (2 per multiply-add), PaLM/Megatron convention (attention counted over
the full S x S score matrix, no causal discount):

    2 * (dense matmul params)                     QKV, projection, MLP, LM head
    + 4 * L * S * (heads * head_dim)              QK^T scores and the weighted sum of V

Training = 3 x forward (the backward pass costs twice the forward).
"""

from __future__ import annotations

import time

import torch

# Dense bf16 tensor-core peaks (TFLOP/s) of common training GPUs, by name fragment.
_GPU_PEAK_TFLOPS = (("H200", 989.0), ("H100", 989.0), ("A100", 312.0), ("L40", 181.0))


def forward_flops_per_token(model_cfg, padded_vocab: int, seq_length: int) -> float:
    hidden, layers = model_cfg.hidden_size, model_cfg.num_layers
    heads, groups, head_dim = (
        model_cfg.num_attention_heads,
        model_cfg.query_groups,
        model_cfg.head_dim,
    )
    qkv = hidden * head_dim * (heads + 2 * groups)
    proj = heads * head_dim * hidden
    gates = 3 if model_cfg.activation in ("swiglu", "geglu") else 2
    mlp = gates * hidden * model_cfg.ffn_hidden_size
    matmul_params = layers * (qkv + proj + mlp) + padded_vocab * hidden
    attention = 4 * layers * seq_length * heads * head_dim
    return 2.0 * matmul_params + attention


def train_flops_per_token(model_cfg, padded_vocab: int, seq_length: int) -> float:
    return 3.0 * forward_flops_per_token(model_cfg, padded_vocab, seq_length)


def peak_tflops(device: torch.device, dtype: torch.dtype) -> tuple:
    """(peak TFLOP/s, how it was obtained) of one device.

    GPUs: the dense bf16 datasheet figure by name (None if unknown). CPU: measured - the best
    of a few fp32 matmuls with this process's threads, so MFU on CPU reads as the fraction of
    achievable matmul throughput.
    """
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for fragment, tflops in _GPU_PEAK_TFLOPS:
            if fragment in name:
                return tflops, f"datasheet bf16 dense ({name})"
        return None, f"unknown GPU {name}"
    size = 512
    a = torch.randn(size, size, dtype=torch.float32)
    b = torch.randn(size, size, dtype=torch.float32)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(4):
            torch.mm(a, b)
        best = min(best, (time.perf_counter() - start) / 4)
    return 2.0 * size**3 / best / 1e12, "measured fp32 matmul on this CPU process"
