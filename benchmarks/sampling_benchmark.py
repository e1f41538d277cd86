"""Sampling time, GPU->CPU syncs, kernel launches and peak memory: plain SD1.5 vs the same model with IP-Adapters,
in the real host, in-process, with random weights built by the host's own classes.

    python benchmarks/sampling_benchmark.py                        # GPU: 512x512, 20 steps, euler, cfg 7, fp16
    python benchmarks/sampling_benchmark.py --device cpu --quick   # CPU smoke run (CI): no timing claims

Configurations are timed in interleaved, shuffled rounds after warm-up; medians and ratios to plain are reported.
The last line printed is one JSON object with every number.
"""
import argparse
import gc
import json
import random
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

PACK_DIR = Path(__file__).resolve().parent.parent
sys.path.append(str(PACK_DIR))

from ipx_tools.host import comfyui_or_exit, comfyui_version, import_host  # noqa: E402

VARIANT_EMBEDS = {  # encoder output shapes per reference image, and the uncond each variant uses
    "sd15": ((1024,), "image_embeds", "zero_embeds"),
    "plus": ((257, 1280), "penultimate_hidden_states", "zero_pixels"),
    "full_face": ((257, 1280), "penultimate_hidden_states", "zero_pixels"),
}
CONFIGS = {"plain": [], "sd15": ["sd15"], "plus": ["plus"], "full_face": ["full_face"], "stacked": ["sd15", "plus"],
           "masked": ["sd15"], "scheduled": ["sd15"],
           # the same without the fused image-attention kernel (what runs where Triton or a CUDA GPU is missing)
           "sd15_unfused": ["sd15"], "stacked_unfused": ["sd15", "plus"],
           # the text attention through the host's attention function, as before host_text_attention
           "sd15_host_text": ["sd15"],
           # the fused image-attention kernel at every size (by default only above fused.MIN_WORK)
           "sd15_fused": ["sd15"], "plus_fused": ["plus"]}
EXTRA = {  # apply options per config: a mask over the left half; a start/end range plus a fading step schedule
    "masked": lambda size: {"mask": torch.cat([torch.ones(1, size, size // 2), torch.zeros(1, size, size // 2)], 2)},
    "scheduled": lambda size: {"start_at": 0.0, "end_at": 0.9, "step_weights": "0:1, 0.5:1, 1:0.2"},
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="64x64, 2 steps, 1 round, batch 1: a smoke run")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--profile-cpu", action="store_true", help="also print, per configuration, where one run spends "
                                                                  "the CPU: PyTorch's profiler and Python's cProfile")
    p.add_argument("--comfyui", help="ComfyUI folder (default: found as the tests find it)")
    p.add_argument("--compile", nargs="?", const="inductor", choices=["inductor", "cudagraphs"],
                   help="torch.compile every configuration's UNet through the host's own compile wrapper, with one "
                        "of the backends its TorchCompileModel node offers (default inductor)")
    p.add_argument("--compile-mode", choices=["default", "reduce-overhead", "max-autotune-no-cudagraphs"],
                   default="default", help="torch.compile's mode with --compile inductor (reduce-overhead: CUDA "
                                           "graphs)")
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.steps, args.rounds, args.warmup, args.batches = 64, 2, 1, 0, [1]
    return args


def build_sd15(device):
    """A random-weight SD1.5 UNet in the host's BaseModel, fp16 on the GPU (fp32 on the CPU), in a ModelPatcher."""
    import comfy.model_detection
    import comfy.model_management
    import comfy.model_patcher
    from ipx_tools.standins import randomize_, sd15_unet_config
    dtype = torch.float16 if device == "cuda" else torch.float32
    config = comfy.model_detection.model_config_from_unet_config(sd15_unet_config())
    config.set_inference_dtype(dtype, None)
    model = config.get_model({}, device="cpu")
    randomize_(model.diffusion_model, seed=0)
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


def build_adapters(nodes, folder):
    """Random adapters written in the official layout, loaded through the pack's own loader."""
    import folder_paths
    from ipx_tools.random_adapters import OFFICIAL_NAMES, random_adapter, write_adapter
    folder_paths.add_model_folder_path("ipadapter", str(folder))
    loader = sys.modules[nodes.NODE_CLASS_MAPPINGS["IPXLoadAdapter"].__module__]
    adapters = {}
    for variant in VARIANT_EMBEDS:
        name = f"{OFFICIAL_NAMES[variant]}.safetensors"
        write_adapter(random_adapter(variant, seed=3), Path(folder) / name, dtype=torch.float16)
        adapters[variant] = loader.load_adapter_file(name)
    return adapters


def patched_models(nodes, base, adapters, configs, size):
    applying = sys.modules[nodes.NODE_CLASS_MAPPINGS["IPXApplyAdapter"].__module__]
    embeds_module = sys.modules[applying.__package__.rsplit(".", 1)[0] + ".ipadapter_core.embeds"]
    g = torch.Generator().manual_seed(5)
    models = {}
    for name in configs:
        model = base
        for variant in CONFIGS[name]:
            shape, output, uncond_mode = VARIANT_EMBEDS[variant]
            cond = torch.randn((1, *shape), generator=g)
            uncond = torch.zeros_like(cond) if uncond_mode == "zero_embeds" else torch.randn((1, *shape), generator=g)
            embeds = embeds_module.ImageEmbeds(cond, uncond, output, uncond_mode)
            options = EXTRA.get(name, lambda _: {})(size)
            start, end = options.pop("start_at", 0.0), options.pop("end_at", 1.0)
            model = applying.apply_adapter(model, adapters[variant], embeds, 0.8, start, end, **options)
        if name.endswith("_unfused"):
            for patch in model.model_options["transformer_options"]["patches_replace"]["attn2"].values():
                patch.fuse = None  # this clone's own patch objects (each apply makes new ones)
        if name.endswith("_fused"):
            for patch in model.model_options["transformer_options"]["patches_replace"]["attn2"].values():
                patch.fuse = lambda q, options: "optimized_attention_override" not in options and \
                    applying.fused.usable(q)
        if name.endswith("_host_text"):
            for patch in model.model_options["transformer_options"]["patches_replace"]["attn2"].values():
                patch.attention = applying.host_attention
        models[name] = model
    return models


def compiled(models, backend, mode):
    """Clones whose UNet runs compiled. They all share one UNet module, so Dynamo keeps every configuration's graph
    on the same code: its limit of graphs per code object is raised so that none falls back to eager."""
    import torch._dynamo
    from comfy_api.torch_helpers import set_torch_compile_wrapper
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    result = {}
    for name, model in models.items():
        result[name] = model.clone()
        set_torch_compile_wrapper(result[name], backend=backend, mode=None if mode == "default" else mode)
    return result


def dynamo_totals():
    """(graphs captured, graph breaks) so far in this process, from Dynamo's counters."""
    from torch._dynamo.utils import counters
    return counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())


def compiled_error(compiled_model, eager_model, args, batch):
    """max |compiled - eager| / max |eager| of one run's final latent, same seed."""
    out, ref = (sample(m, args, batch, seed=11).float() for m in (compiled_model, eager_model))
    return round(float((out - ref).abs().max() / ref.abs().max()), 6)


def sample(model, args, batch, seed, callback=None):
    import comfy.sample
    latent = torch.zeros(batch, 4, args.size // 8, args.size // 8)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(1)
    positive = [[torch.randn(1, 77, 768, generator=g), {}]]
    negative = [[torch.randn(1, 77, 768, generator=g), {}]]
    return comfy.sample.sample(model, noise, args.steps, 7.0, "euler", "normal", positive, negative, latent,
                               disable_pbar=True, seed=seed, callback=callback)


def timed(model, args, batch, seed):
    """(wall seconds of one run, [seconds from each step's end to the next's], CPU seconds of this thread). The steps
    are timed on the GPU's own clock by events recorded from the sampler's step callback (no synchronisation is
    added): a step's time there includes the gaps in which the GPU waited for the CPU's launches, as the run's wall
    time does, without the run's fixed costs (model loading, conditioning), which are the same for every
    configuration. The thread's CPU time is the work of issuing the run (launch-bound, it sets the pace), without
    the time the thread waited for a CPU that other processes were using."""
    cuda = args.device == "cuda"
    events = []

    def step_done(*_):
        if cuda:
            events.append(torch.cuda.Event(enable_timing=True))
            events[-1].record()
    if cuda:
        torch.cuda.synchronize()
    start, cpu_start = time.perf_counter(), time.thread_time()
    sample(model, args, batch, seed, callback=step_done)
    if cuda:
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter() - start, time.thread_time() - cpu_start
    return wall, [a.elapsed_time(b) / 1000 for a, b in zip(events, events[1:])], cpu


def count_syncs(model, args, batch):
    """GPU->CPU synchronisations in one run, as torch's sync debug mode reports them."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            sample(model, args, batch, seed=7)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchronizing" in str(w.message) for w in caught)


def count_kernels(model, args, batch):
    """({kernel name: launches}, GPU busy seconds, Dynamo cache-lookup seconds) in one run (kernels, copies and
    fills), from the profiler.

    Busy time is the sum of the device events' durations (one stream, so they do not overlap): how long the GPU
    itself works, apart from the launch gaps that make up the rest of a launch-bound run's wall time. The cache
    lookup (compiled runs only) is the CPU time Dynamo spends before each compiled call choosing its graph by
    checking guards."""
    from collections import Counter
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CUDA] + ([ProfilerActivity.CPU] if args.compile else [])
    with profile(activities=activities) as prof:
        sample(model, args, batch, seed=8)
        torch.cuda.synchronize()
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy = sum(e.time_range.elapsed_us() for e in events) / 1e6
    lookup = sum(e.time_range.elapsed_us() for e in prof.events() if e.name == "TorchDynamo Cache Lookup") / 1e6
    return Counter(e.name[:80] for e in events), busy, lookup


def print_cpu_profile(name, model, args, batch, rows=14):
    """The CPU side of one run: PyTorch operators and record_function regions by self CPU time, then the Python
    functions by own time (a launch-bound run's time is spent here)."""
    import cProfile
    import io
    import pstats
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        sample(model, args, batch, seed=12)
    print(f"--- {name}, batch {batch}: CPU profile of one run\n"
          f"{prof.key_averages().table(sort_by='self_cpu_time_total', row_limit=rows, max_name_column_width=70)}")
    profiler = cProfile.Profile()
    profiler.enable()
    sample(model, args, batch, seed=12)
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(rows)
    print(text.getvalue()[text.getvalue().find("ncalls"):], flush=True)


def peak_memory(model, args, batch):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    sample(model, args, batch, seed=9)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def bootstrap_ci(per_round, resamples=2000):
    """95% interval of the median step ratio, resampling whole rounds (steps of one run are not independent: the
    machine's speed drifts between runs)."""
    rng = random.Random(1)
    medians = sorted(statistics.median([r for run in rng.choices(per_round, k=len(per_round)) for r in run])
                     for _ in range(resamples))
    return [round(medians[int(0.025 * resamples)], 4), round(medians[int(0.975 * resamples) - 1], 4)]


def measure(models, args, batch, eager=None):
    """Every number for one batch size. ``eager``: with compiled ``models``, the same configurations uncompiled (each
    compiled run's output is compared with theirs)."""
    began = time.perf_counter()
    graphs = {name: [0, 0] for name in models}  # Dynamo graphs captured and breaks, in warm-up, per configuration
    for _ in range(args.warmup):
        for name, model in models.items():
            before = dynamo_totals()
            timed(model, args, batch, seed=0)
            graphs[name] = [g + a - b for g, a, b in zip(graphs[name], dynamo_totals(), before)]
    # Progress (a compiled warm-up can take minutes): the JSON report stays the last line.
    print(f"batch {batch}: warm-up of {len(models)} configurations took {time.perf_counter() - began:.0f} s",
          flush=True)
    times = {name: [] for name in models}
    steps = {name: [] for name in models}  # per round, the list of that run's step times
    cpu = {name: [] for name in models}  # per round, the thread's CPU seconds
    order = list(models)
    rng = random.Random(0)
    recompiled = {name: 0 for name in models}  # graphs captured during the timed rounds: recompilations
    gc.collect()
    gc.disable()  # a collection inside one timed run is noise of the size being measured
    try:
        for r in range(args.rounds):
            rng.shuffle(order)
            for name in order:
                before = dynamo_totals()[0]
                wall, step_times, cpu_s = timed(models[name], args, batch, seed=100 + r)
                recompiled[name] += dynamo_totals()[0] - before
                times[name].append(wall)
                cpu[name].append(cpu_s)
                steps[name].append(step_times)
    finally:
        gc.enable()
    result, kernels = {}, {}
    plain = statistics.median(times["plain"]) if "plain" in times else None
    plain_steps = [t for run in steps.get("plain", []) for t in run]
    for name, values in times.items():
        median = statistics.median(values)
        entry = {"median_s": round(median, 5), "min_s": round(min(values), 5), "max_s": round(max(values), 5)}
        if plain:
            # Paired within each round (the machine's speed drifts between rounds): the median of the per-round
            # ratios, and the ratio of the medians and of the fastest runs for comparison.
            paired = [t / p for t, p in zip(values, times["plain"])]
            entry.update(ratio=round(statistics.median(paired), 4), ratio_of_medians=round(median / plain, 4),
                         ratio_of_minimums=round(min(values) / min(times["plain"]), 4),
                         cpu_median_s=round(statistics.median(cpu[name]), 5),
                         cpu_ratio=round(statistics.median(c / p for c, p in zip(cpu[name], cpu["plain"])), 4))
        flat = [t for run in steps[name] for t in run]
        if flat:
            quartiles = statistics.quantiles(flat, n=4)
            entry.update(step_median_ms=round(1000 * quartiles[1], 3), step_iqr_ms=[round(1000 * quartiles[0], 3),
                                                                                     round(1000 * quartiles[2], 3)])
            if plain:
                # The same step of the same round, ours over plain: many more pairs than runs, and much closer in
                # time, so the machine's drift cancels better.
                per_round = [[t / p for t, p in zip(run, plain_run)]
                             for run, plain_run in zip(steps[name], steps["plain"])]
                pairs = [r for run in per_round for r in run]
                entry.update(step_ratio=round(statistics.median(pairs), 4),
                             step_ratio_of_medians=round(statistics.median(flat) / statistics.median(plain_steps), 4),
                             step_ratio_ci95=bootstrap_ci(per_round))
        if args.compile:
            entry.update(warmup_graphs=graphs[name][0], warmup_graph_breaks=graphs[name][1],
                         graphs_in_rounds=recompiled[name], error_vs_eager=compiled_error(models[name], eager[name],
                                                                                          args, batch))
        if args.profile_cpu:
            print_cpu_profile(name, models[name], args, batch)
        if args.device == "cuda":
            entry["syncs"] = count_syncs(models[name], args, batch)
            kernels[name], busy, lookup = count_kernels(models[name], args, batch)
            entry["kernels"] = sum(kernels[name].values())
            entry["gpu_busy_s"] = round(busy, 5)
            if args.compile:
                entry["cache_lookup_ms_per_step"] = round(1000 * lookup / args.steps, 3)
            entry["peak_bytes"] = peak_memory(models[name], args, batch)
        result[name] = entry
    if "plain" in result and args.device == "cuda":
        base = result["plain"]
        for entry in result.values():
            entry["added_syncs"] = entry["syncs"] - base["syncs"]
            entry["added_kernels_per_step"] = round((entry["kernels"] - base["kernels"]) / args.steps, 1)
            entry["added_peak_mib"] = round((entry["peak_bytes"] - base["peak_bytes"]) / 2 ** 20, 2)
            entry["gpu_busy_ratio"] = round(entry["gpu_busy_s"] / base["gpu_busy_s"], 4)
        for name, counts in kernels.items():
            extra = counts - kernels["plain"]
            result[name]["added_kernels_by_name"] = {k: round(n / args.steps, 2) for k, n in extra.most_common(6)}
    return result


def main(argv=None):
    args = parse_args(argv)
    path = comfyui_or_exit(args.comfyui)
    nodes = import_host(path, cpu=args.device == "cpu", pytorch_attention=bool(args.compile))
    if "plain" not in args.configs:
        args.configs = ["plain"] + args.configs
    with torch.inference_mode(), tempfile.TemporaryDirectory() as folder:
        base = build_sd15(args.device)
        adapters = build_adapters(nodes, folder)
        eager = patched_models(nodes, base, adapters, args.configs, args.size)
        models = compiled(eager, args.compile, args.compile_mode) if args.compile else eager
        report = {"comfyui": comfyui_version(path), "torch": torch.__version__, "device": args.device,
                  "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None, "size": args.size,
                  "steps": args.steps, "sampler": "euler", "cfg": 7.0, "rounds": args.rounds,
                  "compiled": args.compile, "compile_mode": args.compile_mode if args.compile else None,
                  "results": {}}
        for batch in args.batches:
            report["results"][f"batch{batch}"] = measure(models, args, batch, eager)
            print(f"batch {batch}: {json.dumps(report['results'][f'batch{batch}'])}", flush=True)
    print(f"{'config':<12}{'batch':>6}{'median s':>10}{'ratio':>8}{'min ratio':>10}{'+syncs':>8}{'+kern/step':>11}"
          f"{'+MiB':>9}{'GPU busy':>9}{'step ms':>9}{'step ratio':>11}{'95% interval':>16}{'CPU ratio':>10}")
    for key, results in report["results"].items():
        for name, e in results.items():
            print(f"{name:<12}{key[5:]:>6}{e['median_s']:>10.4f}{e.get('ratio', 0):>8.3f}"
                  f"{e.get('ratio_of_minimums', 0):>10.3f}"
                  f"{e.get('added_syncs', '-'):>8}{e.get('added_kernels_per_step', '-'):>11}"
                  f"{e.get('added_peak_mib', '-'):>9}{e.get('gpu_busy_ratio', '-'):>9}"
                  f"{e.get('step_median_ms', '-'):>9}{e.get('step_ratio', '-'):>11}"
                  f"{'-'.join(map(str, e.get('step_ratio_ci95', ['-']))):>16}{e.get('cpu_ratio', '-'):>10}")
    if args.compile:
        for key, results in report["results"].items():
            for name, e in results.items():
                print(f"{name:<12}{key[5:]:>6}  compiled: {e['warmup_graphs']} graphs, {e['warmup_graph_breaks']} "
                      f"breaks in warm-up, {e['graphs_in_rounds']} graphs in the timed rounds, output vs eager "
                      f"{e['error_vs_eager']}, guard checks {e.get('cache_lookup_ms_per_step', '-')} ms/step")
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
