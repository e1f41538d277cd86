"""Training data and checkpoints in the core alone: the official dataset format, the transforms, the order the
headless loader reads in (it must be the trainer's), encoding the dataset once, and adapter-only checkpoints."""
import json

import pytest
import torch
from PIL import Image

from ipadapter_core import AdapterFileError, load_adapter
from ipadapter_core.train_batches import EncodedExamples, dataset_indices, rank_positions
from ipadapter_core.train_checkpoints import (latest_checkpoint, list_checkpoints, load_checkpoint,
                                              prune_checkpoints, save_checkpoint)
from ipadapter_core.train_data import (ImageTextDataset, ScheduledBatches, TrainingDataError, captions_for,
                                       encode_dataset, read_dataset, resize_and_center_crop)
from ipadapter_core.training import AdapterTrainer, TrainingSettings, init_adapter, new_adapter_spec

from .test_training_fakes import FakeCrossAttentionUNet, fake_dropped, fake_examples, sd15_alphas_cumprod, unet_call


@pytest.fixture
def data_dir(tmp_path):
    (tmp_path / "img").mkdir()
    for i, size in enumerate([(30, 20), (16, 16)]):
        Image.new("RGB", size, (40 * i, 100, 200)).save(tmp_path / "img" / f"{i}.png")
    items = [{"image_file": "img/0.png", "text": "first"}, {"image_file": "img/1.png", "text": "second"}]
    (tmp_path / "data.json").write_text(json.dumps(items))
    return tmp_path


def test_dataset_reads_the_official_json_format(data_dir):
    examples = read_dataset(str(data_dir / "data.json"), str(data_dir))
    assert [e.text for e in examples] == ["first", "second"]
    item = ImageTextDataset(examples, resolution=8)[0]
    assert item["target"].shape == (3, 8, 8) and item["reference"].shape == (224, 224, 3)
    assert item["index"] == 0 and item["text"] == "first"
    assert item["target"].min() >= 0 and item["target"].max() <= 1


@pytest.mark.parametrize("content, message", [
    ('{"image_file": "img/0.png"}', "non-empty JSON list"),
    ('[{"text": "no file"}]', "item 0"),
    ('[{"image_file": "img/missing.png", "text": ""}]', "missing.png"),
    ("not json", "cannot read"),
])
def test_a_bad_dataset_is_refused_naming_the_problem(data_dir, content, message):
    (data_dir / "bad.json").write_text(content)
    with pytest.raises(TrainingDataError, match=message):
        read_dataset(str(data_dir / "bad.json"), str(data_dir))


def test_resize_scales_the_short_side_and_crops_the_centre():
    image = torch.zeros(1, 3, 40, 80)
    image[..., 12:68] = 1.0  # bright around the centre half of the width, dark at both ends
    out = resize_and_center_crop(image, 20)
    assert out.shape == (1, 3, 20, 20)
    assert out.min() > 0.99, "the centre crop holds only the bright middle"


def test_captions_one_per_image_or_one_for_all():
    assert captions_for("", 3) == ["", "", ""]
    assert captions_for("a cat\n", 2) == ["a cat", "a cat"]
    assert captions_for("a\nb\n", 2) == ["a", "b"]
    with pytest.raises(ValueError, match="3 lines for 2 images"):
        captions_for("a\nb\nc", 2)


def test_loader_batches_are_the_trainers_micro_batches():
    sampler = ScheduledBatches(seed=4, count=5, samples_seen=6, batch_size=2, micro_batches=3, world_size=2, rank=1)
    expected = [dataset_indices(4, rank_positions(6 + k * 4, 2, 2, 1), 5) for k in range(3)]
    assert list(sampler) == expected and len(sampler) == 3


def test_encoding_the_dataset_keeps_dataset_order():
    class Numbers(torch.utils.data.Dataset):
        def __len__(self):
            return 5

        def __getitem__(self, i):
            return {"index": i, "value": torch.tensor([float(i)])}

    def encode(batch):
        n = batch["value"].shape[0]
        return EncodedExamples(batch["value"].reshape(n, 1, 1, 1), batch["value"], batch["value"].reshape(n, 1, 1))

    out = encode_dataset(Numbers(), encode, batch_size=2)
    assert out.image_embeds.flatten().tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]


def small_trainer(seed=0):
    unet = FakeCrossAttentionUNet(seed=0).requires_grad_(False)
    return AdapterTrainer(init_adapter(new_adapter_spec("sd15"), unet.text_kv(), seed), unet_call(unet),
                          num_examples=4, dropped=fake_dropped(), alphas_cumprod=sd15_alphas_cumprod(),
                          latent_scale=0.18215, settings=TrainingSettings(batch_size=1))


def test_checkpoints_round_trip_and_keep_only_the_newest(tmp_path):
    trainer = small_trainer()
    for _ in range(3):
        trainer.train_step(fake_examples(4).select)
        save_checkpoint(tmp_path, trainer.state_dict(), {"ipx_step": trainer.step})
    (tmp_path / ".step-00000009.partial").mkdir()  # a checkpoint whose writing was interrupted is never used
    assert latest_checkpoint(tmp_path).name == "step-00000003"
    state = load_checkpoint(latest_checkpoint(tmp_path))
    assert state["step"] == 3 and state["samples_seen"] == 3
    assert all(torch.equal(state["adapter"][k], v) for k, v in trainer.adapter.state_dict().items())
    assert load_adapter(str(latest_checkpoint(tmp_path) / "ip_adapter.safetensors")).spec.variant == "sd15"
    prune_checkpoints(tmp_path, keep=1)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000003"]


def test_a_corrupt_training_state_is_a_clear_error(tmp_path):
    path = save_checkpoint(tmp_path, small_trainer().state_dict())
    (path / "training_state.pt").write_bytes(b"not a torch file")
    with pytest.raises(AdapterFileError, match="training state"):
        load_checkpoint(path)
