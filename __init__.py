"""ComfyUI entry point of the IPX IP-Adapter pack: the nodes live in nodes/, the math in ipadapter_core/."""
from .nodes.registry import comfy_entrypoint

__all__ = ["comfy_entrypoint"]
