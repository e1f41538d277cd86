"""IPX Train IP-Adapter and IPX Save IP-Adapter: training an adapter on the host's own models, through the same
cross-attention patch the apply nodes install, and writing it in the official layout. The host-facing pieces
(reading the UNet's text keys/values, calling it, running the frozen encoders) are shared with scripts/train.py."""
import logging
import os
import types

import torch

import comfy.clip_vision
import comfy.ldm.modules.attention
import comfy.model_management
import comfy.model_sampling
import comfy.model_patcher
import comfy.ops
import comfy.utils
import folder_paths
from comfy_api.latest import io

from ..ipadapter_core import adapter_from_state_dict
from ..ipadapter_core.embeds import check_encoder_width
from ..ipadapter_core.errors import ModelMismatchError
from ..ipadapter_core.files import save_adapter_safetensors
from ..ipadapter_core.train_batches import DroppedInputs, DropRates, EncodedExamples, alphas_cumprod_from_sigmas
from ..ipadapter_core.train_data import captions_for, resize_and_center_crop
from ..ipadapter_core.train_unet import frozen_unet, text_kv_weights, unet_call
from ..ipadapter_core.training import (TRAINABLE_VARIANTS, AdapterTrainer, TrainingSettings, adapter_from_start,
                                       init_adapter, new_adapter_spec)
from ..ipadapter_core.variants import IMAGE_EMBEDS, PENULTIMATE, UNCOND_ZERO_PIXELS
from .applying import check_model, host_image_attention, host_text_attention
from .encoding import check_image, encoder_widths, zero_pixels_output
from .paths import FOLDER
from .types import CATEGORY, AdapterSocket, LoadedAdapter

log = logging.getLogger(__name__)
CONTEXT_TOKENS = 77  # the official text encoder truncates prompts to 77 tokens
PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
CONTEXT_MEMO = 256  # captions whose encodings are remembered (a dataset's repeated captions; the empty prompt)
NO_BACKWARD_ATTENTION = ("attention_sage", "attention_flash")  # host backends without a backward pass


# --- the host's models, as training uses them --------------------------------------------------------------------------

def compute_dtype(precision: str, device: torch.device) -> torch.dtype:
    """'auto': bf16 on a GPU that has it, else fp16 on a GPU; fp32 elsewhere."""
    if precision == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be auto, {', '.join(PRECISIONS)}; got {precision!r}")
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("fp16 training needs a CUDA GPU (it uses a gradient scaler); use fp32 or bf16 on the CPU")
    return PRECISIONS[precision]


def schedule(model_patcher):
    """(alphas_cumprod, latent scale) of the host model, which must predict the noise (epsilon) on SD1.5's 1000
    discrete steps, as the official training assumes."""
    sampling = model_patcher.get_model_object("model_sampling")
    eps = type(sampling).calculate_denoised is comfy.model_sampling.EPS.calculate_denoised
    discrete = isinstance(sampling, comfy.model_sampling.ModelSamplingDiscrete)  # these always hold sigmas
    steps = sampling.sigmas.shape[0] if discrete else None
    if not eps or steps != 1000:
        raise ModelMismatchError(
            f"the model's sampling is {type(sampling).__name__} ({steps or 'no'} discrete sigmas); "
            f"IP-Adapter training predicts the noise (epsilon) on SD1.5's 1000 discrete timesteps. Connect the SD1.5 "
            f"checkpoint's model without a ModelSamplingDiscrete (v-prediction, lcm, ...) or ModelSamplingContinuous "
            f"node in front")
    return alphas_cumprod_from_sigmas(sampling.sigmas.detach().cpu()), model_patcher.model.latent_format.scale_factor


def pytorch_attention(func, *args, **kwargs):
    """An attention override that runs PyTorch's attention, whatever backend the host was started with."""
    return comfy.ldm.modules.attention.attention_pytorch(*args, **kwargs)


def training_transformer_options(model_options: dict) -> dict:
    """The model's transformer options for training. Sage and flash attention (``--use-sage-attention``,
    ``--use-flash-attention``) have no backward pass, and an override another node installed may not either: then
    training runs the UNet's attention through PyTorch's, which does."""
    options = dict(model_options.get("transformer_options", {}))
    backend = getattr(comfy.ldm.modules.attention.optimized_attention, "__name__", "")
    if "optimized_attention_override" in options or backend in NO_BACKWARD_ATTENTION:
        log.warning("training runs attention through PyTorch's (the %s has no backward pass)",
                    "model's attention override" if "optimized_attention_override" in options else
                    f"host's {backend.replace('attention_', '')} attention")
        options["optimized_attention_override"] = pytorch_attention
    return options


def ensure_loaded(patcher) -> None:
    """Load a model through the host's memory management unless it is loaded already: asking again on every step
    would make the host re-check (and, below high-VRAM mode, empty) PyTorch's memory cache every time."""
    if patcher not in comfy.model_management.loaded_models():
        comfy.model_management.load_models_gpu([patcher])


class HostEncoders:
    """The frozen encoders, as the official script runs them: the VAE's posterior moments of the targets, the CLIP
    vision output the adapter reads for the references, and the text encoder's hidden states for the captions.
    Results are ``storage_dtype`` on ``output_device``: the CPU to cache them, the training device to use them at
    once (then nothing is copied back to the CPU and no step waits for the GPU)."""

    def __init__(self, vae, clip, clip_vision, spec, storage_dtype=torch.float32, output_device="cpu",
                 chunk: int = 8):
        self.vae, self.clip, self.clip_vision, self.spec = vae, clip, clip_vision, spec
        self.storage_dtype, self.output_device, self.chunk = storage_dtype, torch.device(output_device), chunk
        check_encoder_width(spec, spec.encoder_output, encoder_widths(clip_vision)[spec.encoder_output],
                            "the connected CLIP vision model")
        stage = getattr(vae, "first_stage_model", None)
        if not hasattr(stage, "encoder") or not hasattr(stage, "quant_conv"):
            raise ModelMismatchError("the VAE is not a KL autoencoder like SD1.5's (no encoder / quant_conv); connect "
                                     "the SD1.5 checkpoint's VAE")
        self._contexts = {}  # caption -> encoding, the CONTEXT_MEMO most recent (plus the empty prompt)

    def _out(self, tensor: torch.Tensor) -> torch.Tensor:
        # Never non-blocking into the CPU: such a copy may be read before it has landed.
        return tensor.to(self.output_device, self.storage_dtype, non_blocking=self.output_device.type != "cpu")

    @torch.no_grad()
    def latent_moments(self, targets: torch.Tensor) -> torch.Tensor:
        """(n, 3, h, w) images in 0..1 -> (n, 8, h/8, w/8) posterior mean and log-variance."""
        ensure_loaded(self.vae.patcher)
        stage = self.vae.first_stage_model
        parts = []
        for start in range(0, targets.shape[0], self.chunk):
            pixels = targets[start:start + self.chunk].to(self.vae.device, non_blocking=True)
            parts.append(self._out(stage.quant_conv(stage.encoder(self.vae.process_input(pixels).to(
                self.vae.vae_dtype)))))
        moments = torch.cat(parts)
        if moments.shape[1] != 8:
            raise ModelMismatchError(f"the VAE gives {moments.shape[1] // 2} latent channels; SD1.5's has 4")
        return moments

    @torch.no_grad()
    def image_embeds(self, references: torch.Tensor) -> torch.Tensor:
        """(n, h, w, c) images in 0..1 -> what the adapter reads from the encoder, one row per image. The host's
        ClipVisionModel.encode_image, but leaving the output on the device (encode_image moves it to the CPU)."""
        clip_vision = self.clip_vision
        ensure_loaded(clip_vision.patcher)
        pixels = comfy.clip_vision.clip_preprocess(
            check_image(references).to(clip_vision.load_device, non_blocking=True), size=clip_vision.image_size,
            mean=clip_vision.image_mean, std=clip_vision.image_std, crop=True)
        # On a GPU in the encoder's own dtype, as the official training runs it (encode_image runs it in float32).
        pixels = pixels.to(clip_vision.dtype if pixels.device.type == "cuda" else torch.float32)
        out = clip_vision.model(pixel_values=pixels, intermediate_output=-2)
        return self._out(out[1] if self.spec.encoder_output == PENULTIMATE else out[2])

    @torch.no_grad()
    def context(self, caption: str) -> torch.Tensor:
        context = self._contexts.pop(caption, None)
        if context is None:
            context = self._out(self._truncated(self.clip.encode_from_tokens(self.clip.tokenize(caption))))
        self._contexts[caption] = context  # most recent last
        if len(self._contexts) > CONTEXT_MEMO:
            oldest = next(c for c in self._contexts if c != "")
            del self._contexts[oldest]
        return context

    @staticmethod
    def _truncated(cond: torch.Tensor) -> torch.Tensor:
        if cond.shape[1] > CONTEXT_TOKENS:
            log.warning("a prompt of %d tokens was cut to the first %d, as the official training does",
                        cond.shape[1], CONTEXT_TOKENS)
        return cond[:, :CONTEXT_TOKENS]

    @torch.no_grad()
    def dropped(self) -> DroppedInputs:
        """The inputs of a dropped sample: zero image embeds (base) or the encoder's output for zero pixels (plus,
        full face), and the empty prompt."""
        if self.spec.uncond == UNCOND_ZERO_PIXELS:
            embeds = zero_pixels_output(self.clip_vision, self.spec.encoder_output, 1)
        else:
            width = encoder_widths(self.clip_vision)[IMAGE_EMBEDS]
            embeds = torch.zeros(1, width)
        return DroppedInputs(self._out(embeds), self.context(""))

    def encode(self, targets, references, captions) -> EncodedExamples:
        contexts = torch.cat([self.context(c) for c in captions])
        return EncodedExamples(self.latent_moments(targets), self.image_embeds(references), contexts)


def loaded_adapter(state_dict: dict, name: str) -> LoadedAdapter:
    """A trained state dict as IPX Load IP-Adapter would give it: manual-cast layers, beside the UNet."""
    module = adapter_from_state_dict({k: v.detach().cpu() for k, v in state_dict.items()}, name,
                                     operations=comfy.ops.manual_cast)
    patcher = comfy.model_patcher.ModelPatcher(module, load_device=comfy.model_management.get_torch_device(),
                                               offload_device=comfy.model_management.unet_offload_device())
    return LoadedAdapter(name=name, spec=module.spec, module=module, patcher=patcher)


# --- the training node -------------------------------------------------------------------------------------------------

def contexts_from_conditioning(conditioning, count: int) -> torch.Tensor:
    """Text contexts from CONDITIONING (one entry for all images, or one per image), cut to 77 tokens."""
    if len(conditioning) not in (1, count):
        raise ValueError(f"conditioning has {len(conditioning)} entries for {count} images: connect one prompt "
                         f"for all images or one per image (in the batch's order)")
    contexts = torch.cat([HostEncoders._truncated(entry[0][:1]).float().clone() for entry in conditioning])
    return contexts.expand(count, -1, -1) if contexts.shape[0] == 1 else contexts


def training_examples(encoders: HostEncoders, images, resolution: int, captions: str, conditioning, cache: bool):
    """fetch(indices) -> EncodedExamples for the node's images: all encoded once (cache) or on every request."""
    references = check_image(images)
    targets = resize_and_center_crop(references.movedim(-1, 1), resolution)
    count = references.shape[0]
    texts = captions_for(captions, count)
    contexts = None if conditioning is None else contexts_from_conditioning(conditioning, count)

    def encode(indices):
        indices = list(indices)
        examples = encoders.encode(targets[indices], references[indices], [texts[i] for i in indices])
        if contexts is not None:
            examples.contexts = contexts[indices].to(examples.contexts.dtype)
        return examples

    if not cache:
        return encode, count
    encoded = encode(range(count))
    return encoded.select, count


def train_adapter(model, clip, vae, clip_vision, images, captions: str, settings: TrainingSettings, steps: int,
                  variant: str = "sd15", resolution: int = 512, precision: str = "auto", cache: bool = True,
                  start: LoadedAdapter | None = None, conditioning=None):
    """Train an adapter on the host's models and images; returns (LoadedAdapter, [loss per step]). The input
    model, encoders and starting adapter are left as they were."""
    spec = start.spec if start is not None else new_adapter_spec(
        variant, encoder_widths(clip_vision)[IMAGE_EMBEDS if variant == "sd15" else PENULTIMATE])
    check_model(model, types.SimpleNamespace(name=start.name if start else f"the new {spec.variant} adapter"))
    device = comfy.model_management.get_torch_device()
    dtype = compute_dtype(precision, device)
    alphas_cumprod, latent_scale = schedule(model)
    trainer = unet = None
    try:
        with torch.inference_mode(False), torch.enable_grad():
            encoders = HostEncoders(vae, clip, clip_vision, spec, output_device="cpu" if cache else device)
            fetch, count = training_examples(encoders, images, resolution, captions, conditioning, cache)
            comfy.model_management.load_models_gpu([model])
            # A new adapter's to_k_ip / to_v_ip start from the model's own weights, before the copy is cast.
            adapter = adapter_from_start(start.module.state_dict(), start.name) if start is not None else \
                init_adapter(spec, text_kv_weights(model.model.diffusion_model), settings.seed)
            unet = frozen_unet(model.model.diffusion_model, dtype, device, copy_weights=True)
            trainer = AdapterTrainer(adapter, unet_call(unet), num_examples=count, dropped=encoders.dropped(),
                                     alphas_cumprod=alphas_cumprod, latent_scale=latent_scale, settings=settings,
                                     device=device, compute_dtype=dtype, attention=host_text_attention,
                                     image_attention=host_image_attention,
                                     base_options=training_transformer_options(model.model_options))
            progress = comfy.utils.ProgressBar(steps)
            for _ in range(steps):
                comfy.model_management.throw_exception_if_processing_interrupted()
                trainer.train_step(fetch)
                progress.update(1)
            losses = trainer.loss_history()
            name = f"trained {spec.variant} ({steps} steps)"
            trained = loaded_adapter(trainer.adapter.state_dict(), name)
    finally:  # interrupted or not, the UNet copy, the adapter being trained and the optimiser state leave the GPU now
        trainer = unet = adapter = None  # (also from this frame, which an exception's traceback keeps)
        comfy.model_management.soft_empty_cache()
    log.info("%s: loss %.4f -> %.4f", name, losses[0], losses[-1])
    return trained, losses


class TrainAdapter(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="IPXTrainAdapter",
            display_name="IPX Train IP-Adapter",
            category=CATEGORY,
            description="Trains an SD1.5 IP-Adapter on the images, as the official tutorial_train.py does: the model, "
                        "VAE and encoders stay frozen; the image projection and every cross-attention layer's "
                        "to_k_ip / to_v_ip train (a new adapter's start as copies of the layer's to_k / to_v), on the "
                        "noise-prediction MSE at uniform random timesteps, with AdamW. Each image is its own image "
                        "prompt. The result plugs into IPX Apply IP-Adapter and IPX Save IP-Adapter; the loss into "
                        "Plot Loss Graph.",
            inputs=[
                io.Model.Input("model", tooltip="The SD1.5 model to train against (frozen; not modified)."),
                io.Clip.Input("clip", tooltip="The model's text encoder: encodes the captions and the empty prompt "
                                              "of text-dropped samples."),
                io.Vae.Input("vae", tooltip="The model's VAE: encodes the images into the latents the model learns "
                                            "to denoise (a sample of its posterior, drawn each step)."),
                io.ClipVision.Input("clip_vision", tooltip="CLIP vision encoder the adapter reads (ViT-H/14 for "
                                                           "SD1.5 adapters); each image is also its own reference."),
                io.Image.Input("images", tooltip="The training images (one batch). Each is resized so its short side "
                                                 "is the resolution and centre-cropped."),
                io.String.Input("captions", multiline=True, default="",
                                tooltip="One caption per line, one line per image in batch order, or a single line "
                                        "for all images; empty = no text. Ignored when conditioning is connected."),
                io.Int.Input("steps", default=100, min=1, max=1000000,
                             tooltip="Optimiser steps. Each consumes batch_size * grad_accumulation samples."),
                io.Int.Input("batch_size", default=8, min=1, max=256,
                             tooltip="Samples per micro-batch (official: 8). Images repeat when there are fewer."),
                io.Int.Input("grad_accumulation", default=1, min=1, max=1024,
                             tooltip="Micro-batches whose gradients are summed before each optimiser step."),
                io.Float.Input("learning_rate", default=1e-4, min=1e-7, max=1.0, step=1e-6, round=False,
                               tooltip="AdamW learning rate (official: 1e-4)."),
                io.Float.Input("weight_decay", default=1e-2, min=0.0, max=1.0, step=1e-3, round=False,
                               tooltip="AdamW weight decay (official: 1e-2)."),
                io.Float.Input("image_drop", default=0.05, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of samples whose image prompt is dropped (base: zero embeds; "
                                       "plus: zero pixels through the encoder). Teaches the uncond."),
                io.Float.Input("text_drop", default=0.05, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of samples whose text is dropped (the empty prompt)."),
                io.Float.Input("both_drop", default=0.05, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of samples with both dropped. The three fractions sum to <= 1."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seeds the new projection's weights, the data order, noise, timesteps and "
                                     "drops: the same seed and inputs give the same adapter."),
                io.Combo.Input("variant", options=list(TRAINABLE_VARIANTS), default="sd15",
                               tooltip="sd15: base adapter (4 tokens from the image embeds). plus: Resampler (16 "
                                       "tokens from the penultimate hidden states). Ignored when a starting adapter "
                                       "is connected: its variant is trained."),
                io.Int.Input("resolution", default=512, min=64, max=2048, step=64,
                             tooltip="Side of the square training crops in pixels (official: 512)."),
                io.Combo.Input("precision", options=["auto", *PRECISIONS], default="auto",
                               tooltip="Compute dtype of the frozen model. auto: bf16 on GPUs that have it, else "
                                       "fp16 (with loss scaling); fp32 on the CPU. The adapter and AdamW stay fp32."),
                io.Boolean.Input("cache_encodings", default=True,
                                 tooltip="Encode every image once (VAE posterior, CLIP vision, text) before training "
                                         "instead of on every step: same result, much faster."),
                AdapterSocket.Input("start_adapter", optional=True,
                                    tooltip="Optional: an adapter (IPX Load IP-Adapter) to continue training from; "
                                            "it is copied, not modified. Without it a new adapter is made."),
                io.Conditioning.Input("conditioning", optional=True,
                                      tooltip="Optional: text conditioning (one entry for all images or one per "
                                              "image) used instead of the captions."),
            ],
            outputs=[AdapterSocket.Output(display_name="adapter", tooltip="The trained adapter, ready for IPX Apply "
                                                                          "IP-Adapter and IPX Save IP-Adapter."),
                     io.LossMap.Output(display_name="loss", tooltip="The loss of every step, for Plot Loss Graph.")],
        )

    @classmethod
    def execute(cls, model, clip, vae, clip_vision, images, captions, steps, batch_size, grad_accumulation,
                learning_rate, weight_decay, image_drop, text_drop, both_drop, seed, variant, resolution, precision,
                cache_encodings, start_adapter=None, conditioning=None):
        settings = TrainingSettings(learning_rate=learning_rate, weight_decay=weight_decay, batch_size=batch_size,
                                    grad_accumulation=grad_accumulation, drops=DropRates(image_drop, text_drop,
                                                                                         both_drop), seed=seed)
        adapter, losses = train_adapter(model, clip, vae, clip_vision, images, captions, settings, steps, variant,
                                        resolution, precision, cache_encodings, start_adapter, conditioning)
        return io.NodeOutput(adapter, {"loss": losses})


def save_trained_adapter(adapter: LoadedAdapter, filename_prefix: str, dtype: str = "fp16") -> str:
    """Write the adapter in the official flat layout as <prefix>_NNNNN_.safetensors in the first ipadapter folder
    (models/ipadapter, or the one extra_model_paths.yaml puts first); returns the name IPX Load IP-Adapter lists it
    under."""
    folder = folder_paths.get_folder_paths(FOLDER)[0]
    os.makedirs(folder, exist_ok=True)
    full_folder, filename, counter, subfolder, _ = folder_paths.get_save_image_path(filename_prefix, folder)
    os.makedirs(full_folder, exist_ok=True)
    name = f"{filename}_{counter:05}_.safetensors"
    state_dict = {k: v.to(PRECISIONS[dtype]) for k, v in adapter.module.state_dict().items()}
    save_adapter_safetensors(state_dict, os.path.join(full_folder, name),
                             {"ipx_variant": adapter.spec.variant, "ipx_source": adapter.name})
    log.info("saved %s to %s", adapter.name, os.path.join(full_folder, name))
    return os.path.join(subfolder, name) if subfolder else name


class SaveAdapter(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="IPXSaveAdapter",
            display_name="IPX Save IP-Adapter",
            category=CATEGORY,
            description="Saves an adapter to models/ipadapter as .safetensors in the official layout (image_proj.*, "
                        "ip_adapter.N.to_k_ip / to_v_ip), loadable by IPX Load IP-Adapter and by diffusers' "
                        "load_ip_adapter. Existing files are never overwritten: a counter is appended.",
            inputs=[AdapterSocket.Input("adapter", tooltip="The adapter to save, e.g. from IPX Train IP-Adapter."),
                    io.String.Input("filename_prefix", default="ipx_trained",
                                    tooltip="File name start, under models/ipadapter; may hold sub-folders "
                                            "(e.g. 'mine/style'). '_00001_.safetensors' and up is appended."),
                    io.Combo.Input("dtype", options=["fp16", "fp32"], default="fp16",
                                   tooltip="Precision of the saved weights; the official files are fp16.")],
            outputs=[io.String.Output(display_name="adapter_name",
                                      tooltip="The saved file's name as IPX Load IP-Adapter lists it.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, adapter, filename_prefix, dtype):
        return io.NodeOutput(save_trained_adapter(adapter, filename_prefix, dtype))


NODES = [TrainAdapter, SaveAdapter]
