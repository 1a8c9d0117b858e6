"""vLLM renderer hook: ``<passage>`` markup in any prompt becomes compressed chunks.

Registered by the plug-in for vLLM's default (``hf``) renderer mode, and as
``refrag``.  For any model other than ``RefragLlamaForCausalLM`` it behaves
exactly like vLLM's ``HfRenderer``.  For a REFRAG checkpoint:

* a text prompt (a ``/v1/completions`` prompt, or a chat conversation after the
  chat template) with ``<passage>...</passage>`` markup is rendered by
  :meth:`RefragPromptBuilder.render` -- the same function the offline API uses;
* a text prompt that cannot fit ``max_model_len`` is refused before it is tokenized;
* a token prompt holding the placeholder token without chunk data is rejected;
* chat ``documents`` become compressed passages: where the chat template puts documents,
  or, if it has no place for them, before the question in the last user turn (the
  layout of :func:`~refrag_vllm.prompt.rag_user_message`);
* passages of precomputed vectors are refused unless the server was started with
  vLLM's ``--enable-mm-embeds`` (the flag vLLM gates every embedding input behind).

Both paths raise ``ValueError``, which the OpenAI server answers with HTTP 400.
"""

from __future__ import annotations

from functools import cached_property

from vllm.renderers.hf import HfRenderer

from .config import ARCHITECTURE, MODALITY
from .prompt import RefragPromptBuilder, document_text, has_passages, passage, rag_user_message

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

    @cached_property
    def embeds_enabled(self) -> bool:
        mm_config = self.model_config.get_multimodal_config()
        return bool(mm_config.enable_mm_embeds)

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
        rendered = self.prompt_builder.render(prompt["prompt"], add_special_tokens=params.add_special_tokens,
                                              allow_embeds=self.embeds_enabled)
        return {**prompt, **rendered}

    def _with_documents(self, messages, params):
        """Chat ``documents`` -> escaped passage markup (never dropped)."""
        import dataclasses

        from vllm.renderers.hf import _cached_resolve_chat_template_kwargs

        documents = params.chat_template_kwargs.get("documents")
        if not self.is_refrag or not documents:
            return messages, params
        if not isinstance(documents, list):
            raise ValueError("documents must be a list of {\"text\": ..., \"title\"?: ...} objects")
        texts = [document_text(d, i) for i, d in enumerate(documents)]
        kwargs = dict(params.chat_template_kwargs)
        template = params.chat_template or getattr(self.get_tokenizer(), "chat_template", None)
        if isinstance(template, str) and "documents" in _cached_resolve_chat_template_kwargs(template):
            kwargs["documents"] = [{**d, "text": passage(t)} for d, t in zip(documents, texts)]
            return messages, dataclasses.replace(params, chat_template_kwargs=kwargs)
        kwargs.pop("documents")
        users = [i for i, m in enumerate(messages) if m.get("role") == "user"]
        if not users or not isinstance(messages[users[-1]].get("content"), str):
            raise ValueError("documents need a last user message whose content is a string")
        last = users[-1]
        messages = list(messages)
        messages[last] = {**messages[last],
                          "content": rag_user_message([passage(t) for t in texts], messages[last]["content"],
                                                      question_first=self.prompt_builder.cfg.question_first)}
        return messages, dataclasses.replace(params, chat_template_kwargs=kwargs)

    def render_messages(self, messages, params):
        messages, params = self._with_documents(messages, params)
        return super().render_messages(messages, params)

    async def render_messages_async(self, messages, params):
        messages, params = self._with_documents(messages, params)
        return await super().render_messages_async(messages, params)

    def _check_size(self, prompt) -> None:
        """A text prompt that cannot fit ``max_model_len`` is refused before it is tokenized
        (a 50 MB body costs a regex scan, not a minute of tokenizing)."""
        if self.is_refrag and "prompt_token_ids" not in prompt and isinstance(prompt.get("prompt"), str):
            self.prompt_builder.check_size(prompt["prompt"], self.model_config.max_model_len)

    def _tokenize_singleton_prompt(self, prompt, params):
        self._check_size(prompt)
        if self._needs_refrag_render(prompt):
            prompt = self._refrag_render(prompt, params)
        return super()._tokenize_singleton_prompt(prompt, params)

    async def _tokenize_singleton_prompt_async(self, prompt, params):
        await self._executor_run(self._check_size, prompt)
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
