"""Training throughput and peak memory: this pack's trainer against a faithful reimplementation of the official
IP-Adapter ``tutorial_train.py`` loop (base adapter; ``tutorial_train_plus.py`` with ``--variant plus``), in one
process, on the same random SD1.5 UNet weights.

    python benchmarks/training_benchmark.py                        # GPU: 512x512, batch 8
    python benchmarks/training_benchmark.py --variant plus         # the plus adapter (Resampler, 16 tokens)
    python benchmarks/training_benchmark.py --device cpu --quick   # CPU smoke run (CI): no timing claims

Needs diffusers (the official loop's UNet, VAE, DDPM scheduler) and transformers (its CLIP encoders) besides the host.

official      diffusers' UNet2DConditionModel with fp32 weights run under fp16 autocast with a gradient scaler (as
              accelerate's fp16 mode does), AttnProcessor2_0 for self-attention and, for cross-attention, an
              IP-Adapter processor written here after the official IPAttnProcessor2_0 (ip tokens concatenated after
              the text tokens, split off, attended with to_k_ip / to_v_ip, added); the VAE (posterior sample), CLIP
              text encoder and CLIP ViT-H image encoder in fp16 run on every step; DDPMScheduler.add_noise; AdamW;
              the loss read back every step for logging, as the official loop does.
ours          AdapterTrainer on the host's UNet in its compute dtype (bf16 where supported), encodings cached.
ours-fp16     the same in fp16 with a gradient scaler (the official loop's dtype).
ours-encoders ours with the VAE and the CLIP image encoder run on every step (text encodings memoised), as
              scripts/train.py --no-cache does.
ours-compiled ours with the UNet's forward and backward compiled by torch.compile (inductor), as scripts/train.py
              --compile does; the compilation falls in the warm-up steps (its time is reported as warmup_s). GPU only.
Each round builds, warms up, times and frees every configuration in turn (--rounds, default 3); the median round is
reported, with every round's throughput, the first round's peak memory (nothing else on the device then), and each
configuration's loss and prediction on one fixed batch, against the official loop's. The host runs in high-VRAM mode,
as scripts/train.py runs it. The last line printed is one JSON object.

Measured on an H100 (3 rounds, 512x512, batch 8, two runs; README "Training" has the table): official 35-38
samples/s, 14.4 GiB peak (plus 14.8); ours bf16 71-75 (1.85x-2.12x), 7.8 GiB (plus 65-70, 1.72x-1.88x, 8.3 GiB);
fixed-batch loss 1.12398 (official) vs 1.12373 (bf16) and 1.12397 (fp16). Earlier on an H200: official 49.6, ours
bf16 97.0 (1.95x). With ours-compiled (H100, one run each): base 93.7 samples/s (2.57x), plus 74.9 (2.50x).
On the CPU (fp32, 64x64) ours predicts the official plus loop's noise to 1e-6 relative.
"""
import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

PACK_DIR = Path(__file__).resolve().parent.parent
sys.path.append(str(PACK_DIR))

from ipx_tools.host import comfyui_or_exit, comfyui_version, import_host  # noqa: E402

CONFIGS = ("official", "ours", "ours-fp16", "ours-encoders", "ours-compiled")
EXAMPLES = 32  # distinct training examples the cached configurations cycle through


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="64x64, batch 1, 1 warm-up and 2 timed steps")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=30, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    p.add_argument("--variant", choices=["sd15", "plus"], default="sd15",
                   help="sd15: base (4 tokens from image_embeds, tutorial_train.py); plus: Resampler (16 tokens from "
                        "the penultimate hidden states; dropped images are zero pixels into the encoder, "
                        "tutorial_train_plus.py)")
    p.add_argument("--comfyui", help="ComfyUI folder (default: found as the tests find it)")
    p.add_argument("--rounds", type=int, default=3, help="each configuration is built, timed and freed once per round; "
                                                         "the median round is reported")
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.batch, args.steps, args.warmup, args.rounds = 64, 1, 2, 1, 1
    if args.device == "cpu":  # fp16 training needs a GPU; compiling the UNet with inductor takes too long for CI
        args.configs = [c for c in args.configs if c not in ("ours-fp16", "ours-compiled")]
    return args


# --- random SD1.5 weights, shared --------------------------------------------------------------------------------------

def random_models(seed: int = 0):
    """diffusers' SD1.5 UNet and VAE and transformers' CLIP text and ViT-H/14 vision encoders, random, fp32, CPU."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8)
    vae = AutoencoderKL(block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
                        up_block_types=["UpDecoderBlock2D"] * 4, latent_channels=4, layers_per_block=2)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                        num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                                        hidden_act="quick_gelu", projection_dim=768))
    vision = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16, image_size=224,
        patch_size=14, projection_dim=1024, hidden_act="gelu"))
    return {name: m.eval().requires_grad_(False) for name, m in
            (("unet", unet), ("vae", vae), ("text", text), ("vision", vision))}


def host_unet(unet):
    """The host's SD1.5 model (a ModelPatcher, fp32 on the CPU) with the diffusers UNet's weights."""
    import comfy.sd
    state = {k: v for k, v in unet.state_dict().items() if ".processor." not in k}
    model = comfy.sd.load_diffusion_model_state_dict(state, model_options={"dtype": torch.float32})
    model.model.to("cpu")  # high-VRAM mode would keep it on the GPU; each configuration makes its own copy there
    return model


def host_encoders(models):
    """The host's VAE, CLIP vision and text encoder holding the random encoders' weights."""
    import comfy.clip_vision
    import comfy.sd
    text_sd = {(k if k.startswith(("text_model.", "text_projection")) else "text_model." + k): v
               for k, v in models["text"].state_dict().items()}  # transformers 5 drops the text_model. prefix
    return {"vae": comfy.sd.VAE(sd=models["vae"].state_dict()),
            "clip_vision": comfy.clip_vision.load_clipvision_from_sd(models["vision"].state_dict()),
            "clip": comfy.sd.load_text_encoder_state_dicts([text_sd], clip_type=comfy.sd.CLIPType.STABLE_DIFFUSION)}


# --- the official loop, reimplemented ----------------------------------------------------------------------------------

class IPAttnProcessor(nn.Module):
    """Cross-attention with an image prompt, as the official IPAttnProcessor2_0 computes it: the context's last
    ``num_tokens`` tokens are the image tokens; out = attn(q, text) + scale * attn(q, to_k_ip(ip), to_v_ip(ip))."""

    def __init__(self, hidden_size, cross_attention_dim=768, num_tokens=4, scale=1.0):
        super().__init__()
        self.num_tokens, self.scale = num_tokens, scale
        self.to_k_ip = nn.Linear(cross_attention_dim, hidden_size, bias=False)
        self.to_v_ip = nn.Linear(cross_attention_dim, hidden_size, bias=False)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        batch = hidden_states.shape[0]
        split = encoder_hidden_states.shape[1] - self.num_tokens
        text, ip = encoder_hidden_states[:, :split], encoder_hidden_states[:, split:]
        query, key, value = attn.to_q(hidden_states), attn.to_k(text), attn.to_v(text)
        heads = attn.heads
        dim = key.shape[-1] // heads
        q, k, v = (t.view(batch, -1, heads, dim).transpose(1, 2) for t in (query, key, value))
        out = F.scaled_dot_product_attention(q, k, v)
        ip_k, ip_v = (t.view(batch, -1, heads, dim).transpose(1, 2) for t in (self.to_k_ip(ip), self.to_v_ip(ip)))
        out = out + self.scale * F.scaled_dot_product_attention(q, ip_k, ip_v)
        out = out.transpose(1, 2).reshape(batch, -1, heads * dim).to(query.dtype)
        return attn.to_out[1](attn.to_out[0](out))


class OfficialIPAdapter(nn.Module):
    """tutorial_train.py's IPAdapter: image tokens concatenated after the text tokens, then the UNet."""

    def __init__(self, unet, image_proj, adapter_modules):
        super().__init__()
        self.unet, self.image_proj_model, self.adapter_modules = unet, image_proj, adapter_modules

    def forward(self, noisy_latents, timesteps, encoder_hidden_states, image_embeds):
        ip_tokens = self.image_proj_model(image_embeds)
        return self.unet(noisy_latents, timesteps, torch.cat([encoder_hidden_states, ip_tokens], dim=1)).sample


def official_adapter(unet, image_proj_state, spec):
    """The UNet with the official processors: to_k_ip / to_v_ip from each layer's to_k / to_v, and the image
    projection (the official ImageProjModel or Resampler) with the given (ours, identical) initial weights."""
    from diffusers.models.attention_processor import AttnProcessor2_0
    from ipadapter_core.projection import build_image_proj
    modules = dict(unet.named_modules())
    processors = {}
    for name in unet.attn_processors:
        layer = modules[name.rsplit(".processor", 1)[0]]
        if name.endswith("attn1.processor"):
            processors[name] = AttnProcessor2_0()
        else:
            processors[name] = IPAttnProcessor(layer.to_k.weight.shape[0], num_tokens=spec.tokens)
            processors[name].load_state_dict({"to_k_ip.weight": layer.to_k.weight, "to_v_ip.weight": layer.to_v.weight})
    unet.set_attn_processor(processors)
    image_proj = build_image_proj(spec)
    image_proj.load_state_dict(image_proj_state)
    # The official ModuleList holds all 32 processors (its AttnProcessor is a Module); only the 16 IP ones have weights.
    ip_processors = [p for p in unet.attn_processors.values() if isinstance(p, nn.Module)]
    return OfficialIPAdapter(unet, image_proj, nn.ModuleList(ip_processors))


class OfficialLoop:
    def __init__(self, models, image_proj_state, args, spec):
        from diffusers import DDPMScheduler
        self.device = torch.device(args.device)
        self.half = torch.float16 if args.device == "cuda" else torch.float32
        self.vae, self.text, self.vision = (models[n].to(self.device, self.half) for n in ("vae", "text", "vision"))
        self.model = official_adapter(models["unet"].to(self.device), image_proj_state, spec).to(self.device)
        self.plus = spec.image_proj == "resampler"
        self.scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       num_train_timesteps=1000)
        params = [*self.model.image_proj_model.parameters(), *self.model.adapter_modules.parameters()]
        self.optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.half == torch.float16)
        g = torch.Generator().manual_seed(1)
        self.batch = dict(images=torch.rand(args.batch, 3, args.size, args.size, generator=g) * 2 - 1,
                          clip_images=torch.randn(args.batch, 3, 224, 224, generator=g),
                          ids=torch.randint(0, 49408, (args.batch, 77), generator=g),
                          drop=torch.rand(args.batch, generator=g) < 0.05)

    def predict(self, noisy, timesteps, context, image_embeds):
        with torch.autocast(self.device.type, torch.float16, enabled=self.half == torch.float16):
            return self.model(noisy, timesteps, context, image_embeds).float()

    def step(self) -> float:
        b = self.batch
        with torch.no_grad():
            latents = self.vae.encode(b["images"].to(self.device, self.half)).latent_dist.sample() * 0.18215
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, 1000, (latents.shape[0],), device=self.device).long()
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        with torch.no_grad():
            clip_images = b["clip_images"].to(self.device, self.half)
            if self.plus:  # tutorial_train_plus.py: a dropped image is zero pixels into the encoder
                clip_images = torch.stack([torch.zeros_like(c) if d else c for c, d in zip(clip_images, b["drop"])])
                image_embeds = self.vision(clip_images, output_hidden_states=True).hidden_states[-2]
            else:  # tutorial_train.py: a dropped image is zero image embeds
                image_embeds = self.vision(clip_images).image_embeds
                image_embeds = torch.stack([torch.zeros_like(e) if d else e for e, d in zip(image_embeds, b["drop"])])
            context = self.text(b["ids"].to(self.device))[0]
        loss = F.mse_loss(self.predict(noisy, timesteps, context, image_embeds), noise.float(), reduction="mean")
        value = loss.detach().item()  # the official loop gathers and logs the loss on every step
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad()
        return value


# --- ours ------------------------------------------------------------------------------------------------------------

def embeds_shape(args) -> tuple:
    """What the adapter reads from ViT-H/14: image_embeds (base) or the penultimate hidden states (plus)."""
    return (257, 1280) if args.variant == "plus" else (1024,)


def fixed_inputs(args, seed: int = 2):
    """One batch of inputs both implementations are given, to compare their predictions and losses."""
    g = torch.Generator().manual_seed(seed)
    latent = args.size // 8
    return dict(x0=torch.randn(args.batch, 4, latent, latent, generator=g) * 0.8,
                noise=torch.randn(args.batch, 4, latent, latent, generator=g),
                timesteps=torch.linspace(50, 950, args.batch).long(),
                context=torch.randn(args.batch, 77, 768, generator=g),
                embeds=torch.randn(args.batch, *embeds_shape(args), generator=g))


def cached_examples(core, args, device, dtype, seed: int = 3):
    """Encodings as the VAE / encoders would give them (random here), resident on the device."""
    g = torch.Generator().manual_seed(seed)
    latent = args.size // 8
    moments = torch.cat([torch.randn(EXAMPLES, 4, latent, latent, generator=g) * 4,
                         torch.full((EXAMPLES, 4, latent, latent), -10.0)], dim=1)
    examples = core.EncodedExamples(moments, torch.randn(EXAMPLES, *embeds_shape(args), generator=g),
                                    torch.randn(EXAMPLES, 77, 768, generator=g))
    return examples.to(device, dtype)


def encoder_fetch(glue, host, spec, args, dtype, seed: int = 4):
    """fetch(indices) running the host's VAE and CLIP vision on every call, as --no-cache does: the images come from
    pinned CPU memory (as a DataLoader with pin_memory gives them) and the encodings stay on the device."""
    encoders = glue.HostEncoders(host["vae"], host["clip"], host["clip_vision"], spec, storage_dtype=dtype,
                                 output_device=args.device)
    g = torch.Generator().manual_seed(seed)
    targets = torch.rand(EXAMPLES, 3, args.size, args.size, generator=g)
    references = torch.rand(EXAMPLES, 224, 224, 3, generator=g)
    captions = [f"example {i}" for i in range(EXAMPLES)]

    def fetch(indices):
        # A fresh pinned buffer per batch: the caching host allocator reuses one only once its copy has landed.
        index = torch.tensor(indices)
        batch = [torch.index_select(t, 0, index, out=torch.empty((len(indices), *t.shape[1:]),
                                                                   pin_memory=args.device == "cuda"))
                 for t in (targets, references)]
        return encoders.encode(batch[0], batch[1], [captions[i] for i in indices])
    return fetch, encoders.dropped()


def ours_trainer(glue, core, host, initial, args, dtype, fetch=None, dropped=None, compile_backend=None):
    device = torch.device(args.device)
    unet = glue.frozen_unet(host["unet"].model.diffusion_model, dtype, device, copy_weights=device.type == "cuda")
    call = glue.unet_call(unet, compile_backend)
    if fetch is None:
        fetch = cached_examples(core, args, device, dtype if device.type == "cuda" else torch.float32).select
        dropped = core.DroppedInputs(torch.zeros(1, *embeds_shape(args)) if args.variant == "sd15" else
                                     torch.randn(1, *embeds_shape(args)), torch.randn(1, 77, 768))
    alphas, scale = glue.schedule(host["unet"])
    trainer = glue.AdapterTrainer(glue.adapter_from_start(initial), call, num_examples=EXAMPLES,
                                  dropped=dropped, alphas_cumprod=alphas, latent_scale=scale,
                                  settings=glue.TrainingSettings(batch_size=args.batch), device=device,
                                  compute_dtype=dtype, attention=glue.host_text_attention,
                                  image_attention=glue.host_image_attention)
    return trainer, fetch


def noisy_latents(inputs, alphas):
    a = alphas.float()[inputs["timesteps"]].reshape(-1, 1, 1, 1)
    return a.sqrt() * inputs["x0"] + (1 - a).sqrt() * inputs["noise"]


def agreement(predict, inputs, reference, alphas, device):
    """How far a prediction on the fixed inputs is from the official one, and its loss."""
    args = (noisy_latents(inputs, alphas), inputs["timesteps"], inputs["context"], inputs["embeds"])
    with torch.no_grad():
        prediction = predict(*(t.to(device) for t in args)).float().cpu()
    return {"relative_error_vs_official": round(((prediction - reference).abs().max() /
                                                 reference.abs().max()).item(), 6),
            "fixed_batch_loss": round(F.mse_loss(prediction, inputs["noise"]).item(), 6)}


# --- measuring -------------------------------------------------------------------------------------------------------

def measure(step, args) -> dict:
    """Samples per second over the timed steps and the peak memory they reached (GPU)."""
    cuda = args.device == "cuda"
    warm_start = time.perf_counter()
    for _ in range(args.warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    warmup_s = time.perf_counter() - warm_start
    losses, start = [], time.perf_counter()
    for _ in range(args.steps):
        losses.append(step())
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    losses = [float(v) for v in losses]
    out = {"samples_per_s": round(args.batch * args.steps / seconds, 3), "step_ms": round(1000 * seconds / args.steps,
                                                                                            2),
           "mean_loss": round(sum(losses) / len(losses), 5), "warmup_s": round(warmup_s, 1)}
    if cuda:
        out["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
    return out


def free(*objects):
    del objects
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_official(models, initial, inputs, args, alphas, spec):
    """One round of the official loop, and its prediction on the fixed inputs (the reference)."""
    image_proj = {k[len("image_proj."):]: v for k, v in initial.items() if k.startswith("image_proj.")}
    loop = OfficialLoop(models, image_proj, args, spec)
    noisy = noisy_latents(inputs, alphas).to(loop.device, loop.half)
    with torch.no_grad():
        reference = loop.predict(noisy, inputs["timesteps"].to(loop.device), inputs["context"].to(loop.device,
                                 loop.half), inputs["embeds"].to(loop.device)).cpu()
    result = {"dtype": "fp32 weights, fp16 autocast" if loop.half == torch.float16 else "float32",
              "fixed_batch_loss": round(F.mse_loss(reference, inputs["noise"]).item(), 6)}
    result.update(measure(loop.step, args))
    for module in models.values():
        module.to("cpu")
    free(loop)
    return result, reference


def run_ours(name, glue, core, host, spec, initial, inputs, reference, alphas, args):
    """One round of one of this pack's configurations."""
    dtype = torch.float16 if name == "ours-fp16" else glue.compute_dtype("auto", torch.device(args.device))
    fetch, dropped = encoder_fetch(glue, host, spec, args, dtype) if name == "ours-encoders" else (None, None)
    trainer, fetch = ours_trainer(glue, core, host, initial, args, dtype, fetch, dropped,
                                  "inductor" if name == "ours-compiled" else None)
    entry = {"dtype": str(dtype).replace("torch.", "")}
    if reference is not None:
        entry.update(agreement(trainer.denoiser, inputs, reference, alphas, trainer.device))
    entry.update(measure(lambda: trainer.train_step(fetch), args))
    free(trainer, fetch)
    import comfy.model_management
    comfy.model_management.unload_all_models()  # the next configuration starts with nothing of this one loaded
    return entry


def summarize(rounds: dict) -> dict:
    """Per configuration: the median round's throughput (and every round's), the rest (peak memory included) from
    the first round, where each configuration ran with nothing else on the device."""
    out = {}
    for name, entries in rounds.items():
        speeds = sorted(e["samples_per_s"] for e in entries)
        out[name] = {**entries[0], "samples_per_s": speeds[len(speeds) // 2], "samples_per_s_rounds": speeds,
                     "step_ms": sorted(e["step_ms"] for e in entries)[len(entries) // 2]}

    official = out.get("official", {}).get("samples_per_s")
    for entry in out.values():
        if official:
            entry["vs_official"] = round(entry["samples_per_s"] / official, 3)
    return out


def main(argv=None):
    args = parse_args(argv)
    path = comfyui_or_exit(args.comfyui)
    keep_models_on_gpu(path, args.device)
    nodes = import_host(path, cpu=args.device == "cpu")
    glue = sys.modules[nodes.NODE_CLASS_MAPPINGS["IPXTrainAdapter"].__module__]
    core = sys.modules[glue.__package__.rsplit(".", 1)[0] + ".ipadapter_core.train_batches"]
    models = random_models()
    host = {"unet": host_unet(models["unet"])}
    spec = glue.new_adapter_spec(args.variant)
    initial = glue.init_adapter(spec, glue.text_kv_weights(host["unet"].model.diffusion_model), 0).state_dict()
    alphas, _ = glue.schedule(host["unet"])
    inputs = fixed_inputs(args)
    rounds, reference = {name: [] for name in args.configs}, None
    for r in range(args.rounds):
        last = r == args.rounds - 1
        if "official" in args.configs:
            entry, reference = run_official(models, initial, inputs, args, alphas, spec)
            rounds["official"].append(entry)
            progress(r, "official", entry)
        if "ours-encoders" in args.configs and "vae" not in host:
            host.update(host_encoders(models))
        if last:  # the random models are needed again only by later rounds
            free(*[models.pop(k) for k in list(models)])
        for name in [c for c in args.configs if c != "official"]:
            rounds[name].append(run_ours(name, glue, core, host, spec, initial, inputs, reference, alphas, args))
            progress(r, name, rounds[name][-1])
    report = {"comfyui": comfyui_version(path), "torch": torch.__version__, "device": args.device,
              "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None, "size": args.size,
              "batch": args.batch, "steps": args.steps, "variant": args.variant, "rounds": args.rounds, "results": summarize(rounds)}
    print_report(report)
    return report


def progress(round_index: int, name: str, entry: dict) -> None:
    """One line per configuration and round, as it finishes (a run cut short still shows what it measured)."""
    print(f"round {round_index + 1} {name}: {entry['samples_per_s']:.2f} samples/s, warm-up {entry['warmup_s']} s, "
          f"peak {entry.get('peak_gib', '-')} GiB", flush=True)


def keep_models_on_gpu(path, device):
    """As scripts/train.py runs the host: models stay on the GPU once loaded (high-VRAM mode), so the encoders do
    not empty PyTorch's memory cache on every step."""
    if device == "cuda":
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))
        from comfy.cli_args import args as host_args
        host_args.highvram = True


def print_report(report):
    print(f"{'config':<19}{'samples/s':>11}{'vs official':>13}{'step ms':>10}{'peak GiB':>10}{'fixed-batch loss':>18}")
    for name, e in report["results"].items():
        ratio = f"{e['vs_official']:.2f}x" if "vs_official" in e else "-"
        print(f"{name:<19}{e['samples_per_s']:>11.2f}{ratio:>13}{e['step_ms']:>10.1f}{e.get('peak_gib', '-'):>10}"
              f"{e.get('fixed_batch_loss', float('nan')):>18.5f}")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
