"""Fused image attention for sampling on the GPU: one Triton kernel per layer and image prompt computes

    result[b, t, h*D:(h+1)*D] = text_out[b, h, t] + factor[b, t] * softmax(q[b, t, h] K_ip[row(b), h]^T / sqrt(D)) V_ip

and writes it straight into the (batch, tokens, channels) layout the layer's output projection reads. Unfused, the same
takes two kernels (an attention call writing the image term, an add reading it back); fused, one, and the image term
never goes through memory. With few image tokens (4 to 257)
the softmax is small, so each program holds a block of queries and walks the image tokens in blocks with an online
softmax, as flash attention does; scores and sums stay in float32.

Used only where it is exact to the unfused path's math and needs no autograd: CUDA tensors in fp16/bf16, gradients off,
not while torch.compile traces (inductor fuses the unfused path itself). ``TRITON_INTERPRET=1`` runs the kernel on the
CPU (slowly), which is how the CPU tests check it.
"""
import logging
import os

import torch

try:
    import triton
    import triton.language as tl
except Exception:  # Triton ships with PyTorch's Linux CUDA builds; elsewhere (or if its install is broken, which
    triton = None  # can raise more than ImportError) the unfused path runs and the pack still loads

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DTYPES = (torch.float16, torch.bfloat16)
log = logging.getLogger(__name__)
_failure = None  # the error that switched the fused kernel off for this process, if any


# Below this much work per UNet call (its batch times the latent's height times width), sampling is bound by the CPU
# launching kernels, and Triton's launch (its Python-side argument handling) costs more than the two PyTorch launches
# it replaces; above it the GPU's time dominates and the fused kernel's smaller memory traffic wins. Measured on an
# H100 (SD1.5, cfg, so the UNet batch is twice the image batch): 512x512 batch 1 (UNet work 8192) fused was slower
# (step time vs plain 1.13 against 1.01 unfused), batch 4 (32768) a tie (1.077 / 1.078), 768x768 batch 8 (147456)
# faster (1.010 / 1.019; two stacked adapters 1.026 / 1.039).
MIN_WORK = 65536


def large_enough(q: torch.Tensor, transformer_options) -> bool:
    """Whether this UNet call is big enough for the fused kernel to pay off (see MIN_WORK)."""
    shape = transformer_options.get("original_shape")
    work = shape[0] * shape[-2] * shape[-1] if shape is not None and len(shape) == 4 else q.shape[0] * q.shape[1]
    return work >= MIN_WORK


def usable(q: torch.Tensor) -> bool:
    """Whether the fused kernel can serve this call (the caller decides whether the host wants plain attention)."""
    if triton is None or _failure is not None or q.dtype not in DTYPES or torch.is_grad_enabled() or \
            torch.compiler.is_compiling():
        return False
    return q.is_cuda or (INTERPRET and q.device.type == "cpu")


if triton is not None:
    @triton.jit
    def _attention_add(q_ptr, o_ptr, k_ptr, v_ptr, f_ptr, y_ptr,
                       sq_b, sq_t, sq_h, sq_d, so_b, so_h, so_t, so_d, sk_r, sk_h, sk_n, sk_d,
                       sv_r, sv_h, sv_n, sv_d, sf_b, sf_t, sy_b, sy_t, sy_h, sy_d,
                       tokens, per_row, scale, IMAGE_TOKENS: tl.constexpr,
                       HEADS: tl.constexpr, DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
                       BLOCK_N: tl.constexpr, HAS_FACTOR: tl.constexpr):
        b = tl.program_id(1) // HEADS
        h = tl.program_id(1) % HEADS
        row = b // per_row
        t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        d = tl.arange(0, BLOCK_D)
        t_in = t < tokens
        d_in = d < DIM
        td_in = t_in[:, None] & d_in[None, :]
        q = tl.load(q_ptr + b * sq_b + h * sq_h + t[:, None] * sq_t + d[None, :] * sq_d, mask=td_in, other=0.0)
        best = tl.full((BLOCK_T,), float("-inf"), tl.float32)
        total = tl.zeros((BLOCK_T,), tl.float32)
        acc = tl.zeros((BLOCK_T, BLOCK_D), tl.float32)
        for start in range(0, IMAGE_TOKENS, BLOCK_N):  # a compile-time bound (older interpreters need one)
            n = start + tl.arange(0, BLOCK_N)
            nd_in = (n < IMAGE_TOKENS)[:, None] & d_in[None, :]
            k = tl.load(k_ptr + row * sk_r + h * sk_h + n[:, None] * sk_n + d[None, :] * sk_d, mask=nd_in, other=0.0)
            v = tl.load(v_ptr + row * sv_r + h * sv_h + n[:, None] * sv_n + d[None, :] * sv_d, mask=nd_in, other=0.0)
            scores = tl.dot(q, tl.trans(k)) * scale
            scores = tl.where((n < IMAGE_TOKENS)[None, :], scores, float("-inf"))
            new_best = tl.maximum(best, tl.max(scores, 1))
            p = tl.exp(scores - new_best[:, None])
            rescale = tl.exp(best - new_best)
            total = total * rescale + tl.sum(p, 1)
            acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v)
            best = new_best
        image = acc / total[:, None]
        if HAS_FACTOR:
            image = image * tl.load(f_ptr + b * sf_b + t * sf_t, mask=t_in, other=0.0).to(tl.float32)[:, None]
        text = tl.load(o_ptr + b * so_b + h * so_h + t[:, None] * so_t + d[None, :] * so_d, mask=td_in, other=0.0)
        result = text.to(tl.float32) + image
        tl.store(y_ptr + b * sy_b + h * sy_h + t[:, None] * sy_t + d[None, :] * sy_d,
                 result.to(y_ptr.dtype.element_ty), mask=td_in)


def switch_off(error: Exception) -> None:
    """After the kernel failed (Triton could not compile or launch it on this machine: a missing compiler, an old
    driver), the unfused path serves every later call of this process; sampling goes on."""
    global _failure
    _failure = error
    log.warning("fused image attention switched off for this session after an error (%s: %s); the unfused path "
                "gives the same result", type(error).__name__, error)


def attention_add(q, text_out, k, v, factor=None, result=None):
    """``text_out + factor * attention(q, k, v)`` in (batch, tokens, channels) layout, written into ``result`` (a new
    tensor when None; it may be the tensor ``text_out`` views, as when a second image prompt adds to the first).

    q: (batch, tokens, channels); text_out: (batch, heads, tokens, dim), any strides; k, v: (rows, heads,
    image_tokens, dim) with batch a multiple of rows (latent b reads row b // (batch // rows)); factor: None or
    broadcastable to (batch, 1, tokens, 1)."""
    batch, tokens, channels = q.shape
    _, heads, _, dim = text_out.shape
    rows, image_tokens = k.shape[0], k.shape[2]
    if batch % rows or text_out.shape != (batch, heads, tokens, dim) or heads * dim != channels:
        raise ValueError(f"fused image attention: q {list(q.shape)}, text output {list(text_out.shape)}, image keys "
                         f"{list(k.shape)} do not fit together")
    if result is None:
        result = torch.empty_like(q)
    q4 = q.unflatten(-1, (heads, dim))  # (batch, tokens, heads, dim) views
    y4 = result.unflatten(-1, (heads, dim))
    if factor is not None:
        factor = factor.to(q.dtype).expand(batch, 1, tokens, 1)
        f_ptr, f_strides = factor, (factor.stride(0), factor.stride(2))
    else:
        f_ptr, f_strides = q, (0, 0)
    block_t = 64 if dim > 64 else 128
    block_d = max(16, triton.next_power_of_2(dim))
    block_n = 16 if image_tokens <= 16 else 32
    grid = (triton.cdiv(tokens, block_t), batch * heads)
    _attention_add[grid](q4, text_out, k, v, f_ptr, y4,
                         q4.stride(0), q4.stride(1), q4.stride(2), q4.stride(3), *text_out.stride(), *k.stride(),
                         *v.stride(), *f_strides, y4.stride(0), y4.stride(1), y4.stride(2), y4.stride(3),
                         tokens, batch // rows, dim ** -0.5, IMAGE_TOKENS=image_tokens,
                         HEADS=heads, DIM=dim, BLOCK_D=block_d, BLOCK_T=block_t, BLOCK_N=block_n,
                         HAS_FACTOR=factor is not None, num_warps=8 if block_d >= 256 else 4)
    return result
