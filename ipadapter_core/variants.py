"""Which IP-Adapter a state dict holds, read from tensor shapes alone (never from the file name)."""
from dataclasses import dataclass

from .errors import UnsupportedAdapterError
from .layers import BY_LAYER_INDEX, SD15_CROSS_ATTENTION_DIM, SD15_LAYER_INDICES

# What the adapter reads from the CLIP vision encoder.
IMAGE_EMBEDS = "image_embeds"                        # pooled, projected embedding: (n, projection_dim)
PENULTIMATE = "penultimate_hidden_states"            # second-to-last hidden states: (n, 257, hidden_size)

# How the unconditional image prompt is made, as each variant was trained.
UNCOND_ZERO_EMBEDS = "zero_embeds"                   # image_proj(zeros_like(image_embeds))
UNCOND_ZERO_PIXELS = "zero_pixels"                   # encoder run on zeros in normalised pixel space

# CLIP vision encoders by the widths they output (projection_dim, hidden_size).
ENCODER_NAMES = {
    (IMAGE_EMBEDS, 1024): "CLIP ViT-H/14 (image embeds 1024)",
    (IMAGE_EMBEDS, 1280): "CLIP ViT-bigG/14 (image embeds 1280)",
    (IMAGE_EMBEDS, 768): "CLIP ViT-L/14 (image embeds 768)",
    (PENULTIMATE, 1280): "CLIP ViT-H/14 (hidden states 1280)",
    (PENULTIMATE, 1664): "CLIP ViT-bigG/14 (hidden states 1664)",
    (PENULTIMATE, 1024): "CLIP ViT-L/14 (hidden states 1024)",
}


def encoder_name(output: str, width: int) -> str:
    return ENCODER_NAMES.get((output, width), f"an encoder with {output} of width {width}")


@dataclass(frozen=True)
class AdapterSpec:
    variant: str                 # "sd15", "sd15_vit-G", "plus", "full_face"
    image_proj: str              # "linear", "resampler", "mlp"
    tokens: int | None           # image tokens per reference image; None = one per encoder token (full face)
    cross_attention_dim: int     # width of the tokens fed to to_k_ip / to_v_ip (768 on SD1.5)
    encoder_output: str          # IMAGE_EMBEDS or PENULTIMATE
    encoder_width: int           # width of that encoder output
    uncond: str                  # UNCOND_ZERO_EMBEDS or UNCOND_ZERO_PIXELS
    layer_indices: tuple = SD15_LAYER_INDICES
    resampler_depth: int = 0
    resampler_heads: int = 0

    @property
    def encoder(self) -> str:
        return encoder_name(self.encoder_output, self.encoder_width)

    def describe(self) -> str:
        tokens = f"{self.tokens} tokens" if self.tokens else "one token per encoder token"
        return (f"IP-Adapter {self.variant} ({self.image_proj} projection, {tokens}, cross-attention "
                f"{self.cross_attention_dim}, needs {self.encoder})")


RESAMPLER_DIM_HEAD = 64  # every official Resampler uses 64-wide heads


def _shape(sd, key):
    return tuple(sd[key].shape)


def _refuse_other_families(sd: dict, source: str) -> None:
    keys = sd.keys()
    if any("lora" in k for k in keys) or any(k.startswith("image_proj.perceiver_resampler") for k in keys):
        raise UnsupportedAdapterError(f"{source} is an IP-Adapter FaceID model (LoRA layers / InsightFace projection); "
                                      f"this pack does not apply FaceID adapters yet")
    if "image_proj.proj.0.weight" in keys and "image_proj.norm.weight" in keys:
        raise UnsupportedAdapterError(f"{source} is an IP-Adapter FaceID model (projection of 512-wide InsightFace "
                                      f"embeddings); this pack does not apply FaceID adapters yet")
    k_widths = {tuple(v.shape)[1] for k, v in sd.items() if k.endswith(".to_k_ip.weight")}
    if 2048 in k_widths:
        raise UnsupportedAdapterError(f"{source} is an SDXL adapter (cross-attention width 2048); the model this pack "
                                      f"patches is SD1.5 (768). Use an *_sd15 adapter file")
    if k_widths and k_widths != {SD15_CROSS_ATTENTION_DIM}:
        raise UnsupportedAdapterError(f"{source} has to_k_ip layers of input width {sorted(k_widths)}; SD1.5 adapters "
                                      f"have {SD15_CROSS_ATTENTION_DIM}. Use an *_sd15 adapter file")


def _image_proj_spec(sd: dict, source: str) -> dict:
    keys = sd.keys()
    if "image_proj.latents" in keys:
        _, tokens, dim = _shape(sd, "image_proj.latents")
        depth = 1 + max(int(k.split(".")[2]) for k in keys if k.startswith("image_proj.layers."))
        inner = _shape(sd, "image_proj.layers.0.0.to_q.weight")[0]
        return dict(variant="plus", image_proj="resampler", tokens=tokens,
                    cross_attention_dim=_shape(sd, "image_proj.proj_out.weight")[0],
                    encoder_output=PENULTIMATE, encoder_width=_shape(sd, "image_proj.proj_in.weight")[1],
                    uncond=UNCOND_ZERO_PIXELS, resampler_depth=depth, resampler_heads=inner // RESAMPLER_DIM_HEAD)
    if "image_proj.proj.3.weight" in keys and "image_proj.proj.0.weight" in keys:
        return dict(variant="full_face", image_proj="mlp", tokens=None,
                    cross_attention_dim=_shape(sd, "image_proj.proj.3.weight")[0],
                    encoder_output=PENULTIMATE, encoder_width=_shape(sd, "image_proj.proj.0.weight")[1],
                    uncond=UNCOND_ZERO_PIXELS)
    if "image_proj.proj.weight" in keys and "image_proj.norm.weight" in keys:
        dim = _shape(sd, "image_proj.norm.weight")[0]
        out_features, width = _shape(sd, "image_proj.proj.weight")
        if out_features % dim:
            raise UnsupportedAdapterError(f"{source}: image_proj.proj has {out_features} outputs, not a multiple of "
                                          f"the token width {dim}")
        return dict(variant="sd15" if width != 1280 else "sd15_vit-G", image_proj="linear", tokens=out_features // dim,
                    cross_attention_dim=dim, encoder_output=IMAGE_EMBEDS, encoder_width=width,
                    uncond=UNCOND_ZERO_EMBEDS)
    found = sorted({k.split(".")[1] for k in keys if k.startswith("image_proj.")})
    raise UnsupportedAdapterError(f"{source}: unknown image projection (image_proj keys: {found or 'none'}); expected "
                                  f"the Linear+LayerNorm, Resampler or MLP projection of an official IP-Adapter")


def _check_layers(sd: dict, cross_dim: int, source: str) -> None:
    indices = {int(k.split(".")[1]) for k in sd if k.startswith("ip_adapter.")}
    if indices != set(SD15_LAYER_INDICES):
        missing = sorted(set(SD15_LAYER_INDICES) - indices)
        extra = sorted(indices - set(SD15_LAYER_INDICES))
        raise UnsupportedAdapterError(f"{source}: ip_adapter layers do not match SD1.5's 16 cross-attention layers "
                                      f"(missing {missing}, unexpected {extra}); the file is incomplete or for another "
                                      f"model")
    for index in SD15_LAYER_INDICES:
        channels = BY_LAYER_INDEX[index].channels
        for name in ("to_k_ip", "to_v_ip"):
            key = f"ip_adapter.{index}.{name}.weight"
            if key not in sd:
                raise UnsupportedAdapterError(f"{source}: {key} is missing; the file is incomplete")
            if _shape(sd, key) != (channels, cross_dim):
                raise UnsupportedAdapterError(f"{source}: {key} has shape {list(_shape(sd, key))}, expected "
                                              f"[{channels}, {cross_dim}] for SD1.5")


def detect_variant(state_dict: dict, source: str = "adapter") -> AdapterSpec:
    """Read the variant from the flat state dict's shapes; raise UnsupportedAdapterError for anything else."""
    if not any(k.startswith("image_proj.") for k in state_dict) or \
            not any(k.startswith("ip_adapter.") for k in state_dict):
        raise UnsupportedAdapterError(f"{source} is not an IP-Adapter file: it needs image_proj.* and ip_adapter.* "
                                      f"weights (found keys like {sorted(state_dict)[:3]})")
    _refuse_other_families(state_dict, source)
    fields = _image_proj_spec(state_dict, source)
    if fields["cross_attention_dim"] != SD15_CROSS_ATTENTION_DIM:
        raise UnsupportedAdapterError(f"{source} projects to width {fields['cross_attention_dim']}; SD1.5 adapters "
                                      f"project to {SD15_CROSS_ATTENTION_DIM}")
    _check_layers(state_dict, fields["cross_attention_dim"], source)
    return AdapterSpec(**fields)
