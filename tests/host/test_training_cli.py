"""scripts/train.py, the headless trainer, as users run it: subprocesses on the random-weight stand-ins, a dataset in
the official JSON format, two processes under torchrun (gloo on the CPU) against one with the combined batch,
resuming, adapter-only checkpoints, and clear errors."""
import json
import os
import shutil
import signal
import subprocess
import time
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ipadapter_core import detect_variant, load_adapter
from ipadapter_core.train_checkpoints import ADAPTER_FILE, STATE_FILE, list_checkpoints, load_checkpoint
from ipx_tools.host import find_comfyui
from ipx_tools.standins import CHECKPOINT_NAME, CLIP_VISION_NAMES, build_models_dir_subprocess

from core.test_training_fakes import assert_same_training

PACK_DIR = Path(__file__).resolve().parents[2]
SCRIPT = PACK_DIR / "scripts" / "train.py"
COMMON = ["--steps", "2", "--batch-size", "2", "--resolution", "64", "--save-every", "1", "--log-every", "1",
          "--num-workers", "0", "--seed", "3", "--device", "cpu"]


@pytest.fixture(scope="module")
def models(cache_dir):
    host_path = find_comfyui()[0]
    if host_path is None:
        pytest.skip("HOST NOT FOUND, headless training test skipped")
    root = cache_dir / "models"
    build_models_dir_subprocess(root, ("sd15", "plus"), clip_vision=("vit-h",), host_path=host_path)
    return ["--checkpoint", str(root / "checkpoints" / CHECKPOINT_NAME),
            "--clip-vision", str(root / "clip_vision" / CLIP_VISION_NAMES["vit-h"]), "--comfyui", str(host_path)]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Three images of different sizes and aspects with captions, in the official JSON layout."""
    import numpy as np
    from PIL import Image
    root = tmp_path_factory.mktemp("data")
    (root / "images").mkdir()
    items = []
    for i, (h, w) in enumerate([(80, 96), (64, 64), (96, 72)]):
        y, x = np.mgrid[0:h, 0:w].astype(np.float32)
        rgb = np.stack([x / w, y / h, np.full_like(x, i / 3)], axis=-1)
        Image.fromarray((rgb * 255).round().astype(np.uint8)).save(root / "images" / f"{i}.png")
        items.append({"image_file": f"images/{i}.png", "text": f"picture number {i}"})
    (root / "data.json").write_text(json.dumps(items))
    return ["--data-json", str(root / "data.json"), "--data-root", str(root)]


def run(args, processes: int = 1, timeout: int = 600):
    env = dict(os.environ, OMP_NUM_THREADS="1" if processes > 1 else os.environ.get("OMP_NUM_THREADS", "2"))
    prefix = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"] \
        if processes > 1 else [sys.executable]
    return subprocess.run(prefix + [str(SCRIPT), *args], cwd=PACK_DIR, env=env, capture_output=True, text=True,
                          timeout=timeout)


def trained(models, dataset, out: Path, *extra, processes: int = 1, steps: int = 2):
    args = [*models, *dataset, *COMMON, "--output-dir", str(out), *extra]
    args[args.index("--steps") + 1] = str(steps)
    proc = run(args, processes)
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{proc.stderr[-3000:]}"
    return out


@pytest.fixture(scope="module")
def single(models, dataset, tmp_path_factory):
    """One process, batch 2, two steps."""
    return trained(models, dataset, tmp_path_factory.mktemp("single"))


def losses(out: Path) -> list:
    return [json.loads(line)["loss"] for line in (out / "loss.jsonl").read_text().splitlines()]


def test_two_processes_train_as_one_process_with_the_combined_batch(models, dataset, single, tmp_path):
    pair = trained(models, dataset, tmp_path / "pair", "--batch-size", "1", processes=2)
    one, two = (load_checkpoint(list_checkpoints(out / "checkpoints")[-1]) for out in (single, pair))
    assert one["samples_seen"] == two["samples_seen"] == 4
    assert_same_training(one, two, 1e-4, steps=2)
    torch.testing.assert_close(torch.tensor(losses(pair)), torch.tensor(losses(single)), rtol=1e-5, atol=0)


def test_a_stopped_run_resumes_where_it_stopped(models, dataset, single, tmp_path):
    out = trained(models, dataset, tmp_path / "resumed", steps=1)
    trained(models, dataset, out, steps=2)
    resumed, straight = (load_checkpoint(out / "checkpoints" / "step-00000002") for out in (out, single))
    assert resumed["step"] == 2 and resumed["samples_seen"] == 4
    for key, value in straight["adapter"].items():
        assert torch.equal(resumed["adapter"][key], value), key
    assert len(losses(out)) == 2


def test_encoding_every_step_trains_as_the_cached_run(models, dataset, single, tmp_path):
    live = trained(models, dataset, tmp_path / "live", "--no-cache")
    assert_same_training(load_checkpoint(single / "checkpoints" / "step-00000002"),
                         load_checkpoint(live / "checkpoints" / "step-00000002"), 1e-4, steps=2)


def test_a_compiled_unet_trains_as_the_eager_run_in_one_graph(models, dataset, single, tmp_path):
    """--compile: the UNet's forward and backward captured by torch.compile (aot_eager here: the capture without
    code generation, which a 2-core CI machine could not afford for inductor) in one graph, with no recompilation
    at the second step, and the same training as the eager run."""
    out = tmp_path / "compiled"
    args = [*models, *dataset, *COMMON, "--output-dir", str(out), "--compile", "aot_eager"]
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], cwd=PACK_DIR, capture_output=True, text=True,
                          timeout=600, env=dict(os.environ, TORCH_LOGS="dynamo,graph_breaks,recompiles"))
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{proc.stderr[-3000:]}"
    assert "compiling the UNet (torch.compile, backend aot_eager)" in proc.stderr
    assert proc.stderr.count("torchdynamo done tracing") == 1, "exactly one graph is captured (none: not compiled)"
    assert "Graph break" not in proc.stderr and "Recompiling" not in proc.stderr, proc.stderr[-3000:]
    assert_same_training(load_checkpoint(single / "checkpoints" / "step-00000002"),
                         load_checkpoint(out / "checkpoints" / "step-00000002"), 1e-4, steps=2)
    torch.testing.assert_close(torch.tensor(losses(out)), torch.tensor(losses(single)), rtol=1e-5, atol=0)


def test_checkpoints_hold_only_the_adapter_in_the_official_layout(single):
    found = list_checkpoints(single / "checkpoints")
    assert [p.name for p in found] == ["step-00000001", "step-00000002"]
    assert sorted(p.name for p in found[-1].iterdir()) == sorted([ADAPTER_FILE, STATE_FILE])
    adapter = load_adapter(str(found[-1] / ADAPTER_FILE))
    assert adapter.spec.variant == "sd15"
    state = torch.load(found[-1] / STATE_FILE, weights_only=True)
    assert set(state) == {"optimizer", "scaler", "step", "samples_seen", "run"}
    assert state["run"] == {"seed": 3, "dataset_size": 3, "global_batch": 2}
    final = load_file(str(single / ADAPTER_FILE))
    assert {v.dtype for v in final.values()} == {torch.float16}, "the final adapter is fp16, as the official files"
    assert detect_variant(final).variant == "sd15"
    assert detect_variant(load_checkpoint(found[-1])["adapter"]).variant == "sd15"


def test_a_missing_image_is_a_clear_error(models, dataset, tmp_path):
    data = json.loads(Path(dataset[1]).read_text()) + [{"image_file": "images/absent.png", "text": "x"}]
    (tmp_path / "data.json").write_text(json.dumps(data))
    args = [*models, "--data-json", str(tmp_path / "data.json"), "--data-root", dataset[3], *COMMON,
            "--output-dir", str(tmp_path / "out")]
    proc = run(args)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "absent.png" in proc.stderr and "Traceback" not in proc.stderr


def long_run_args(models, dataset, out: Path, *extra) -> list:
    """Arguments of a run that only a signal ends (1000 steps, no checkpoint before the last step)."""
    args = [*models, *dataset, *COMMON, "--output-dir", str(out), *extra]
    args[args.index("--steps") + 1] = "1000"
    args[args.index("--save-every") + 1] = "1000"
    return args


def signalled(command: list, out: Path, send, env=None):
    """Runs command in a session of its own (its output in files beside out: a pipe nobody reads while it runs
    could fill and block it), calls send(process) once the first step is logged, waits for the end; returns
    (exit code, stderr)."""
    stdout, stderr = out.with_name(out.name + ".stdout"), out.with_name(out.name + ".stderr")
    with open(stdout, "w") as out_file, open(stderr, "w") as err_file:
        proc = subprocess.Popen(command, cwd=PACK_DIR, env=env, stdout=out_file, stderr=err_file,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while not ((out / "loss.jsonl").is_file() and (out / "loss.jsonl").read_text().strip()):
            assert proc.poll() is None and time.monotonic() < deadline, stderr.read_text()[-3000:]
            time.sleep(0.5)
        send(proc)
        proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, stderr.read_text()


def test_a_signal_ends_the_run_after_its_step_with_a_checkpoint_and_the_run_resumes(models, dataset, tmp_path):
    out = tmp_path / "signalled"
    returncode, stderr = signalled([sys.executable, str(SCRIPT), *long_run_args(models, dataset, out)], out,
                                   lambda proc: proc.send_signal(signal.SIGINT))
    assert returncode == 130, stderr[-3000:]
    steps = len(losses(out))
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == [f"step-{steps:08d}"]
    assert f"stopped at step {steps}" in stderr and "Traceback" not in stderr
    assert not (out / ADAPTER_FILE).exists(), "the final adapter is written when the run reaches --steps"
    trained(models, dataset, out, steps=steps + 1)
    assert load_checkpoint(out / "checkpoints" / f"step-{steps + 1:08d}")["samples_seen"] == 2 * (steps + 1)
    assert (out / ADAPTER_FILE).is_file()


def test_resuming_with_other_settings_is_refused_unless_asked(models, dataset, single, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(single, out)
    (out / ADAPTER_FILE).unlink()
    args = [*models, *dataset, *COMMON, "--output-dir", str(out)]
    args[args.index("--seed") + 1] = "4"
    proc = run(args)
    assert proc.returncode == 2 and "seed 3 -> 4" in proc.stderr and "--resume-anyway" in proc.stderr, \
        proc.stderr[-2000:]
    assert "cached encodings" not in proc.stderr and "encoding" not in proc.stderr, \
        f"refused only after encoding the dataset:\n{proc.stderr[-2000:]}"
    trained(models, dataset, out, "--resume-anyway", "--seed", "4")  # already at --steps: nothing to train
    assert len(losses(out)) == 2, "no step was trained"
    assert (out / ADAPTER_FILE).is_file(), "a run already at --steps still writes the final adapter"


@pytest.mark.parametrize("flag", ["--log-every", "--save-every", "--steps", "--batch-size"])
def test_counts_below_one_are_refused_up_front(flag, tmp_path):
    proc = run(["--checkpoint", "x", "--clip-vision", "y", "--data-json", "z", "--data-root", ".", "--output-dir",
                str(tmp_path), flag, "0"])
    assert proc.returncode == 2 and "must be at least 1" in proc.stderr, proc.stderr[-2000:]


def test_a_signal_under_torchrun_stops_every_process_after_the_same_step(models, dataset, tmp_path):
    """torchrun passes a signal on to its processes as SIGTERM; they agree at the next logging step (here every
    step) and all stop after it; rank 0 writes the checkpoint of that step."""
    out = tmp_path / "signalled-ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(SCRIPT),
               *long_run_args(models, dataset, out, "--batch-size", "1")]
    # SIGTERM to torchrun alone, as a cluster's pre-emption does
    _, stderr = signalled(command, out, lambda proc: proc.send_signal(signal.SIGTERM),
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    steps = len(losses(out))
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == [f"step-{steps:08d}"], stderr[-3000:]
    assert f"stopped at step {steps}" in stderr, stderr[-3000:]
    assert load_checkpoint(out / "checkpoints" / f"step-{steps:08d}")["samples_seen"] == 2 * steps


def test_a_signal_to_every_process_of_a_run_loading_images_in_workers_stops_it_after_its_step(models, dataset,
                                                                                              tmp_path):
    """--no-cache with an image-loading worker process: a signal sent to every process of the run (here SIGTERM, as
    from a cluster stopping a job; Ctrl-C sends SIGINT to the terminal's whole process group) reaches the worker too;
    the worker leaves it to the trainer, which stops after its step with a checkpoint. (A worker killed by SIGTERM
    makes the data loader raise in the trainer at once; one that got SIGINT only when the next batch is waited for.)"""
    out = tmp_path / "signalled-workers"
    args = long_run_args(models, dataset, out, "--no-cache")
    args[args.index("--num-workers") + 1] = "1"
    returncode, stderr = signalled([sys.executable, str(SCRIPT), *args], out,
                                   lambda proc: os.killpg(proc.pid, signal.SIGTERM))
    assert returncode == 130 and "Traceback" not in stderr, stderr[-3000:]
    steps = len(losses(out))
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == [f"step-{steps:08d}"], stderr[-3000:]
    assert f"stopped at step {steps}" in stderr
