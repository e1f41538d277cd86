"""Exception types raised by the core. Each message names the file or thing at fault, what was expected and the fix."""


class IPAdapterError(Exception):
    """Base class for every error this pack raises on purpose."""


class AdapterFileError(IPAdapterError):
    """An adapter file cannot be read: missing, truncated, corrupt, or a pickle that would run code."""


class UnsupportedAdapterError(IPAdapterError):
    """The file is an IP-Adapter, but of a kind this pack does not apply (SDXL, FaceID, ...)."""


class EncoderMismatchError(IPAdapterError):
    """The CLIP vision encoder or its embeddings do not fit the adapter."""


class ModelMismatchError(IPAdapterError):
    """The diffusion model does not fit the adapter (wrong architecture or cross-attention width)."""
