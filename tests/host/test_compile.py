"""torch.compile friendliness, in the real host: the UNet compiled through the host's own compile wrapper (as its
TorchCompileModel node does), sampled for several steps and twice over, with PyTorch's attention (the host's default
on a GPU). A backend that runs each captured graph as it is counts the graphs; Dynamo's counters give the graph
breaks. The plain model is one graph without a break; the patch must add no break and no graph: the image keys and
values and the resized masks are computed before each UNet call (outside the compiled UNet), which only reads them."""
import pytest
import torch

from .sampling import sigma_at
from .test_patching import base_embeds, pack_module

TIMESTEPS = (900, 600, 300, 100)


@pytest.fixture(scope="module")
def api(host, adapter_dir):
    applying = pack_module(host, "IPXApplyAdapter")
    return dict(load=pack_module(host, "IPXLoadAdapter").load_adapter_file, apply=applying.apply_adapter,
                ImageEmbeds=pack_module(host, "IPXApplyAdapter", "ipadapter_core.embeds").ImageEmbeds)


@pytest.fixture
def pytorch_attention(monkeypatch):
    import comfy.ldm.modules.attention as attention
    monkeypatch.setattr(attention, "optimized_attention", attention.attention_pytorch)
    monkeypatch.setattr(attention, "optimized_attention_masked", attention.attention_pytorch)


def compiled_runs(model, host_sd15, runs: int = 2, reset: bool = True) -> dict:
    """Sample ``runs`` times (euler, 4 steps, cfg 7, batched cond/uncond) with the UNet compiled; the graphs
    captured (their sizes, and whether each has symbolic shapes), the graph breaks and the outputs. ``reset``: start
    from a fresh Dynamo; without it the graphs of earlier calls stay on the UNet's code, as when a workflow samples
    several models that share one compiled UNet."""
    import comfy.sample
    import comfy.samplers
    import torch._dynamo
    from comfy_api.torch_helpers import set_torch_compile_wrapper
    from torch._dynamo.utils import counters
    if reset:
        torch._dynamo.reset()
    counters.clear()
    graphs, dynamic = [], []

    def counting_backend(graph_module, example_inputs):
        graphs.append(len(graph_module.graph.nodes))
        dynamic.append(any(isinstance(x, torch.SymInt) for x in example_inputs))
        return graph_module.forward

    compiled = model.clone()
    set_torch_compile_wrapper(compiled, backend=counting_backend)
    g = torch.Generator().manual_seed(5)
    noise, cond, uncond = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 768, generator=g), \
        torch.randn(1, 77, 768, generator=g)
    sigmas = torch.tensor([sigma_at(host_sd15, t) for t in TIMESTEPS] + [0.0])
    outputs = []
    for _ in range(runs):  # each run gets its own sigmas tensor, as the host's KSampler computes them per run
        with torch.inference_mode():
            outputs.append(comfy.sample.sample_custom(compiled, noise, 7.0, comfy.samplers.ksampler("euler"),
                                                      sigmas.clone(),
                                                      [[cond, {}]], [[uncond, {}]], torch.zeros_like(noise)))
    breaks = dict(counters["graph_break"])
    with torch.inference_mode():
        eager = comfy.sample.sample_custom(model, noise, 7.0, comfy.samplers.ksampler("euler"), sigmas, [[cond, {}]],
                                           [[uncond, {}]], torch.zeros_like(noise))
    print(f"graphs {graphs} breaks {sum(breaks.values())}")
    return dict(graphs=graphs, dynamic=dynamic, breaks=breaks, outputs=outputs, eager=eager)


@pytest.fixture(scope="module")
def plain_compiled(host_sd15):
    import comfy.ldm.modules.attention as attention
    saved = attention.optimized_attention, attention.optimized_attention_masked
    attention.optimized_attention = attention.optimized_attention_masked = attention.attention_pytorch
    try:
        return compiled_runs(host_sd15, host_sd15)
    finally:
        attention.optimized_attention, attention.optimized_attention_masked = saved


def configurations(api, host_sd15):
    embeds = base_embeds(api, torch.randn(1, 1024, generator=torch.Generator().manual_seed(6)))
    base = api["load"]("ip-adapter_sd15.safetensors")
    plus = api["load"]("ip-adapter-plus_sd15.safetensors")
    plus_embeds = api["ImageEmbeds"](torch.randn(1, 257, 1280), torch.randn(1, 257, 1280),
                                     "penultimate_hidden_states", "zero_pixels")
    yield "sd15", api["apply"](host_sd15, base, embeds, 0.8)
    stacked = api["apply"](host_sd15, base, embeds, 0.7, 0.1, 0.9, mask=torch.rand(1, 64, 48),
                           step_weights="0:1, 0.5:0.5, 1:0")
    yield "masked, scheduled, start/end, stacked with plus", api["apply"](stacked, plus, plus_embeds, 0.5,
                                                                          weight_type="style transfer")


def test_the_plain_model_is_one_graph_without_breaks(plain_compiled):
    assert len(plain_compiled["graphs"]) == 1 and not plain_compiled["breaks"], plain_compiled


def test_the_patch_adds_no_graph_break_and_no_graph(api, host_sd15, plain_compiled, pytorch_attention):
    for name, model in configurations(api, host_sd15):
        result = compiled_runs(model, host_sd15)
        assert not result["breaks"], f"{name}: graph breaks {result['breaks']}"
        assert len(result["graphs"]) == 1, f"{name}: {len(result['graphs'])} graphs, of sizes {result['graphs']}"
        assert result["graphs"][0] > plain_compiled["graphs"][0], f"{name}: graph sizes {result['graphs']}"
        assert torch.equal(result["outputs"][0], result["outputs"][1]), f"{name}: the second run differs"
        torch.testing.assert_close(result["outputs"][0], result["eager"], rtol=1e-5, atol=1e-5, msg=name)
        assert not torch.equal(result["outputs"][0], plain_compiled["outputs"][0]), f"{name}: no effect"


def test_adapters_of_other_token_counts_get_graphs_of_their_own(api, host_sd15, pytorch_attention):
    """A base adapter (4 image tokens) and then a plus adapter (16) on the same compiled UNet: Dynamo would make the
    token count a symbolic size in a graph for both (its automatic dynamic shapes), whose generated code costs the
    CPU far more per step (1.5x the step time at batch 1 on an H100). The image keys and values are marked static,
    so the plus adapter gets a graph of its own, with fixed sizes, as the base adapter has."""
    embeds = base_embeds(api, torch.randn(1, 1024, generator=torch.Generator().manual_seed(6)))
    plus_embeds = api["ImageEmbeds"](torch.randn(1, 257, 1280), torch.randn(1, 257, 1280),
                                     "penultimate_hidden_states", "zero_pixels")
    base_model = api["apply"](host_sd15, api["load"]("ip-adapter_sd15.safetensors"), embeds, 0.8)
    plus_model = api["apply"](host_sd15, api["load"]("ip-adapter-plus_sd15.safetensors"), plus_embeds, 0.8)
    first = compiled_runs(base_model, host_sd15, runs=1)
    second = compiled_runs(plus_model, host_sd15, runs=1, reset=False)
    assert first["dynamic"] == [False] and second["dynamic"] == [False], (first["dynamic"], second["dynamic"])
    torch.testing.assert_close(second["outputs"][0], second["eager"], rtol=1e-5, atol=1e-5)
