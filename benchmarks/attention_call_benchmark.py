"""What one cross-attention layer call costs on the GPU, plain against patched, at the SD1.5 layer shapes: the CPU's
time to issue a call (what sets the pace when sampling is launch-bound, as SD1.5 at batch 1 and 4 is on an H100)
and the GPU's time per call (what sets it when the GPU is busy).

    python benchmarks/attention_call_benchmark.py              # GPU, fp16, UNet batches 2 and 8 (cfg, batch 1 and 4)
    python benchmarks/attention_call_benchmark.py --device cpu --calls 5   # plumbing only (no fused kernel)

plain     the host's optimized attention on the text keys, as the host calls it for an unpatched layer.
text-direct  nodes.applying.host_text_attention: PyTorch's attention called directly on the text keys.
unfused   this pack's patch (DecoupledCrossAttention, base adapter) with the fused kernel off, text attention through
          the host's attention function.
unfused-direct  the same with host_text_attention for the text attention.
fused, fused-direct  the same two with the fused kernel (image attention, weighting and add in one Triton kernel).
sdpa+add  only the unfused image term: PyTorch's attention on the image keys and the add.
kernel    only the fused kernel's launch (fused.attention_add).

issue_us: wall time of N back-to-back calls before synchronising, over N (the GPU queue never fills at N calls, so
this is the CPU's cost to issue one call). call_us: the same including the wait for the GPU, over N. The median of
--repeats is reported. The last line printed is one JSON object.
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

PACK_DIR = Path(__file__).resolve().parent.parent
sys.path.append(str(PACK_DIR))

from ipx_tools.host import comfyui_or_exit, comfyui_version, import_host  # noqa: E402

# (latent tokens, channels) of SD1.5's cross-attention layers at 512x512: 64x64 latent, then 32x32, 16x16, 8x8.
SHAPES = ((4096, 320), (1024, 640), (256, 1280), (64, 1280))
HEADS = 8
TEXT_TOKENS = 77


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batches", type=int, nargs="+", default=[2, 8], help="UNet batch (cond + uncond latents)")
    p.add_argument("--calls", type=int, default=200, help="calls per timing")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--comfyui", help="ComfyUI folder (default: found as the tests find it)")
    return p.parse_args(argv)


def timed(fn, calls: int, cuda: bool):
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    issued = time.perf_counter()
    if cuda:
        torch.cuda.synchronize()
    done = time.perf_counter()
    return 1e6 * (issued - start) / calls, 1e6 * (done - start) / calls


def main(argv=None):
    args = parse_args(argv)
    path = comfyui_or_exit(args.comfyui)
    nodes = import_host(path, cpu=args.device == "cpu")
    applying = sys.modules[nodes.NODE_CLASS_MAPPINGS["IPXApplyAdapter"].__module__]
    root = applying.__package__.rsplit(".", 1)[0]
    core = sys.modules[root + ".ipadapter_core"]
    fused = sys.modules[root + ".ipadapter_core.fused"]
    from ipadapter_core.training import new_adapter_spec  # host-independent
    import comfy.ldm.modules.attention as host_attention_module

    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    adapter_cls = sys.modules[root + ".ipadapter_core.adapter"].IPAdapter
    adapter = adapter_cls(new_adapter_spec("sd15")).to(device, dtype)
    prompt = core.ImagePrompt(adapter, torch.randn(1, 1024), torch.zeros(1, 1024))
    layers = {layer.channels: layer for layer in core.SD15_LAYERS}
    results = []
    for batch in args.batches:
        for tokens, channels in SHAPES:
            options = {"n_heads": HEADS, "cond_or_uncond": [1, 0] if batch % 2 == 0 else [0],
                       "original_shape": [batch, 4, 64, 64], "attn_precision": None}
            q = torch.randn(batch, tokens, channels, device=device, dtype=dtype)
            k, v = (torch.randn(batch, TEXT_TOKENS, channels, device=device, dtype=dtype) for _ in range(2))
            layer = layers[channels]
            fuse = lambda q_, o_: fused.usable(q_)  # noqa: E731
            patches = {name: core.DecoupledCrossAttention(layer, [prompt], text, fuse=fuse if with_kernel else None,
                                                          image_attention=applying.host_image_attention)
                       for name, text, with_kernel in (
                           ("unfused", applying.host_attention, False),
                           ("unfused-direct", applying.host_text_attention, False),
                           ("fused", applying.host_attention, True),
                           ("fused-direct", applying.host_text_attention, True))}
            ip_k, ip_v = prompt.layer_kv(layer.layer_index, options["cond_or_uncond"], batch, device, dtype, HEADS)
            text_out = torch.randn(batch, HEADS, tokens, channels // HEADS, device=device, dtype=dtype)
            q_rows = q.reshape(ip_k.shape[0], -1, HEADS, channels // HEADS).transpose(1, 2)

            def sdpa_add():
                image = torch.nn.functional.scaled_dot_product_attention(q_rows, ip_k, ip_v)
                return text_out + image.reshape(batch, HEADS, tokens, -1)

            variants = {
                "plain": lambda: host_attention_module.optimized_attention(q, k, v, HEADS, attn_precision=None,
                                                                           transformer_options=options),
                "text-direct": lambda: applying.host_text_attention(q, k, v, HEADS, skip_output_reshape=True,
                                                                    transformer_options=options),
                **{name: (lambda patch=patch: patch(q, k, v, options)) for name, patch in patches.items()
                   if name.startswith("unfused")},
                "sdpa+add": sdpa_add,
            }
            entry = {"batch": batch, "tokens": tokens, "channels": channels}
            with torch.inference_mode():
                if fused.usable(q):
                    variants.update({name: (lambda patch=patch: patch(q, k, v, options))
                                     for name, patch in patches.items() if name.startswith("fused")})
                    variants["kernel"] = lambda: fused.attention_add(q, text_out, ip_k, ip_v)
                for fn in variants.values():
                    timed(fn, 20, cuda)  # warm-up: compilation, caches
                samples = {name: [] for name in variants}
                for _ in range(args.repeats):  # interleaved
                    for name, fn in variants.items():
                        samples[name].append(timed(fn, args.calls, cuda))
            for name, values in samples.items():
                entry[name] = {"issue_us": round(statistics.median(v[0] for v in values), 1),
                               "call_us": round(statistics.median(v[1] for v in values), 1)}
            results.append(entry)
            print(f"batch {batch:>2} tokens {tokens:>5} ch {channels:>5}  " +
                  "  ".join(f"{n} {e['issue_us']:.0f}/{e['call_us']:.0f}us" for n, e in entry.items()
                            if isinstance(e, dict)), flush=True)
    report = {"comfyui": comfyui_version(path), "torch": torch.__version__, "device": args.device,
              "gpu": torch.cuda.get_device_name() if cuda else None, "calls": args.calls, "repeats": args.repeats,
              "results": results}
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
