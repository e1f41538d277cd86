"""scripts/train.py pieces that need no host: the memory check before the dataset is encoded and cached (one process
and several), the final adapter's save (atomic, under the stop handlers); and scripts/test.sh's Ctrl-C."""
import importlib.util
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

import ipadapter_core.files
import ipadapter_core.training
from ipadapter_core.train_batches import DroppedInputs
from ipx_tools.random_adapters import random_adapter

PACK_DIR = Path(__file__).resolve().parents[2]
SCRIPT = PACK_DIR / "scripts" / "train.py"


def load_script():
    spec = importlib.util.spec_from_file_location("ipx_train_script_core", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def script():
    return load_script()


def plus_dropped():
    return DroppedInputs(torch.zeros(1, 257, 1280), torch.zeros(1, 77, 768))


def test_a_cache_larger_than_free_memory_is_refused_with_the_way_out(script, monkeypatch):
    import psutil
    monkeypatch.setattr(psutil, "virtual_memory", lambda: types.SimpleNamespace(available=8 * 2 ** 30))
    args = types.SimpleNamespace(resolution=512, dataset_size=100_000)
    # per image: 8 x 64 x 64 latent moments + 257 x 1280 image tokens + 77 x 768 text, in bf16: ~0.79 MiB
    with pytest.raises(ValueError, match=r"about 7[0-9]\.\d GiB.*--no-cache"):
        script.check_cache_fits(args, plus_dropped(), torch.bfloat16, 1)
    args.dataset_size = 1_000  # ~0.8 GiB
    script.check_cache_fits(args, plus_dropped(), torch.bfloat16, 1)


def test_every_process_on_the_machine_counts(script, monkeypatch):
    import psutil
    monkeypatch.setattr(psutil, "virtual_memory", lambda: types.SimpleNamespace(available=8 * 2 ** 30))
    args = types.SimpleNamespace(resolution=512, dataset_size=1_500)  # ~1.2 GiB: fits one process
    script.check_cache_fits(args, plus_dropped(), torch.bfloat16, 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # x4 processes, x2 while exchanging: ~9.3 GiB
    with pytest.raises(ValueError, match="--no-cache"):
        script.check_cache_fits(args, plus_dropped(), torch.bfloat16, 4)


def _check_cache_on_process(rank: int, store: str, out: str):
    """One of two gloo processes: process 1 sees far less free memory than process 0."""
    import psutil
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        available = (8 if rank == 0 else 1) * 2 ** 30
        psutil.virtual_memory = lambda: types.SimpleNamespace(available=available)
        args = types.SimpleNamespace(resolution=512, dataset_size=1_000)  # ~0.8 GiB, x2 processes, x2 exchanging
        try:
            load_script().check_cache_fits(args, plus_dropped(), torch.bfloat16, 2)
            result = "went on"
        except ValueError as e:
            result = f"refused: {e}"
        Path(f"{out}.{rank}").write_text(result)
    finally:
        dist.destroy_process_group()


def test_under_several_processes_all_refuse_when_one_machine_lacks_memory(tmp_path):
    """Each process measures its own machine; one that went on to encode while another refused would wait for it
    forever in the exchange."""
    out = str(tmp_path / "result")
    mp.spawn(_check_cache_on_process, args=(str(tmp_path / "store"), out), nprocs=2, join=True)
    results = [Path(f"{out}.{rank}").read_text() for rank in range(2)]
    assert results[0] == results[1], f"the processes disagree: {results}"
    assert results[0].startswith("refused: process 1: caching the encodings of 1000 images needs about 3.1 GiB")


def final_save(script, tmp_path, adapter):
    args = types.SimpleNamespace(output_dir=str(tmp_path), seed=0)
    trainer = types.SimpleNamespace(step=7, adapter=adapter)
    script.save(args, trainer, {"files": ipadapter_core.files}, adapter.spec, final=True, checkpoint=False)


def test_the_final_adapter_file_is_written_whole_and_no_temporary_file_is_left(script, tmp_path):
    adapter = random_adapter("sd15", seed=0)
    final_save(script, tmp_path, adapter)
    assert os.listdir(tmp_path) == ["ip_adapter.safetensors"]
    written = load_file(str(tmp_path / "ip_adapter.safetensors"))
    expected = ipadapter_core.files.flatten_sections(adapter.state_dict())
    assert written.keys() == expected.keys()
    assert all(torch.equal(written[k], v.half()) for k, v in expected.items())


def test_a_final_save_cut_short_leaves_the_previous_adapter_file(script, tmp_path, monkeypatch):
    final_save(script, tmp_path, random_adapter("sd15", seed=0))
    before = (tmp_path / "ip_adapter.safetensors").read_bytes()

    def disk_full(tensors, path, metadata=None):
        Path(path).write_bytes(b"\0" * 1000)  # half a file, then the write fails
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ipadapter_core.files, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        final_save(script, tmp_path, random_adapter("sd15", seed=1))
    assert (tmp_path / "ip_adapter.safetensors").read_bytes() == before
    assert os.listdir(tmp_path) == ["ip_adapter.safetensors"], "no temporary file is left behind"


class CountingTrainer:
    """What train() reads of an AdapterTrainer: steps that only count."""

    def __init__(self):
        self.step, self.device, self.world_size, self.losses = 0, torch.device("cpu"), 1, []

    def train_step(self, fetch):
        self.step += 1
        return torch.tensor(1.0)


def test_a_ctrl_c_during_the_final_save_lets_the_save_finish(script, tmp_path, monkeypatch):
    """The final save runs under the stop handlers: a first Ctrl-C there is noted, it does not cut the save short."""
    finished = []

    def save(args, trainer, core, spec, final=False, checkpoint=True):
        os.kill(os.getpid(), signal.SIGINT)
        finished.append(final)

    monkeypatch.setattr(script, "save", save)
    args = types.SimpleNamespace(output_dir=str(tmp_path), steps=2, log_every=1, save_every=1000, compile=None)
    try:
        done = script.train(args, CountingTrainer(), None, {"training": ipadapter_core.training}, None, rank=0)
    except KeyboardInterrupt:
        pytest.fail("the Ctrl-C during the final save interrupted it")
    assert done and finished == [True]


def test_ctrl_c_stops_the_whole_test_run_not_only_the_running_group(tmp_path):
    """scripts/test.sh runs its groups one after the other; pytest exits on Ctrl-C (exit 2) without dying of it. A
    stand-in python3 (the one test.sh falls back to without a host) records each group and waits in the first."""
    (tmp_path / "bin").mkdir()
    log = tmp_path / "groups.txt"
    fake = tmp_path / "bin" / "python3"
    fake.write_text('#!/usr/bin/env bash\n'
                    'if [ ! -e "$IPX_FAKE_LOG" ]; then\n'
                    '  trap \'kill $! 2>/dev/null; exit 2\' INT\n'
                    '  echo "$*" >> "$IPX_FAKE_LOG"\n'
                    '  sleep 60 & wait $!\n'
                    'else\n'
                    '  echo "$*" >> "$IPX_FAKE_LOG"\n'
                    'fi\n')
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "IPX_REQUIRE_BROWSER", "COMFYUI_PYTHON")}
    env.update(PATH=f"{tmp_path / 'bin'}:{env['PATH']}", COMFYUI_PATH=str(tmp_path / "no-comfyui"),
               IPX_FAKE_LOG=str(log))
    with open(tmp_path / "out.txt", "w") as out:
        proc = subprocess.Popen(["bash", str(PACK_DIR / "scripts" / "test.sh")], cwd=PACK_DIR, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 60
        while not log.is_file():
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "out.txt").read_text()
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGINT)  # as Ctrl-C in a terminal: to every process of the foreground group
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    output = (tmp_path / "out.txt").read_text()
    assert proc.returncode == 130, output
    assert log.read_text().splitlines() == ["-m pytest tests/core"], "no group ran after the interrupted one"
