"""vLLM renderer hook: ``<passage>`` markup in any prompt becomes compressed chunks.

Registered by the plug-in for vLLM's default (``hf``) renderer mode, and as
``refrag``.  For any model other than ``RefragLlamaForCausalLM`` it behaves
exactly like vLLM's ``HfRenderer``.  For a REFRAG checkpoint:

* a text prompt (a ``/v1/completions`` prompt, or a chat conversation after the
  chat template) with ``<passage>...</passage>`` markup is rendered by
  :meth:`RefragPromptBuilder.render` -- the same function the offline API uses;
* a token prompt holding the placeholder token without chunk data is rejected.

Both paths raise ``ValueError``, which the OpenAI server answers with HTTP 400.
"""

from __future__ import annotations

from functools import cached_property

from vllm.renderers.hf import HfRenderer

from .config import ARCHITECTURE, MODALITY
from .prompt import RefragPromptBuilder, has_passages

RENDERER_MODE = "refrag"


def register_renderer() -> None:
    from vllm.renderers.registry import RENDERER_REGISTRY
    from vllm.tokenizers.registry import TokenizerRegistry

    for mode in ("hf", RENDERER_MODE):
        if RENDERER_REGISTRY.renderers.get(mode) != (__name__, "RefragRenderer"):
            RENDERER_REGISTRY.renderers[mode] = (__name__, "RefragRenderer")
    if RENDERER_MODE not in TokenizerRegistry.tokenizers:
        TokenizerRegistry.register(RENDERER_MODE, "vllm.tokenizers.hf", "CachedHfTokenizer")


class RefragRenderer(HfRenderer):
    @cached_property
    def is_refrag(self) -> bool:
        return self.model_config.architecture == ARCHITECTURE

    @cached_property
    def prompt_builder(self) -> RefragPromptBuilder:
        from .config import refrag_config_from_hf

        hf_config = self.model_config.hf_config
        return RefragPromptBuilder(
            self.get_tokenizer(), refrag_config_from_hf(hf_config), int(hf_config.hidden_size)
        )

    def _needs_refrag_render(self, prompt) -> bool:
        return (
            self.is_refrag
            and "prompt_token_ids" not in prompt
            and "prompt_embeds" not in prompt
            and isinstance(prompt.get("prompt"), str)
            and (has_passages(prompt["prompt"]) or self.prompt_builder.cfg.placeholder_token in prompt["prompt"])
        )

    def _refrag_render(self, prompt, params):
        if prompt.get("multi_modal_data"):
            raise ValueError("send compressed chunks either as <passage> markup or as multi_modal_data, not both")
        rendered = self.prompt_builder.render(prompt["prompt"], add_special_tokens=params.add_special_tokens)
        return {**prompt, **rendered}

    def _tokenize_singleton_prompt(self, prompt, params):
        if self._needs_refrag_render(prompt):
            prompt = self._refrag_render(prompt, params)
        return super()._tokenize_singleton_prompt(prompt, params)

    async def _tokenize_singleton_prompt_async(self, prompt, params):
        if self._needs_refrag_render(prompt):
            prompt = await self._executor_run(self._refrag_render, prompt, params)
        return await super()._tokenize_singleton_prompt_async(prompt, params)

    async def _executor_run(self, fn, *args):
        import asyncio

        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _check_placeholders(self, prompt) -> None:
        if not self.is_refrag or prompt.get("multi_modal_data"):
            return
        pid = self.prompt_builder.placeholder_id
        if pid in prompt["prompt_token_ids"]:
            raise ValueError(
                f"the prompt contains the placeholder token "
                f"{self.prompt_builder.cfg.placeholder_token!r} (id {pid}) without {MODALITY} data"
            )

    def _process_tokens(self, prompt, *, skip_mm_cache: bool = False):
        self._check_placeholders(prompt)
        return super()._process_tokens(prompt, skip_mm_cache=skip_mm_cache)

    async def _process_tokens_async(self, prompt, *, skip_mm_cache: bool = False):
        self._check_placeholders(prompt)
        return await super()._process_tokens_async(prompt, skip_mm_cache=skip_mm_cache)
