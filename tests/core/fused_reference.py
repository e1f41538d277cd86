"""Attention written out by hand in float32, the reference both fused-kernel checks compare with (test_fused.py's
interpreter script and test_fused_cuda.py)."""
import torch


def reference(q, text_out, k, v, factor):
    """text_out + factor * softmax(q k^T / sqrt(d)) v in (batch, tokens, channels), every latent b reading image row
    b // (batch // rows)."""
    b, t, c = q.shape
    heads, d = text_out.shape[1], text_out.shape[3]
    q4 = q.float().reshape(b, t, heads, d).transpose(1, 2)
    kk, vv = (x.float().repeat_interleave(b // k.shape[0], 0) for x in (k, v))
    image = torch.softmax(q4 @ kk.transpose(-1, -2) / d ** 0.5, dim=-1) @ vv
    if factor is not None:
        image = image * factor.float()
    return (text_out.float() + image).transpose(1, 2).reshape(b, t, c)
