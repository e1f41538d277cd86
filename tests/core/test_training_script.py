"""scripts/train.py pieces that need no host: the memory check before the dataset is encoded and cached."""
import importlib.util
import types
from pathlib import Path

import pytest
import torch

from ipadapter_core.train_batches import DroppedInputs

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "train.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("ipx_train_script_core", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
