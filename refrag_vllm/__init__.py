"""REFRAG for vLLM: compressed retrieved passages, one decoder position per k tokens.

Importing this package does not import vLLM; :func:`register` (the
``vllm.general_plugins`` entry point) does, lazily.
"""

from .chunks import CompressedChunks, decode_embeds, encode_embeds
from .config import ARCHITECTURE, MODALITY, PLACEHOLDER_TOKEN, RefragConfig, load_refrag_config
from .prompt import Passage, RefragPromptBuilder

__all__ = [
    "ARCHITECTURE", "MODALITY", "PLACEHOLDER_TOKEN", "CompressedChunks", "Passage", "RefragConfig",
    "RefragPromptBuilder", "decode_embeds", "encode_embeds", "load_refrag_config", "register",
]

_registered = False


def register() -> None:
    """Register ``RefragLlamaForCausalLM`` (and the REFRAG renderer) with vLLM. Idempotent."""
    global _registered
    if _registered:
        return
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "refrag_vllm.model:RefragLlamaForCausalLM")
    from .renderer import register_renderer

    register_renderer()
    _registered = True
