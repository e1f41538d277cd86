"""Training data: the official dataset format (a JSON list of ``{"image_file", "text"}`` under a root folder), the
image transforms, the order a run reads the examples in, and the cache of what the frozen encoders made of them.

Targets are resized so that the short side is the resolution and centre-cropped (the official Resize + CenterCrop);
references are resized and centre-cropped to 224 with the very operations of the host's CLIP preprocessing (bicubic,
antialiased, same rounding of sizes and crop offsets), so that the encoder sees what it sees at inference.
"""
import json
import os
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from .errors import IPAdapterError
from .train_batches import EncodedExamples, dataset_indices, rank_positions

REFERENCE_SIZE = 224


class TrainingDataError(IPAdapterError):
    """The training data cannot be used: a malformed dataset file, missing or unreadable images."""


@dataclass(frozen=True)
class Example:
    image_file: str  # absolute path
    text: str


def read_dataset(json_path: str, root: str) -> list:
    """The examples of an official-format dataset file; every image must exist under ``root``."""
    try:
        with open(json_path, encoding="utf-8") as f:
            items = json.load(f)
    except (OSError, ValueError) as e:
        raise TrainingDataError(f"cannot read the dataset file {json_path}: {e}") from e
    if not isinstance(items, list) or not items:
        raise TrainingDataError(f"{json_path} must hold a non-empty JSON list of "
                                f'{{"image_file": ..., "text": ...}} objects')
    examples = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("image_file"), str) or \
                not isinstance(item.get("text", ""), str):
            raise TrainingDataError(f'{json_path}: item {i} must be an object with a string "image_file" and a '
                                    f'string "text", got {str(item)[:120]}')
        examples.append(Example(os.path.join(root, item["image_file"]), item.get("text", "")))
    missing = [e.image_file for e in examples if not os.path.isfile(e.image_file)]
    if missing:
        raise TrainingDataError(f"{len(missing)} image(s) of {json_path} are missing under {root}, e.g. "
                                f"{', '.join(missing[:3])}; check --data-root")
    return examples


def resize_and_center_crop(images: torch.Tensor, size: int, mode: str = "bilinear") -> torch.Tensor:
    """(b, c, h, w) images with the short side resized to ``size`` (antialiased) and centre-cropped to size x size."""
    height, width = images.shape[-2:]
    if (height, width) != (size, size):
        scale = size / min(height, width)
        images = F.interpolate(images, size=(round(scale * height), round(scale * width)), mode=mode, antialias=True)
    top, left = (images.shape[-2] - size) // 2, (images.shape[-1] - size) // 2
    return images[..., top:top + size, left:left + size]


def load_image(path: str) -> torch.Tensor:
    """An image file as a (3, h, w) float tensor in 0..1 (RGB)."""
    from PIL import Image
    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
            data = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8)
            return data.reshape(rgb.height, rgb.width, 3).permute(2, 0, 1).float() / 255.0
    except (OSError, Image.DecompressionBombError) as e:  # the latter: a pixel count PIL refuses to decode
        raise TrainingDataError(f"cannot read the image {path}: {e}") from e


def captions_for(captions: str, count: int) -> list:
    """One caption per image: a line per image, or one line for all (none: the empty prompt)."""
    lines = captions.rstrip().splitlines() if captions.strip() else [""]
    if len(lines) == 1:
        return lines * count
    if len(lines) != count:
        raise ValueError(f"captions has {len(lines)} lines for {count} images: give one line per image, in the "
                         f"batch's order, or a single line for all of them")
    return lines


class ImageTextDataset(torch.utils.data.Dataset):
    """Item i: ``index``, ``target`` (3, resolution, resolution) in 0..1, ``reference`` (224, 224, 3) in 0..1 (the
    host's IMAGE layout), ``text``."""

    def __init__(self, examples: list, resolution: int):
        self.examples = examples
        self.resolution = resolution

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, index: int) -> dict:
        example = self.examples[index]
        image = load_image(example.image_file)[None]
        target = resize_and_center_crop(image, self.resolution, "bilinear")[0].clamp(0, 1)
        reference = resize_and_center_crop(image, REFERENCE_SIZE, "bicubic")[0].permute(1, 2, 0)
        return {"index": index, "target": target.contiguous(), "reference": reference.contiguous(),
                "text": example.text}


class ScheduledBatches(torch.utils.data.Sampler):
    """A batch sampler yielding this process's micro-batches in the order AdapterTrainer.train_step reads them,
    starting after ``samples_seen`` samples (so a resumed run reads on where it stopped)."""

    def __init__(self, seed: int, count: int, samples_seen: int, batch_size: int, micro_batches: int,
                 world_size: int = 1, rank: int = 0):
        self.seed, self.count, self.samples_seen = seed, count, samples_seen
        self.batch_size, self.micro_batches, self.world_size, self.rank = batch_size, micro_batches, world_size, rank

    def __len__(self):
        return self.micro_batches

    def __iter__(self):
        global_batch = self.batch_size * self.world_size
        for k in range(self.micro_batches):
            positions = rank_positions(self.samples_seen + k * global_batch, self.batch_size, self.world_size,
                                       self.rank)
            yield dataset_indices(self.seed, positions, self.count)


def encode_dataset(dataset, encode, batch_size: int, rank: int = 0, world_size: int = 1, num_workers: int = 0,
                   group=None, progress=None) -> EncodedExamples:
    """Every example through the frozen encoders once: each process encodes every ``world_size``-th example, and
    the shards are exchanged (``group``: a process group able to send CPU objects, e.g. gloo) so that every process
    holds the whole dataset's encodings, in dataset order, on the CPU. ``encode(batch) -> EncodedExamples``."""
    shard = list(range(rank, len(dataset), world_size))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, shard), batch_size=batch_size,
                                         num_workers=num_workers)
    parts = []
    for batch in loader:
        parts.append(encode(batch).to("cpu"))
        if progress is not None:
            progress(len(batch["index"]))
    local = EncodedExamples.cat(parts)
    if world_size == 1:
        return local
    shards = [None] * world_size
    torch.distributed.all_gather_object(shards, (shard, local), group=group)
    order = torch.tensor([i for indices, _ in shards for i in indices])
    gathered = EncodedExamples.cat(part for _, part in shards)
    return gathered.select(torch.argsort(order).tolist())
