"""Both official file layouts load strictly; truncated, corrupt and code-running files are refused clearly."""
import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

from ipadapter_core import AdapterFileError, IPAdapterError, load_adapter, load_adapter_state_dict, save_adapter_bin
from ipx_tools.random_adapters import random_adapter, write_adapter


@pytest.fixture(scope="module")
def base():
    return random_adapter("sd15", seed=3)


@pytest.mark.parametrize("ext", ["bin", "safetensors"])
def test_official_layouts_load_every_tensor_exactly(tmp_path, base, ext):
    path = write_adapter(base, tmp_path / f"ip-adapter_sd15.{ext}")
    loaded = load_adapter(path)
    expected = base.state_dict()
    assert set(loaded.state_dict()) == set(expected)
    assert len(expected) == 36  # as the official ip-adapter_sd15: 4 projection tensors + 16 x 2 layer weights
    for key, tensor in expected.items():
        assert torch.equal(loaded.state_dict()[key], tensor), key


def test_bin_is_the_nested_official_layout(tmp_path, base):
    path = write_adapter(base, tmp_path / "a.bin")
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"image_proj", "ip_adapter"}
    assert "1.to_k_ip.weight" in raw["ip_adapter"] and "proj.weight" in raw["image_proj"]


def test_fp16_file_loads(tmp_path, base):
    path = write_adapter(base, tmp_path / "half.safetensors", dtype=torch.float16)
    loaded = load_adapter(path)
    key = "ip_adapter.31.to_v_ip.weight"
    assert torch.equal(loaded.state_dict()[key], base.state_dict()[key].half().float())


def test_plus_has_83_tensors_like_the_official_file(tmp_path):
    path = write_adapter(random_adapter("plus"), tmp_path / "p.safetensors")
    assert len(load_adapter_state_dict(path)) == 83


def test_extra_key_is_refused_by_strict_loading(tmp_path, base):
    sd = dict(base.state_dict())
    sd["image_proj.extra.weight"] = torch.zeros(1)
    path = tmp_path / "extra.safetensors"
    save_file(sd, str(path))
    with pytest.raises(AdapterFileError, match=r"extra.safetensors does not match the sd15 layout: unexpected"):
        load_adapter(str(path))


def test_truncated_bin_is_refused_naming_the_file(tmp_path, base):
    path = write_adapter(base, tmp_path / "ip-adapter_sd15.bin")
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    with pytest.raises(AdapterFileError, match=r"ip-adapter_sd15.bin cannot be read .*truncated or corrupt"):
        load_adapter(path)


def test_truncated_safetensors_is_refused_naming_the_file(tmp_path, base):
    path = write_adapter(base, tmp_path / "ip-adapter_sd15.safetensors")
    data = open(path, "rb").read()
    open(path, "wb").write(data[:1000])
    with pytest.raises(AdapterFileError, match=r"ip-adapter_sd15.safetensors cannot be read as safetensors"):
        load_adapter(path)


def test_empty_file_is_refused(tmp_path):
    path = tmp_path / "empty.bin"
    path.write_bytes(b"")
    with pytest.raises(AdapterFileError, match="empty.bin is empty"):
        load_adapter(str(path))


@pytest.mark.parametrize("ext", ["bin", "safetensors"])
def test_random_bytes_are_refused(tmp_path, ext):
    """Whatever the bytes, the error is an AdapterFileError naming the file (the unpickler alone can fail with
    EOFError, IndexError, UnpicklingError, ... depending on them)."""
    import random
    for seed in range(40):
        path = tmp_path / f"noise{seed}.{ext}"
        path.write_bytes(random.Random(seed).randbytes(random.Random(seed).randint(1, 4096)))
        with pytest.raises(AdapterFileError, match=f"noise{seed}.{ext}"):
            load_adapter(str(path))


def test_damaged_bytes_inside_a_real_file_are_refused(tmp_path, base):
    import random
    good = open(write_adapter(base, tmp_path / "good.bin"), "rb").read()
    for seed in range(10):
        data = bytearray(good)
        rng = random.Random(seed)
        for _ in range(20):
            data[rng.randrange(len(data) // 50)] = rng.randrange(256)  # damage the header and first tensors
        path = tmp_path / f"damaged{seed}.bin"
        path.write_bytes(bytes(data))
        try:
            load_adapter(str(path))  # damage confined to tensor bytes can still load: that is not an error
        except IPAdapterError as e:  # unreadable, or readable with impossible shapes: either way named
            assert f"damaged{seed}.bin" in str(e)


class RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_runs_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "code-ran"
    payload = RunsCode()
    payload.marker = marker
    path = tmp_path / "evil.bin"
    torch.save({"image_proj": {"proj.weight": payload}}, str(path))
    with pytest.raises(AdapterFileError, match=r"evil.bin was refused: it is a pickle that asks to run code"):
        load_adapter(str(path))
    assert not marker.exists()


def test_plain_pickle_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "code-ran"
    payload = RunsCode()
    payload.marker = marker
    path = tmp_path / "evil_plain.bin"
    with open(path, "wb") as f:
        pickle.dump(payload, f)
    with pytest.raises(AdapterFileError, match="evil_plain.bin"):
        load_adapter(str(path))
    assert not marker.exists()


def test_missing_file_is_refused(tmp_path):
    with pytest.raises(AdapterFileError, match="adapter file not found"):
        load_adapter(str(tmp_path / "nope.safetensors"))


def test_non_tensor_entry_is_refused(tmp_path):
    path = tmp_path / "odd.bin"
    torch.save({"image_proj": {"proj.weight": [1, 2, 3]}, "ip_adapter": {}}, str(path))
    with pytest.raises(AdapterFileError, match="odd.bin: entry 'image_proj.proj.weight' is a list"):
        load_adapter(str(path))


def test_bin_round_trip_through_save_adapter_bin(tmp_path, base):
    path = tmp_path / "rt.bin"
    save_adapter_bin(base.state_dict(), str(path))
    assert torch.equal(load_adapter(str(path)).state_dict()["image_proj.proj.weight"],
                       base.state_dict()["image_proj.proj.weight"])
