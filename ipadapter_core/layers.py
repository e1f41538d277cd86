"""The 16 cross-attention layers of the SD1.5 UNet, named three ways.

- ``layer_index``: the key in official weight files (``ip_adapter.{layer_index}.to_k_ip.weight``). It follows diffusers'
  processor order, where every attention layer (self and cross) gets an index and the cross-attention ones are odd:
  down blocks first, then up blocks, then the middle block (31).
- ``host_key``: ComfyUI's attn2 patch key ``(block_name, block_id, block_index)``; ``block_index`` is 0 on SD1.5 because
  each SpatialTransformer there holds a single transformer block.
- ``transformer_index``: the position in execution order (0..15), as the host reports it in ``extra_options``.
"""
from dataclasses import dataclass


@dataclass(frozen=True)
class CrossAttentionLayer:
    layer_index: int
    host_key: tuple
    transformer_index: int
    channels: int

    @property
    def block(self) -> str:
        return self.host_key[0]


def _sd15_layers():
    input_ids = (1, 2, 4, 5, 7, 8)
    input_channels = (320, 320, 640, 640, 1280, 1280)
    output_ids = (3, 4, 5, 6, 7, 8, 9, 10, 11)
    output_channels = (1280, 1280, 1280, 640, 640, 640, 320, 320, 320)
    layers = []
    for i, (block_id, ch) in enumerate(zip(input_ids, input_channels)):
        layers.append(CrossAttentionLayer(1 + 2 * i, ("input", block_id, 0), i, ch))
    layers.append(CrossAttentionLayer(31, ("middle", 0, 0), 6, 1280))
    for i, (block_id, ch) in enumerate(zip(output_ids, output_channels)):
        layers.append(CrossAttentionLayer(13 + 2 * i, ("output", block_id, 0), 7 + i, ch))
    return tuple(layers)


# In execution order (transformer_index 0..15).
SD15_LAYERS = _sd15_layers()
SD15_LAYER_INDICES = tuple(sorted(layer.layer_index for layer in SD15_LAYERS))
SD15_CROSS_ATTENTION_DIM = 768

BY_LAYER_INDEX = {layer.layer_index: layer for layer in SD15_LAYERS}
BY_HOST_KEY = {layer.host_key: layer for layer in SD15_LAYERS}
BY_TRANSFORMER_INDEX = {layer.transformer_index: layer for layer in SD15_LAYERS}
