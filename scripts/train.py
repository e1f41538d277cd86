"""Train an SD1.5 IP-Adapter headless, on the official dataset format, with ComfyUI's own models and this pack's
patch (ComfyUI is imported in-process; no server).

    python scripts/train.py --checkpoint v1-5-pruned-emaonly.safetensors \\
        --clip-vision CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors \\
        --data-json data.json --data-root images/ --output-dir runs/mine [--variant plus] [--steps 100000]
    torchrun --nproc_per_node 8 scripts/train.py ...        # several GPUs: DDP over the adapter

``data.json`` is a list of ``{"image_file": "rel/path.jpg", "text": "a caption"}``. Adapter-only checkpoints go to
``OUTPUT/checkpoints/step-NNNNNNNN/`` every ``--save-every`` steps (official-layout ``ip_adapter.safetensors`` plus the
optimiser state); a run started again with the same output folder resumes from the newest one. The last adapter is
also written to ``OUTPUT/ip_adapter.safetensors`` (fp16, official layout). Ctrl-C or SIGTERM ends the run after the
step in progress, with a checkpoint. Exit codes: 0 done, 2 bad input, 130 stopped by a signal (resumable).
"""
import argparse
import gc
import importlib
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

PACK_DIR = Path(__file__).resolve().parent.parent
sys.path.append(str(PACK_DIR))

from ipx_tools.host import find_comfyui, import_host  # noqa: E402

log = logging.getLogger("ipx.train")


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


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
    p.add_argument("--steps", type=positive, default=100000, help="optimiser steps in all (a resumed run counts on)")
    p.add_argument("--batch-size", type=positive, default=8, help="samples per process per micro-batch (official: 8)")
    p.add_argument("--grad-accumulation", type=positive, default=1)
    p.add_argument("--learning-rate", type=float, default=1e-4)
    p.add_argument("--weight-decay", type=float, default=1e-2)
    p.add_argument("--image-drop", type=float, default=0.05)
    p.add_argument("--text-drop", type=float, default=0.05)
    p.add_argument("--both-drop", type=float, default=0.05)
    p.add_argument("--resolution", type=positive, default=512)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                   help="compute dtype of the frozen models (auto: bf16/fp16 on a GPU, fp32 on the CPU)")
    p.add_argument("--no-cache", action="store_true",
                   help="run the frozen encoders on every step (as the official script) instead of encoding the "
                        "dataset once before training and keeping it in memory")
    p.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="compile the UNet's forward and backward with torch.compile (default backend: inductor); "
                        "faster steps after a first step that compiles for a minute or more (on a GPU: needs Triton; "
                        "on the CPU: a C++ compiler). 'aot_eager' captures the graph without generating code")
    p.add_argument("--save-every", type=positive, default=1000, help="checkpoint every N steps")
    p.add_argument("--keep-checkpoints", type=int, default=0, help="keep only the newest N checkpoints (0: all)")
    p.add_argument("--log-every", type=positive, default=10, help="loss logged (mean over processes) every N steps")
    p.add_argument("--no-resume", action="store_true", help="start over even if the output folder has checkpoints")
    p.add_argument("--resume-anyway", action="store_true",
                   help="resume even though the seed, the dataset's size or the global batch differ from the "
                        "checkpoint's (the data order and the draws then differ from an uninterrupted run)")
    p.add_argument("--num-workers", type=int, default=min(4, os.cpu_count() or 1), help="image loading processes")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--comfyui", help="ComfyUI folder (default: $COMFYUI_PATH, then ~/comfy/ComfyUI)")
    args = p.parse_args(argv)
    if args.compile:
        import torch._dynamo
        backends = torch._dynamo.list_backends(exclude_tags=())
        if args.compile not in backends:
            p.error(f"--compile {args.compile}: not a torch.compile backend; choose one of {', '.join(backends)}")
    return args


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
    names = ("train_batches", "train_data", "train_checkpoints", "train_unet", "training", "layers", "variants",
             "files", "errors")
    return glue, {name: importlib.import_module(f"{root}.ipadapter_core.{name}") for name in names}


def import_training_host(path, device, compile_backend=None):
    """The host in this process. On a GPU in high-VRAM mode: loaded models stay loaded, so that encoders run on every
    step (--no-cache) do not make the host empty PyTorch's memory cache on every step. With --compile, the host's
    PyTorch attention (its default on NVIDIA GPUs; on the CPU it would choose split attention, which asks the OS for
    free memory in every call and cannot be captured in one graph)."""
    if device.type == "cuda" or compile_backend:
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))
        from comfy.cli_args import args as host_args
        host_args.highvram = host_args.highvram or device.type == "cuda"
        host_args.use_pytorch_cross_attention = host_args.use_pytorch_cross_attention or bool(compile_backend)
    return import_host(path, cpu=device.type == "cpu")


# --- models and data -------------------------------------------------------------------------------------------------

def adapter_spec(args, core, clip_vision, glue):
    """(spec, starting state dict or None)."""
    if args.init_adapter:
        state = core["files"].load_adapter_state_dict(args.init_adapter)
        return core["variants"].detect_variant(state, os.path.basename(args.init_adapter)), state
    output = "image_embeds" if args.variant == "sd15" else "penultimate_hidden_states"
    return core["training"].new_adapter_spec(args.variant, glue.encoder_widths(clip_vision)[output]), None


def check_cache_fits(args, dropped, storage, world_size, group=None) -> None:
    """Refuse to encode a dataset whose cached encodings would not fit in this machine's free memory (every
    process holds all of them; with several processes, the exchange holds a second copy for a while). With several
    processes each checks its own machine and all refuse if any does (``group``: one that exchanges CPU objects): a
    process that went on alone would wait for the others forever."""
    import psutil
    per_example = 8 * (args.resolution // 8) ** 2 + dropped.image_embeds[0].numel() + dropped.context[0].numel()
    needed = args.dataset_size * per_example * torch.empty((), dtype=storage).element_size()
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    needed *= local_processes * (2 if world_size > 1 else 1)  # each process on this machine holds the whole cache
    available = psutil.virtual_memory().available
    log.info("cached encodings: %.2f GiB for %d images (%.2f GiB of memory available)", needed / 2 ** 30,
             args.dataset_size, available / 2 ** 30)
    refusal = None
    if needed > 0.8 * available:
        refusal = (f"caching the encodings of {args.dataset_size} images needs about {needed / 2 ** 30:.1f} GiB of "
                   f"memory, {available / 2 ** 30:.1f} GiB are available: run with --no-cache (the encoders then "
                   f"run on every step, as in the official script) or use fewer images")
    if dist.is_initialized() and dist.get_world_size() > 1:
        refusals = [None] * dist.get_world_size()
        mine = None if refusal is None else f"process {dist.get_rank()}: {refusal}"
        dist.all_gather_object(refusals, mine, group=group)
        refusal = next((found for found in refusals if found is not None), None)
    if refusal is not None:
        raise ValueError(refusal)


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
                                               pin_memory=trainer.device.type == "cuda",
                                               worker_init_fn=ignore_stop_signals))

    def fetch(indices):
        batch = next(batches)
        if batch["index"].tolist() != list(indices):
            raise RuntimeError(f"the data loader gave examples {batch['index'].tolist()}, the trainer expected "
                               f"{list(indices)}")
        return encoders.encode(batch["target"], batch["reference"], batch["text"])
    return fetch


def prepare_data(args, dataset, resumed, glue, core, device, rank, world_size, group):
    """(spec, starting state, dropped inputs, fetch or None, encoders or None). With caching the dataset is encoded
    here and the encoders are released before the UNet is loaded."""
    import comfy.clip_vision
    import comfy.sd
    storage = glue.compute_dtype(args.precision, device) if device.type == "cuda" else torch.float32
    for path in (args.checkpoint, args.clip_vision, args.init_adapter):
        if path and not os.path.isfile(path):
            raise FileNotFoundError(f"{path} does not exist")
    clip, vae = comfy.sd.load_checkpoint_guess_config(args.checkpoint, output_vae=True, output_clip=True,
                                                      output_model=False)[1:3]
    clip_vision = comfy.clip_vision.load(args.clip_vision)
    spec, start = adapter_spec(args, core, clip_vision, glue)
    if resumed is not None:
        check_resumed_variant(*resumed, spec, core)
    encoders = glue.HostEncoders(vae, clip, clip_vision, spec, storage_dtype=storage,
                                 output_device=device if args.no_cache else "cpu")
    dropped = encoders.dropped()
    if args.no_cache:
        return spec, start, dropped, None, encoders
    check_cache_fits(args, dropped, storage, world_size, group)
    return spec, start, dropped, encode_all(dataset, encoders, args, rank, world_size, group, core), None


def release_models():
    import comfy.model_management
    comfy.model_management.unload_all_models()
    gc.collect()
    comfy.model_management.soft_empty_cache()


def build_trainer(args, glue, core, device, rank, world_size, group):
    import comfy.sd
    dataset = core["train_data"].ImageTextDataset(core["train_data"].read_dataset(args.data_json, args.data_root),
                                                  args.resolution)
    args.dataset_size = len(dataset)
    resumed = checkpoint_to_resume(args, core)  # refused now, not after minutes of loading and encoding
    spec, start, dropped, fetch, encoders = prepare_data(args, dataset, resumed, glue, core, device, rank, world_size,
                                                         group)
    release_models()
    dtype = glue.compute_dtype(args.precision, device)
    model = comfy.sd.load_checkpoint_guess_config(args.checkpoint, output_vae=False, output_clip=False,
                                                  model_options={"dtype": dtype})[0]
    training = core["training"]
    adapter = training.adapter_from_start(start, args.init_adapter) if start is not None else \
        training.init_adapter(spec, checkpoint_text_kv(args.checkpoint, model.model.diffusion_model, glue, core),
                              args.seed)
    unet = glue.frozen_unet(model.model.diffusion_model, dtype, device, copy_weights=False)
    alphas_cumprod, latent_scale = glue.schedule(model)
    settings = training.TrainingSettings(
        learning_rate=args.learning_rate, weight_decay=args.weight_decay, batch_size=args.batch_size,
        grad_accumulation=args.grad_accumulation, seed=args.seed,
        drops=core["train_batches"].DropRates(args.image_drop, args.text_drop, args.both_drop))
    trainer = training.AdapterTrainer(
        adapter, glue.unet_call(unet, args.compile), num_examples=len(dataset), dropped=dropped,
        alphas_cumprod=alphas_cumprod, latent_scale=latent_scale, settings=settings, device=device, compute_dtype=dtype,
        attention=glue.host_text_attention, image_attention=glue.host_image_attention, rank=rank, world_size=world_size)
    if resumed is not None:
        resume(args, trainer, *resumed)
    if fetch is None:
        fetch = live_fetch(dataset, encoders, args, trainer, rank, world_size, core)
    return trainer, fetch, spec


def checkpoint_text_kv(checkpoint, diffusion_model, glue, core) -> dict:
    """Each cross-attention layer's to_k / to_v as the checkpoint file stores them (the official training copies
    them from the float32 UNet), read by name; the loaded model's (cast to the compute dtype) if the file names
    them otherwise."""
    names = {id(module): name for name, module in diffusion_model.named_modules()}
    wanted = {}
    for layer in core["layers"].SD15_LAYERS:
        prefix = "model.diffusion_model." + names[id(core["train_unet"].cross_attention(diffusion_model,
                                                                                         layer.host_key))]
        wanted[layer.layer_index] = (prefix + ".to_k.weight", prefix + ".to_v.weight")
    keys = [key for pair in wanted.values() for key in pair]
    if checkpoint.endswith(".safetensors"):
        from safetensors import safe_open
        with safe_open(checkpoint, "pt") as f:
            present = set(f.keys())
            tensors = {key: f.get_tensor(key) for key in keys if key in present}
    else:
        import comfy.utils
        state = comfy.utils.load_torch_file(checkpoint, safe_load=True)
        tensors = {key: state[key] for key in keys if key in state}
        del state
    if len(tensors) != len(keys):
        log.info("to_k_ip / to_v_ip start from the loaded model's to_k / to_v (the checkpoint names them otherwise)")
        return glue.text_kv_weights(diffusion_model)
    return {index: (tensors[k].float(), tensors[v].float()) for index, (k, v) in wanted.items()}


def run_identity(args) -> dict:
    """What fixes a run's data order and draws: resuming with other values would not continue the same run."""
    return {"seed": args.seed, "dataset_size": args.dataset_size,
            "global_batch": args.batch_size * args.world_size * args.grad_accumulation}


def checkpoint_to_resume(args, core):
    """(path, state) of the output folder's newest checkpoint, None if there is none or --no-resume. Refused at once,
    before any model is loaded or image encoded, if it was trained with another seed, dataset size or global batch
    (unless --resume-anyway)."""
    path = None if args.no_resume else core["train_checkpoints"].latest_checkpoint(Path(args.output_dir) /
                                                                                  "checkpoints")
    if path is None:
        return None
    state = core["train_checkpoints"].load_checkpoint(path)
    saved = state.get("run") or {}
    changed = {key: (saved[key], value) for key, value in run_identity(args).items()
               if key in saved and saved[key] != value}
    if changed:
        listed = ", ".join(f"{key} {old} -> {new}" for key, (old, new) in changed.items())
        if not args.resume_anyway:
            raise ValueError(f"{path} was trained with other settings ({listed}): resuming would not continue that "
                             f"run. Use the same settings, or --resume-anyway, or --no-resume / another --output-dir")
        log.warning("resuming although %s", listed)
    return path, state


def check_resumed_variant(path, state, spec, core) -> None:
    found = core["variants"].detect_variant(state["adapter"], str(path)).variant
    if found != spec.variant:
        raise core["errors"].UnsupportedAdapterError(
            f"{path} holds a {found} adapter but this run trains {spec.variant}; use another --output-dir or "
            f"--no-resume")


def resume(args, trainer, path, state):
    trainer.load_state_dict(state)
    args.resumed_step = trainer.step
    log.info("resumed from %s (step %d, %d samples seen)", path, trainer.step, trainer.samples_seen)


def save(args, trainer, core, spec, final=False, checkpoint=True):
    metadata = {"ipx_variant": spec.variant, "ipx_step": trainer.step, "ipx_seed": args.seed}
    folder = Path(args.output_dir)
    if checkpoint:
        state = {**trainer.state_dict(), "run": run_identity(args)}
        core["train_checkpoints"].save_checkpoint(folder / "checkpoints", state, metadata)
        core["train_checkpoints"].prune_checkpoints(folder / "checkpoints", args.keep_checkpoints)
    if final:
        fp16 = {k: v.half() for k, v in trainer.adapter.state_dict().items()}
        replace_atomically(folder / "ip_adapter.safetensors",
                           lambda partial: core["files"].save_adapter_safetensors(fp16, partial, metadata))


def replace_atomically(path: Path, write) -> None:
    """write(a temporary path beside ``path``), then rename it to ``path``: a run stopped or killed while writing
    leaves the previous file (or none), never half of one. (Checkpoints are written so by save_checkpoint.)"""
    partial = path.with_name(f".{path.name}.partial")
    try:
        write(str(partial))
        with open(partial, "rb") as f:
            os.fsync(f.fileno())
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


# --- the run -------------------------------------------------------------------------------------------------------

def ignore_stop_signals(worker_id: int) -> None:
    """worker_init_fn of the data loader that feeds training (--no-cache): a Ctrl-C (the terminal sends it to every
    process of the run) or a SIGTERM sent to all processes (a cluster's pre-emption) leaves the image-loading workers
    running, so that the main process finishes its step and saves (a worker that died would end the run with a
    traceback and no checkpoint)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class StopRequest:
    """Ctrl-C / SIGTERM while training: the step in progress finishes, then the run saves and stops (a second signal
    stops at once). With several processes they agree at the next logging step, so that all stop after the same
    step (one that stopped alone would leave the others waiting for it)."""

    def __init__(self, device, world_size: int):
        self.signal = None
        self.device, self.world_size = device, world_size
        self._previous = {}

    def requested(self, collective_point: bool) -> bool:
        if self.world_size == 1:
            return self.signal is not None
        if not collective_point:
            return False
        flag = torch.tensor(float(self.signal is not None), device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def __enter__(self):
        for number in (signal.SIGINT, signal.SIGTERM):
            self._previous[number] = signal.signal(number, self._handle)
        return self

    def _handle(self, number, frame):
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signal.Signals(number).name
        log.warning("%s: stopping after this step (again to stop at once)", self.signal)

    def __exit__(self, *exc):
        for number, handler in self._previous.items():
            signal.signal(number, handler)


def train(args, trainer, fetch, core, spec, rank) -> bool:
    """Train to --steps; False if a signal stopped the run first (a checkpoint of the last step is written)."""
    from tqdm import tqdm
    training = core["training"]
    logfile = open(Path(args.output_dir) / "loss.jsonl", "a") if rank == 0 else None
    bar = tqdm(total=args.steps, initial=trainer.step, desc="training", disable=rank != 0, dynamic_ncols=True)
    if args.compile and rank == 0 and trainer.step < args.steps:
        log.info("compiling the UNet (torch.compile, backend %s): the first step takes longer", args.compile)
    saved_step = getattr(args, "resumed_step", None)
    try:
        with StopRequest(trainer.device, trainer.world_size) as stop:
            while trainer.step < args.steps:
                loss = trainer.train_step(fetch)
                bar.update(1)
                at_log = trainer.step % args.log_every == 0 or trainer.step == args.steps
                if at_log:
                    value = training.mean_across_processes(loss).item()
                    trainer.losses.clear()  # logged: a long run keeps no per-step history
                    bar.set_postfix(loss=f"{value:.4f}")
                    if logfile:
                        logfile.write(json.dumps({"step": trainer.step, "loss": value}) + "\n")
                        logfile.flush()
                if rank == 0 and trainer.step % args.save_every == 0:
                    save(args, trainer, core, spec)
                    saved_step = trainer.step
                if stop.requested(at_log):
                    break
            done = trainer.step >= args.steps
            if rank == 0 and (done or saved_step != trainer.step):
                # still under the handlers: a signal now lets the save finish. The final adapter also when a resumed
                # run had nothing left to do.
                save(args, trainer, core, spec, final=done, checkpoint=saved_step != trainer.step)
        if rank == 0 and not done:
            log.warning("stopped at step %d; checkpoint %s; run the same command again to resume", trainer.step,
                        Path(args.output_dir) / "checkpoints" / core["train_checkpoints"].checkpoint_name(trainer.step))
        return done
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
    glue, core = pack_modules(import_training_host(path, device, args.compile))
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    args.world_size = world_size
    try:
        trainer, fetch, spec = build_trainer(args, glue, core, device, rank, world_size, group)
        if not train(args, trainer, fetch, core, spec, rank):
            return 130
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
