"""Train an SD1.5 IP-Adapter headless, on the official dataset format, with ComfyUI's own models and this pack's
patch (ComfyUI is imported in-process; no server).

    python scripts/train.py --checkpoint v1-5-pruned-emaonly.safetensors \\
        --clip-vision CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors \\
        --data-json data.json --data-root images/ --output-dir runs/mine [--variant plus] [--steps 100000]
    torchrun --nproc_per_node 8 scripts/train.py ...        # several GPUs: DDP over the adapter

``data.json`` is a list of ``{"image_file": "rel/path.jpg", "text": "a caption"}``. Adapter-only checkpoints go to
``OUTPUT/checkpoints/step-NNNNNNNN/`` every ``--save-every`` steps (official-layout ``ip_adapter.safetensors`` plus the
optimiser state); a run started again with the same output folder resumes from the newest one. The last adapter is
also written to ``OUTPUT/ip_adapter.safetensors`` (fp16, official layout). Exit codes: 0 done, 2 bad input.
"""
import argparse
import gc
import importlib
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

PACK_DIR = Path(__file__).resolve().parent.parent
sys.path.append(str(PACK_DIR))

from ipx_tools.host import find_comfyui, import_host  # noqa: E402

log = logging.getLogger("ipx.train")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="SD1.5 checkpoint (.safetensors/.ckpt): UNet, text encoder, VAE")
    p.add_argument("--clip-vision", required=True, help="CLIP vision encoder file (ViT-H/14 for SD1.5)")
    p.add_argument("--data-json", required=True, help='JSON list of {"image_file", "text"}')
    p.add_argument("--data-root", required=True, help="folder the image_file paths are relative to")
    p.add_argument("--output-dir", required=True, help="where checkpoints, the loss log and the adapter go")
    p.add_argument("--variant", choices=["sd15", "plus"], default="sd15",
                   help="sd15: base (4 tokens); plus: Resampler (16 tokens). Ignored with --init-adapter")
    p.add_argument("--init-adapter", help="start from this adapter file instead of a new adapter")
    p.add_argument("--steps", type=int, default=100000, help="optimiser steps in all (a resumed run counts on)")
    p.add_argument("--batch-size", type=int, default=8, help="samples per process per micro-batch (official: 8)")
    p.add_argument("--grad-accumulation", type=int, default=1)
    p.add_argument("--learning-rate", type=float, default=1e-4)
    p.add_argument("--weight-decay", type=float, default=1e-2)
    p.add_argument("--image-drop", type=float, default=0.05)
    p.add_argument("--text-drop", type=float, default=0.05)
    p.add_argument("--both-drop", type=float, default=0.05)
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                   help="compute dtype of the frozen models (auto: bf16/fp16 on a GPU, fp32 on the CPU)")
    p.add_argument("--no-cache", action="store_true",
                   help="run the frozen encoders on every step (as the official script) instead of encoding the "
                        "dataset once before training and keeping it in memory")
    p.add_argument("--save-every", type=int, default=1000, help="checkpoint every N steps")
    p.add_argument("--keep-checkpoints", type=int, default=0, help="keep only the newest N checkpoints (0: all)")
    p.add_argument("--log-every", type=int, default=10, help="loss logged (mean over processes) every N steps")
    p.add_argument("--no-resume", action="store_true", help="start over even if the output folder has checkpoints")
    p.add_argument("--num-workers", type=int, default=min(4, os.cpu_count() or 1), help="image loading processes")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--comfyui", help="ComfyUI folder (default: $COMFYUI_PATH, then ~/comfy/ComfyUI)")
    return p.parse_args(argv)


# --- processes -----------------------------------------------------------------------------------------------------

def start_processes(args):
    """(device, rank, world size, object group) from torchrun's environment; one process without it."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)  # before the host is imported: it takes the current device
    group = None
    if world_size > 1:
        dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world_size)
        group = dist.new_group(backend="gloo") if use_cuda else None  # to exchange cached encodings on the CPU
    return device, rank, world_size, group


def pack_modules(host_nodes):
    """The pack's modules as the host loaded them (one copy of every class)."""
    glue = sys.modules[host_nodes.NODE_CLASS_MAPPINGS["IPXTrainAdapter"].__module__]
    root = glue.__package__.rsplit(".", 1)[0]
    names = ("train_batches", "train_data", "train_checkpoints", "training", "variants", "files", "errors")
    return glue, {name: importlib.import_module(f"{root}.ipadapter_core.{name}") for name in names}


def import_training_host(path, device):
    """The host in this process. On a GPU in high-VRAM mode: loaded models stay loaded, so that encoders run on every
    step (--no-cache) do not make the host empty PyTorch's memory cache on every step."""
    if device.type == "cuda":
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))
        from comfy.cli_args import args as host_args
        host_args.highvram = True
    return import_host(path, cpu=device.type == "cpu")


# --- models and data -------------------------------------------------------------------------------------------------

def adapter_spec(args, core, clip_vision, glue):
    """(spec, starting state dict or None)."""
    if args.init_adapter:
        state = core["files"].load_adapter_state_dict(args.init_adapter)
        return core["variants"].detect_variant(state, os.path.basename(args.init_adapter)), state
    output = "image_embeds" if args.variant == "sd15" else "penultimate_hidden_states"
    return core["training"].new_adapter_spec(args.variant, glue.encoder_widths(clip_vision)[output]), None


def encode_all(dataset, encoders, args, rank, world_size, group, core):
    """Every image through the encoders once, shared by all processes; returns fetch(indices)."""
    from tqdm import tqdm
    started = time.perf_counter()
    with tqdm(total=len(dataset), desc="encoding", unit="img", disable=rank != 0, dynamic_ncols=True) as bar:
        examples = core["train_data"].encode_dataset(
            dataset, lambda b: encoders.encode(b["target"], b["reference"], b["text"]), args.batch_size, rank,
            world_size, args.num_workers, group, lambda count: bar.update(min(count * world_size, bar.total - bar.n)))
    log.info("encoded %d images in %.1f s", len(dataset), time.perf_counter() - started)
    return examples.select


def live_fetch(dataset, encoders, args, trainer, rank, world_size, core):
    """fetch(indices) that loads the images and runs the encoders on every step (--no-cache)."""
    sampler = core["train_data"].ScheduledBatches(
        args.seed, len(dataset), trainer.samples_seen, args.batch_size,
        (args.steps - trainer.step) * args.grad_accumulation, world_size, rank)
    batches = iter(torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=args.num_workers,
                                               pin_memory=trainer.device.type == "cuda"))

    def fetch(indices):
        batch = next(batches)
        if batch["index"].tolist() != list(indices):
            raise RuntimeError(f"the data loader gave examples {batch['index'].tolist()}, the trainer expected "
                               f"{list(indices)}")
        return encoders.encode(batch["target"], batch["reference"], batch["text"])
    return fetch


def prepare_data(args, glue, core, device, rank, world_size, group):
    """(spec, starting state, dataset, dropped inputs, fetch or None, encoders or None). With caching the dataset is
    encoded here and the encoders are released before the UNet is loaded."""
    import comfy.clip_vision
    import comfy.sd
    dataset = core["train_data"].ImageTextDataset(core["train_data"].read_dataset(args.data_json, args.data_root),
                                                  args.resolution)
    storage = glue.compute_dtype(args.precision, device) if device.type == "cuda" else torch.float32
    for path in (args.checkpoint, args.clip_vision, args.init_adapter):
        if path and not os.path.isfile(path):
            raise FileNotFoundError(f"{path} does not exist")
    clip, vae = comfy.sd.load_checkpoint_guess_config(args.checkpoint, output_vae=True, output_clip=True,
                                                      output_model=False)[1:3]
    clip_vision = comfy.clip_vision.load(args.clip_vision)
    spec, start = adapter_spec(args, core, clip_vision, glue)
    encoders = glue.HostEncoders(vae, clip, clip_vision, spec, storage_dtype=storage,
                                 output_device=device if args.no_cache else "cpu")
    dropped = encoders.dropped()
    if args.no_cache:
        return spec, start, dataset, dropped, None, encoders
    return spec, start, dataset, dropped, encode_all(dataset, encoders, args, rank, world_size, group, core), None


def release_models():
    import comfy.model_management
    comfy.model_management.unload_all_models()
    gc.collect()
    comfy.model_management.soft_empty_cache()


def build_trainer(args, glue, core, device, rank, world_size, group):
    import comfy.sd
    spec, start, dataset, dropped, fetch, encoders = prepare_data(args, glue, core, device, rank, world_size, group)
    release_models()
    dtype = glue.compute_dtype(args.precision, device)
    model = comfy.sd.load_checkpoint_guess_config(args.checkpoint, output_vae=False, output_clip=False,
                                                  model_options={"dtype": dtype})[0]
    unet = glue.frozen_unet(model.model.diffusion_model, dtype, device, copy_weights=False)
    training = core["training"]
    adapter = training.adapter_from_start(start, args.init_adapter) if start is not None else \
        training.init_adapter(spec, glue.text_kv_weights(unet), args.seed)
    alphas_cumprod, latent_scale = glue.schedule(model)
    settings = training.TrainingSettings(
        learning_rate=args.learning_rate, weight_decay=args.weight_decay, batch_size=args.batch_size,
        grad_accumulation=args.grad_accumulation, seed=args.seed,
        drops=core["train_batches"].DropRates(args.image_drop, args.text_drop, args.both_drop))
    trainer = training.AdapterTrainer(
        adapter, glue.unet_call(unet), num_examples=len(dataset), dropped=dropped, alphas_cumprod=alphas_cumprod,
        latent_scale=latent_scale, settings=settings, device=device, compute_dtype=dtype,
        attention=glue.host_attention, image_attention=glue.host_image_attention, rank=rank, world_size=world_size)
    resume(args, trainer, core, spec)
    if fetch is None:
        fetch = live_fetch(dataset, encoders, args, trainer, rank, world_size, core)
    return trainer, fetch, spec


def resume(args, trainer, core, spec):
    path = None if args.no_resume else core["train_checkpoints"].latest_checkpoint(Path(args.output_dir) /
                                                                                  "checkpoints")
    if path is None:
        return
    state = core["train_checkpoints"].load_checkpoint(path)
    found = core["variants"].detect_variant(state["adapter"], str(path)).variant
    if found != spec.variant:
        raise core["errors"].UnsupportedAdapterError(
            f"{path} holds a {found} adapter but this run trains {spec.variant}; use another --output-dir or "
            f"--no-resume")
    trainer.load_state_dict(state)
    log.info("resumed from %s (step %d, %d samples seen)", path, trainer.step, trainer.samples_seen)


def save(args, trainer, core, spec, final=False):
    metadata = {"ipx_variant": spec.variant, "ipx_step": trainer.step, "ipx_seed": args.seed}
    folder = Path(args.output_dir)
    path = core["train_checkpoints"].save_checkpoint(folder / "checkpoints", trainer.state_dict(), metadata)
    core["train_checkpoints"].prune_checkpoints(folder / "checkpoints", args.keep_checkpoints)
    if final:
        fp16 = {k: v.half() for k, v in trainer.adapter.state_dict().items()}
        core["files"].save_adapter_safetensors(fp16, str(folder / "ip_adapter.safetensors"), metadata)
    return path


# --- the run -------------------------------------------------------------------------------------------------------

def train(args, trainer, fetch, core, spec, rank):
    from tqdm import tqdm
    training = core["training"]
    logfile = open(Path(args.output_dir) / "loss.jsonl", "a") if rank == 0 else None
    bar = tqdm(total=args.steps, initial=trainer.step, desc="training", disable=rank != 0, dynamic_ncols=True)
    try:
        while trainer.step < args.steps:
            loss = trainer.train_step(fetch)
            bar.update(1)
            if trainer.step % args.log_every == 0 or trainer.step == args.steps:
                value = training.mean_across_processes(loss).item()
                bar.set_postfix(loss=f"{value:.4f}")
                if logfile:
                    logfile.write(json.dumps({"step": trainer.step, "loss": value}) + "\n")
                    logfile.flush()
            if rank == 0 and (trainer.step % args.save_every == 0 or trainer.step == args.steps):
                save(args, trainer, core, spec, final=trainer.step == args.steps)
    finally:
        bar.close()
        if logfile:
            logfile.close()


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    device, rank, world_size, group = start_processes(args)
    path, how = find_comfyui() if args.comfyui is None else (Path(args.comfyui), "--comfyui")
    if path is None:
        print(f"error: ComfyUI not found: {how}", file=sys.stderr)
        return 2
    glue, core = pack_modules(import_training_host(path, device))
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    try:
        trainer, fetch, spec = build_trainer(args, glue, core, device, rank, world_size, group)
        train(args, trainer, fetch, core, spec, rank)
    except (core["errors"].IPAdapterError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()
    if rank == 0:
        print(f"done: {trainer.step} steps; adapter: {Path(args.output_dir) / 'ip_adapter.safetensors'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
