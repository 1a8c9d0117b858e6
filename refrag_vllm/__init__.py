"""REFRAG for vLLM: compressed retrieved passages, one decoder position per k tokens.

Importing this package does not import vLLM; :func:`register` (the
``vllm.general_plugins`` entry point) does, lazily.
"""

from .chunks import CompressedChunks, decode_embeds, encode_embeds
from .config import ARCHITECTURE, MODALITY, PLACEHOLDER_TOKEN, RefragConfig, load_refrag_config
from .prompt import Passage, RefragPromptBuilder, escape_text, passage

__all__ = [
    "ARCHITECTURE", "MODALITY", "PLACEHOLDER_TOKEN", "CompressedChunks", "Passage", "RefragConfig",
    "RefragPromptBuilder", "decode_embeds", "encode_embeds", "escape_text", "load_refrag_config", "passage",
    "register",
]

_registered = False

SUPPORTED_VLLM = ((0, 32), (0, 34))
"""vLLM releases the plug-in supports: ``>= 0.32, < 0.34`` (tested with 0.32.0). It uses
vLLM's multimodal processor and renderer hooks, which change between minor releases."""


ANY_VLLM_ENV = "REFRAG_ALLOW_ANY_VLLM"
"""Set to 1 to run on a vLLM release outside :data:`SUPPORTED_VLLM` anyway (with a warning)."""


def check_vllm_version(version: str) -> None:
    """Refuse a ``version`` outside :data:`SUPPORTED_VLLM`, whose private multimodal and
    renderer hooks the plug-in overrides; with ``REFRAG_ALLOW_ANY_VLLM=1``, only warn."""
    import os
    import re
    import warnings

    m = re.match(r"(\d+)\.(\d+)", version)
    (lo, hi), found = SUPPORTED_VLLM, (int(m.group(1)), int(m.group(2))) if m else None
    if found is None or not lo <= found < hi:
        message = (f"refrag-vllm supports vLLM >= {lo[0]}.{lo[1]}, < {hi[0]}.{hi[1]}; found {version}. "
                   "Its multimodal and renderer hooks may not fit this release")
        if os.environ.get(ANY_VLLM_ENV) == "1":
            warnings.warn(message + f" ({ANY_VLLM_ENV}=1: going on anyway).", stacklevel=3)
            return
        raise RuntimeError(message + f"; install a supported vLLM, or set {ANY_VLLM_ENV}=1 to try it anyway.")


def register() -> None:
    """Register ``RefragLlamaForCausalLM`` (and the REFRAG renderer) with vLLM. Idempotent."""
    global _registered
    if _registered:
        return
    import vllm
    from vllm import ModelRegistry

    check_vllm_version(vllm.__version__)
    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "refrag_vllm.model:RefragLlamaForCausalLM")
    from .renderer import register_renderer

    register_renderer()
    _registered = True
