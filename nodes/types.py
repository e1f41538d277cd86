"""The pack's custom socket types and the values that travel on them. Prefixed, so that no other pack's type collides."""
from dataclasses import dataclass

from comfy_api.latest import io

from ..ipadapter_core import IPAdapter, AdapterSpec

ADAPTER_TYPE = "IPX_ADAPTER"
EMBEDS_TYPE = "IPX_EMBEDS"

AdapterSocket = io.Custom(ADAPTER_TYPE)
EmbedsSocket = io.Custom(EMBEDS_TYPE)

CATEGORY = "conditioning/ip-adapter (IPX)"


@dataclass(frozen=True)
class LoadedAdapter:
    """An adapter file, loaded: its spec, its module, and the ModelPatcher that loads it beside the UNet."""
    name: str
    spec: AdapterSpec
    module: IPAdapter
    patcher: object
