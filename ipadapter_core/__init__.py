"""IP-Adapter for SD1.5: file reading, variant detection, projections and decoupled cross-attention. Pure torch,
einops and safetensors; never imports the host."""
from .adapter import IPAdapter, adapter_from_state_dict, load_adapter, load_state_dict_strict
from .attention import DecoupledCrossAttention, sdpa_attention
from .prompt import SCALINGS, ImagePrompt
from .errors import (AdapterFileError, EncoderMismatchError, IPAdapterError, ModelMismatchError,
                     UnsupportedAdapterError)
from .files import load_adapter_state_dict, save_adapter_bin, save_adapter_safetensors
from .layers import BY_HOST_KEY, BY_LAYER_INDEX, BY_TRANSFORMER_INDEX, SD15_LAYERS, CrossAttentionLayer
from .variants import AdapterSpec, detect_variant
