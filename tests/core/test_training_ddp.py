"""Several processes (torch.distributed, gloo on the CPU, DistributedDataParallel over the adapter) train the same
adapter as one process with the combined batch."""
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ipadapter_core.training import AdapterTrainer, TrainingSettings, init_adapter, new_adapter_spec

from .test_training_fakes import (FakeCrossAttentionUNet, assert_same_training, fake_dropped, fake_examples,
                                  sd15_alphas_cumprod, unet_call)

STEPS = 2
WORLD = 2
PER_PROCESS = 1


def train(rank: int, world_size: int, batch_size: int, adapter_seed: int) -> dict:
    torch.set_num_threads(1)
    unet = FakeCrossAttentionUNet(seed=0).requires_grad_(False)
    examples = fake_examples(4)
    trainer = AdapterTrainer(init_adapter(new_adapter_spec("sd15"), unet.text_kv(), seed=adapter_seed),
                             unet_call(unet), num_examples=len(examples), dropped=fake_dropped(),
                             alphas_cumprod=sd15_alphas_cumprod(), latent_scale=0.18215,
                             settings=TrainingSettings(batch_size=batch_size, seed=5), rank=rank,
                             world_size=world_size)
    for _ in range(STEPS):
        trainer.train_step(examples.select)
    return trainer.state_dict()


def _worker(rank: int, store: str, out: str):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        # Each process initialises its adapter differently: DDP must start every process from rank 0's weights.
        state = train(rank, WORLD, PER_PROCESS, adapter_seed=1 + rank)
        torch.save(state, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_train_as_one_process_with_the_combined_batch(tmp_path):
    out = str(tmp_path / "state")
    mp.spawn(_worker, args=(str(tmp_path / "store"), out), nprocs=WORLD, join=True)
    ranks = [torch.load(f"{out}.{rank}", weights_only=True) for rank in range(WORLD)]
    for key, value in ranks[0]["adapter"].items():
        assert torch.equal(ranks[1]["adapter"][key], value), f"{key}: the processes ended with different adapters"
    single = train(0, 1, WORLD * PER_PROCESS, adapter_seed=1)
    assert ranks[0]["samples_seen"] == single["samples_seen"] == STEPS * WORLD * PER_PROCESS
    assert_same_training(single, ranks[0], TrainingSettings().learning_rate, STEPS)
