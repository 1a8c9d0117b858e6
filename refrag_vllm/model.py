"""``RefragLlamaForCausalLM``: vLLM's Llama with compressed-chunk inputs.

A prompt carries ``refrag_chunk`` items (see :mod:`refrag_vllm.chunks`).  The
processor expands the one placeholder token each item has in the prompt into
``num_chunks`` placeholder positions; ``embed_multimodal`` turns each item into
``(num_chunks, hidden)`` decoder inputs (encoder + projector, projector only, or
nothing for precomputed projected vectors), and vLLM merges them into
``inputs_embeds`` for the normal paged-attention prefill.  Text chunks go through the
engine's content-keyed chunk-vector cache (:mod:`refrag_vllm.chunk_cache`): a chunk seen
before skips the encoder and the projector.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Annotated, Literal, TypeAlias

import torch
from torch import nn

from vllm.config import VllmConfig
from vllm.config.multimodal import MultiModalDummyOptions
from vllm.inputs import MultiModalDataDict, MultiModalInput, mm_input
from vllm.model_executor.models.interfaces import MultiModalEmbeddings, SupportsMultiModal, SupportsPP
from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.utils import AutoWeightsLoader, WeightsMapper, maybe_prefix
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import (
    MultiModalBatchedField,
    MultiModalFieldConfig,
    MultiModalFieldElem,
    MultiModalKwargsItem,
    MultiModalKwargsItems,
    PlaceholderRange,
)
from vllm.multimodal.parse import MultiModalDataItems, MultiModalDataParser, ProcessorBatchItems
from vllm.multimodal.processing import (
    BaseDummyInputsBuilder,
    BaseMultiModalProcessor,
    BaseProcessingInfo,
    ProcessorInputs,
    PromptUpdate,
    TimingContext,
)
from vllm.sequence import IntermediateTensors
from vllm.utils.tensor_schema import TensorSchema, TensorShape

from .chunk_cache import ChunkVectorCache, cached_projection, preload, preload_dirs_from_env
from .chunks import CompressedChunks, validate_item
from .config import ENCODER_TOKENIZER_DIR, MODALITY, RefragConfig, refrag_config_from_hf
from .embedder import ChunkEmbedder
from .encoder import ChunkEncoder, tokenize_chunks
from .projector import ChunkProjector
from .prompt import EMBEDS_DISABLED

# Keys of the per-item model kwargs, one set per chunk kind.
TEXT_KEYS = ("chunk_input_ids", "chunk_attention_mask")
ENCODER_KEY = "chunk_encoder_embeds"
PROJECTED_KEY = "chunk_projected_embeds"


class RefragChunkTextInputs(TensorSchema):
    """Chunk texts, as the encoder's tokens. Dimensions:
    - bn: items in the call
    - nc: chunks of an item (varies by item)
    - l: encoder tokens of an item's longest chunk (varies by item)
    """

    type: Literal["chunk_text"] = "chunk_text"
    input_ids: Annotated[torch.Tensor | list[torch.Tensor], TensorShape("bn", "nc", "l", dynamic_dims={"nc", "l"})]
    attention_mask: Annotated[torch.Tensor | list[torch.Tensor],
                              TensorShape("bn", "nc", "l", dynamic_dims={"nc", "l"})]


class RefragChunkEmbedsInputs(TensorSchema):
    """Client-sent vectors: the encoder's (``encoder_embeds``, projected here) or the
    decoder's inputs as they are (``projected_embeds``). Dimensions:
    - bn: items in the call
    - nc: chunks of an item (varies by item)
    - h: the encoder's hidden size, or the decoder's for projected vectors
    """

    type: Literal["encoder_embeds", "projected_embeds"]
    data: Annotated[torch.Tensor | list[torch.Tensor], TensorShape("bn", "nc", "h", dynamic_dims={"nc"})]


RefragChunkInputs: TypeAlias = RefragChunkTextInputs | RefragChunkEmbedsInputs


class CompressedChunkItems(ProcessorBatchItems[CompressedChunks]):
    """Validated ``refrag_chunk`` items of one prompt."""

    def __init__(self, data: Sequence[CompressedChunks]) -> None:
        super().__init__(data, MODALITY)

    def get_processor_data(self) -> Mapping[str, object]:
        return {}


class RefragDataParser(MultiModalDataParser):
    def __init__(self, info: "RefragProcessingInfo") -> None:
        super().__init__()
        self._info = info

    def _parse_chunk_data(self, data: object) -> CompressedChunkItems | None:
        if data is None:
            return None
        if isinstance(data, (CompressedChunks, Mapping)):
            data = [data]
        if not isinstance(data, Sequence) or isinstance(data, str):
            raise ValueError(f"{MODALITY}: expected a list of items, got {type(data).__name__}")
        cfg = self._info.refrag_config
        items = [
            validate_item(
                item,
                encoder_width=cfg.encoder_hidden_size,
                decoder_width=self._info.decoder_hidden_size,
                max_chunks=cfg.max_chunks_per_item,
                index=i,
            )
            for i, item in enumerate(data)
        ]
        return CompressedChunkItems(items)

    def _get_subparsers(self):
        return {MODALITY: self._parse_chunk_data}


class RefragProcessingInfo(BaseProcessingInfo):
    @cached_property
    def refrag_config(self) -> RefragConfig:
        return refrag_config_from_hf(self.get_hf_config())

    @cached_property
    def decoder_hidden_size(self) -> int:
        return int(self.get_hf_config().hidden_size)

    @cached_property
    def encoder_tokenizer(self):
        from transformers import AutoTokenizer

        path = Path(self.ctx.model_config.model) / ENCODER_TOKENIZER_DIR
        return AutoTokenizer.from_pretrained(str(path))

    def get_data_parser(self) -> MultiModalDataParser:
        return RefragDataParser(self)

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {MODALITY: None}

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        return {MODALITY: min(self.refrag_config.max_chunks_per_item, seq_len)}


class RefragDummyInputsBuilder(BaseDummyInputsBuilder[RefragProcessingInfo]):
    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return self.info.refrag_config.placeholder_token * mm_counts.get(MODALITY, 0)

    def get_dummy_mm_data(
        self, seq_len: int, mm_counts: Mapping[str, int], mm_options: MultiModalDummyOptions
    ) -> MultiModalDataDict:
        cfg = self.info.refrag_config
        n = min(cfg.max_chunks_per_item, seq_len)
        # Longest realistic chunk: k words, each its own encoder token or more.
        text = " ".join(["profile"] * cfg.chunk_size)
        item = CompressedChunks.from_texts([text] * n)
        return {MODALITY: [item] * mm_counts.get(MODALITY, 0)}


def _elem(data: torch.Tensor) -> MultiModalFieldElem:
    return MultiModalFieldElem(data=data, field=MultiModalBatchedField())


class RefragMultiModalProcessor(BaseMultiModalProcessor[RefragProcessingInfo]):
    """Expands each item's placeholder and packs the item into model kwargs.

    The item's identity (for vLLM's prefix cache and encoder cache) is a digest of
    its content, computed here on the server side; client-provided ids are never
    trusted as a substitute for content.
    """

    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs) -> Mapping[str, MultiModalFieldConfig]:
        return {}

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs) -> Sequence[PromptUpdate]:
        return []

    def _item_kwargs(self, item: CompressedChunks) -> MultiModalKwargsItem:
        if item.kind == "text":
            ids, mask = tokenize_chunks(
                self.info.encoder_tokenizer, item.texts, self.info.refrag_config.encoder_max_tokens
            )
            return MultiModalKwargsItem({TEXT_KEYS[0]: _elem(ids), TEXT_KEYS[1]: _elem(mask)})
        key = ENCODER_KEY if item.kind == "encoder" else PROJECTED_KEY
        return MultiModalKwargsItem({key: _elem(item.embeds)})

    def apply(self, inputs: ProcessorInputs, timing_ctx: TimingContext) -> MultiModalInput:
        cfg = self.info.refrag_config
        pid = cfg.placeholder_token_id
        mm_items: MultiModalDataItems = inputs.mm_data_items
        unknown = set(mm_items) - {MODALITY}
        if unknown:
            raise ValueError(f"unsupported modality {sorted(unknown)}; this model takes {MODALITY!r}")
        items: list[CompressedChunks] = list(mm_items[MODALITY]) if MODALITY in mm_items else []
        if any(item.kind != "text" for item in items) and not self.info.ctx.get_mm_config().enable_mm_embeds:
            raise ValueError(EMBEDS_DISABLED)
        prompt = list(inputs.prompt)
        n_placeholders = sum(1 for t in prompt if t == pid)
        if n_placeholders != len(items):
            raise ValueError(
                f"the prompt has {n_placeholders} placeholder token(s) {cfg.placeholder_token!r} "
                f"but {len(items)} {MODALITY} item(s) were given; each item needs exactly one"
            )
        new_ids: list[int] = []
        ranges: list[PlaceholderRange] = []
        it = iter(items)
        for t in prompt:
            if t == pid:
                n = next(it).num_chunks
                ranges.append(PlaceholderRange(offset=len(new_ids), length=n))
                new_ids.extend([pid] * n)
            else:
                new_ids.append(t)
        with timing_ctx.record("apply_hf_processor"):
            kwargs = [self._item_kwargs(item) for item in items]
        with timing_ctx.record("get_mm_hashes"):
            hashes = [f"refrag-{item.content_hash()}" for item in items]
        return mm_input(
            prompt_token_ids=new_ids,
            mm_kwargs=MultiModalKwargsItems({MODALITY: kwargs}),
            mm_hashes={MODALITY: hashes},
            mm_placeholders={MODALITY: ranges},
        )


def _per_item(value) -> list[torch.Tensor]:
    """Batched field value -> list of per-item tensors."""
    if isinstance(value, torch.Tensor):
        return list(value.unbind(0))
    return list(value)


@MULTIMODAL_REGISTRY.register_processor(
    RefragMultiModalProcessor, info=RefragProcessingInfo, dummy_inputs=RefragDummyInputsBuilder
)
class RefragLlamaForCausalLM(nn.Module, SupportsMultiModal, SupportsPP):
    """Llama decoder + chunk encoder + projector; one decoder position per chunk."""

    hf_to_vllm_mapper = WeightsMapper(
        orig_to_new_prefix={"model.": "language_model.model.", "lm_head.": "language_model.lm_head."}
    )

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        if modality == MODALITY:
            from .config import PLACEHOLDER_TOKEN

            return PLACEHOLDER_TOKEN
        raise ValueError(f"Only the {MODALITY!r} modality is supported")

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.refrag_config = cfg = refrag_config_from_hf(config)
        with self._mark_tower_model(vllm_config, MODALITY):
            self.chunk_encoder = ChunkEncoder(cfg.encoder, cfg.encoder_pooling)
            self.projector = ChunkProjector(cfg.projector)
        self.chunk_cache = ChunkVectorCache.from_env()
        # indexed passages' vectors, in the dtype the engine's projector computes them
        preload(self.chunk_cache, preload_dirs_from_env(), vllm_config.model_config.model,
                vllm_config.model_config.dtype)
        with self._mark_language_model(vllm_config):
            self.language_model = LlamaForCausalLM(
                vllm_config=vllm_config, prefix=maybe_prefix(prefix, "language_model")
            )
        self.configure_mm_token_handling(config.vocab_size, [cfg.placeholder_token_id])
        self.make_empty_intermediate_tensors = self.language_model.make_empty_intermediate_tensors

    # ------------------------------------------------------------ chunks
    @property
    def chunk_embedder(self) -> ChunkEmbedder:
        """The encoder and projector (the processor tokenizes: no tokenizer here)."""
        return ChunkEmbedder(self.chunk_encoder, self.projector, None, self.refrag_config.encoder_max_tokens)

    def _parse_and_validate_chunk_input(self, **kwargs: object) -> RefragChunkInputs | None:
        """The call's items as text or vectors (one kind per call), shapes checked."""
        if TEXT_KEYS[0] in kwargs:
            return RefragChunkTextInputs(input_ids=kwargs[TEXT_KEYS[0]], attention_mask=kwargs[TEXT_KEYS[1]])
        if ENCODER_KEY in kwargs:
            return RefragChunkEmbedsInputs(type="encoder_embeds", data=kwargs[ENCODER_KEY],
                                           resolve_bindings={"h": self.refrag_config.encoder_hidden_size})
        if PROJECTED_KEY in kwargs:
            return RefragChunkEmbedsInputs(type="projected_embeds", data=kwargs[PROJECTED_KEY],
                                           resolve_bindings={"h": self.config.hidden_size})
        return None

    def _process_chunk_input(self, chunk_input: RefragChunkInputs) -> list[torch.Tensor]:
        """Items -> list of ``(num_chunks_i, hidden)`` decoder inputs, in item order."""
        out_dtype = self.language_model.model.embed_tokens.weight.dtype
        if chunk_input["type"] == "projected_embeds":
            return [e.to(out_dtype) for e in _per_item(chunk_input["data"])]
        if chunk_input["type"] == "encoder_embeds":
            return [self.chunk_embedder.project(e).to(out_dtype) for e in _per_item(chunk_input["data"])]
        ids, masks = _per_item(chunk_input["input_ids"]), _per_item(chunk_input["attention_mask"])
        sizes = [t.shape[0] for t in ids]
        width = max(t.shape[1] for t in ids)
        # One encoder call for the whole group: pad every item to the same width.
        flat_ids = torch.cat([nn.functional.pad(t, (0, width - t.shape[1])) for t in ids])
        flat_mask = torch.cat([nn.functional.pad(m, (0, width - m.shape[1])) for m in masks])
        projected = cached_projection(  # (sum n_i, hidden)
            self.chunk_cache, flat_ids, flat_mask,
            lambda i, m: self.chunk_embedder.project(self.chunk_embedder.encode_ids(i, m)))
        return [e.to(out_dtype) for e in projected.split(sizes)]

    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        """Items -> list of ``(num_chunks_i, hidden)`` tensors, in item order."""
        chunk_input = self._parse_and_validate_chunk_input(**kwargs)
        return [] if chunk_input is None else self._process_chunk_input(chunk_input)

    # ----------------------------------------------------------- decoder
    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: object,
    ) -> torch.Tensor | IntermediateTensors:
        if intermediate_tensors is not None:
            inputs_embeds = None
        return self.language_model.model(input_ids, positions, intermediate_tensors, inputs_embeds=inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.language_model.compute_logits(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        # The expansion policy runs before the engine (it decides the prompt), not in it.
        loader = AutoWeightsLoader(self, ignore_unexpected_prefixes=["expansion_policy."])
        return loader.load_weights(weights, mapper=self.hf_to_vllm_mapper)
