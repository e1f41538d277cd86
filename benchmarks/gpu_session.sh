#!/usr/bin/env bash
# Every GPU measurement of the project, for one lease of the device machine (an H100 or H200): run from the
# repository root there, with the host's sources and wheels carried in .device/ (see ../shared/reference/host-setup.md:
# .device/comfyui holds ComfyUI 0.3.64's Python sources, .device/whl the wheels its image lacks). Each part fits in one
# 10-minute command; JSON results go to $OUT (what the device tool brings back).
#
#   bash benchmarks/gpu_session.sh sampling    # plain vs adapters: paired ratios, syncs, kernels, memory (eager)
#   bash benchmarks/gpu_session.sh compiled    # the same with torch.compile through the host's wrapper
#                                              # (IPX_COMPILE="inductor", "cudagraphs" or "inductor reduce-overhead")
#   bash benchmarks/gpu_session.sh training    # training throughput vs the official loops, base and plus
#   bash benchmarks/gpu_session.sh training-compiled   # the same with --compile's UNet (IPX_VARIANTS="sd15 plus")
#   bash benchmarks/gpu_session.sh calls       # one attention layer call: plain vs patched, CPU issue and GPU time
set -euo pipefail
OUT="${OUT:-$PWD/test-output/gpu}"
mkdir -p "$OUT"
python -c "import av, torchsde, trampoline, diffusers" 2>/dev/null || python -m pip install --quiet --no-deps .device/whl/*.whl
[ -d .device/comfyui ] && export COMFYUI_PATH="$PWD/.device/comfyui"
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu --format=csv | tee "$OUT/gpu.txt"
fi
EXTRA=(${IPX_BENCH_EXTRA:-})  # e.g. IPX_BENCH_EXTRA="--device cpu --quick" to try the plumbing on a CPU
stamp="$(date -u +%Y-%m-%d)"
case "${1:?sampling, compiled, training, training-compiled or calls}" in
  sampling)
    python benchmarks/sampling_benchmark.py --rounds 15 "${EXTRA[@]}" | tee "$OUT/sampling.log" | tail -n 1 > "$OUT/${stamp}_sampling.json" ;;
  compiled)
    read -r backend mode <<< "${IPX_COMPILE:-inductor}"
    python benchmarks/sampling_benchmark.py --rounds 7 --compile "$backend" --compile-mode "${mode:-default}" \
      --configs plain sd15 --batches 1 "${EXTRA[@]}" | tee "$OUT/compiled_$backend$mode.log" | tail -n 1 \
      > "$OUT/${stamp}_sampling_compiled_$backend$mode.json" ;;
  training)
    for variant in sd15 plus; do
      python benchmarks/training_benchmark.py --variant "$variant" --rounds 3 "${EXTRA[@]}" \
        | tee "$OUT/training_$variant.log" | tail -n 1 > "$OUT/${stamp}_training_$variant.json"
    done ;;
  training-compiled)
    for variant in ${IPX_VARIANTS:-sd15 plus}; do
      python benchmarks/training_benchmark.py --variant "$variant" --rounds 3 --configs official ours ours-compiled \
        "${EXTRA[@]}" | tee "$OUT/training_compiled_$variant.log" | tail -n 1 > "$OUT/${stamp}_training_compiled_$variant.json"
    done ;;
  calls)
    python benchmarks/attention_call_benchmark.py "${EXTRA[@]}" | tee "$OUT/calls.log" | tail -n 1 > "$OUT/${stamp}_calls.json" ;;
  *) echo "unknown part: $1 (sampling, compiled, training, training-compiled or calls)" >&2; exit 2 ;;
esac
