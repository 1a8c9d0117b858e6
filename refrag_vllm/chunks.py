"""Compressed-chunk items: what the engine receives for each run of compressed chunks.

One item is a run of consecutive compressed chunks (a passage, or part of one),
and occupies exactly one decoder position per chunk.  A chunk arrives in one of
three forms:

* ``text``      -- the chunk's text; the encoder runs inside the engine;
* ``encoder``   -- a precomputed encoder vector per chunk ``(n, encoder_hidden)``;
* ``projected`` -- a precomputed projected vector per chunk ``(n, decoder_hidden)``
  (the REFRAG cache path: no encoder, no projector at query time).

Everything that crosses the trust boundary goes through :func:`validate_item`.
Embeddings on the wire are base64 safetensors (never pickle).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

ChunkKind = Literal["text", "encoder", "projected"]
KINDS: tuple[str, ...] = ("text", "encoder", "projected")
_FIELD_TO_KIND = {"texts": "text", "encoder_embeds": "encoder", "projected_embeds": "projected"}
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
WIRE_TENSOR_NAME = "embeds"


@dataclass(frozen=True, eq=False)
class CompressedChunks:
    """A run of ``num_chunks`` compressed chunks (one multimodal item)."""

    kind: ChunkKind
    texts: tuple[str, ...] | None = None
    embeds: torch.Tensor | None = None  # (num_chunks, width), float32, finite

    @classmethod
    def from_texts(cls, texts: Sequence[str]) -> "CompressedChunks":
        return cls(kind="text", texts=tuple(texts))

    @classmethod
    def from_encoder_embeds(cls, embeds) -> "CompressedChunks":
        return cls(kind="encoder", embeds=embeds)

    @classmethod
    def from_projected_embeds(cls, embeds) -> "CompressedChunks":
        return cls(kind="projected", embeds=embeds)

    @property
    def num_chunks(self) -> int:
        return len(self.texts) if self.kind == "text" else int(self.embeds.shape[0])

    def content_hash(self) -> str:
        """A digest of the item's content: the identity used by vLLM's caches."""
        h = hashlib.sha256()
        h.update(self.kind.encode())
        if self.kind == "text":
            for t in self.texts:
                b = t.encode("utf-8")
                h.update(len(b).to_bytes(8, "little"))
                h.update(b)
        else:
            e = self.embeds.contiguous()
            h.update(repr((tuple(e.shape), str(e.dtype))).encode())
            h.update(e.view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    def split(self, max_chunks: int) -> list["CompressedChunks"]:
        """Cut into items of at most ``max_chunks`` chunks each."""
        n = self.num_chunks
        if n <= max_chunks:
            return [self]
        out = []
        for s in range(0, n, max_chunks):
            if self.kind == "text":
                out.append(CompressedChunks(kind="text", texts=self.texts[s : s + max_chunks]))
            else:
                out.append(CompressedChunks(kind=self.kind, embeds=self.embeds[s : s + max_chunks]))
        return out


def _as_tensor(value, what: str) -> torch.Tensor:
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            raise ValueError(f"{what}: object arrays are not accepted")
        value = torch.from_numpy(np.ascontiguousarray(value))
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{what}: expected a tensor or numpy array, got {type(value).__name__}")
    return value


def check_embeds(embeds, *, width: int, what: str, max_chunks: int | None = None) -> torch.Tensor:
    """Validate a ``(num_chunks, width)`` float tensor; return it as CPU float32."""
    t = _as_tensor(embeds, what)
    if t.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{what}: dtype must be a float type (float16/bfloat16/float32), got {t.dtype}")
    if t.ndim != 2:
        raise ValueError(f"{what}: must be 2-D (num_chunks, {width}), got shape {tuple(t.shape)}")
    if t.shape[0] < 1:
        raise ValueError(f"{what}: has no chunks (shape {tuple(t.shape)})")
    if t.shape[1] != width:
        raise ValueError(
            f"{what}: embedding width {t.shape[1]} does not match the model's expected width {width}"
        )
    if max_chunks is not None and t.shape[0] > max_chunks:
        raise ValueError(f"{what}: {t.shape[0]} chunks in one item, more than the limit {max_chunks}")
    t = t.detach().to("cpu", torch.float32).contiguous()
    if not torch.isfinite(t).all():
        raise ValueError(f"{what}: contains NaN or infinite values")
    return t


def validate_item(
    item: object,
    *,
    encoder_width: int,
    decoder_width: int,
    max_chunks: int,
    index: int = 0,
) -> CompressedChunks:
    """Turn user data into a checked :class:`CompressedChunks`, or raise ``ValueError``.

    Accepts a :class:`CompressedChunks` or a mapping with exactly one of the fields
    ``texts``, ``encoder_embeds``, ``projected_embeds``.
    """
    what = f"refrag_chunk item {index}"
    if isinstance(item, CompressedChunks):
        kind, texts, embeds = item.kind, item.texts, item.embeds
    elif isinstance(item, Mapping):
        unknown = set(item) - set(_FIELD_TO_KIND)
        if unknown:
            raise ValueError(
                f"{what}: unknown field(s) {sorted(map(str, unknown))}; "
                f"expected exactly one of {sorted(_FIELD_TO_KIND)}"
            )
        if len(item) != 1:
            raise ValueError(f"{what}: expected exactly one of {sorted(_FIELD_TO_KIND)}, got {sorted(item)}")
        (field, value), = item.items()
        kind = _FIELD_TO_KIND[field]
        texts = value if kind == "text" else None
        embeds = value if kind != "text" else None
    else:
        raise ValueError(
            f"{what}: expected CompressedChunks or a dict with one of {sorted(_FIELD_TO_KIND)}, "
            f"got {type(item).__name__}"
        )

    if kind == "text":
        if isinstance(texts, str) or not isinstance(texts, Sequence):
            raise ValueError(f"{what}: 'texts' must be a list of strings")
        if len(texts) == 0:
            raise ValueError(f"{what}: empty passage (no chunks)")
        if len(texts) > max_chunks:
            raise ValueError(f"{what}: {len(texts)} chunks in one item, more than the limit {max_chunks}")
        for j, t in enumerate(texts):
            if not isinstance(t, str):
                raise ValueError(f"{what}: chunk {j} is {type(t).__name__}, not a string")
            if not t.strip():
                raise ValueError(f"{what}: chunk {j} is empty")
        return CompressedChunks(kind="text", texts=tuple(texts))
    if kind not in ("encoder", "projected"):
        raise ValueError(f"{what}: unknown chunk kind {kind!r}")
    width = encoder_width if kind == "encoder" else decoder_width
    checked = check_embeds(embeds, width=width, what=f"{what} ({kind} embeddings)", max_chunks=max_chunks)
    return CompressedChunks(kind=kind, embeds=checked)


def encode_embeds(embeds: torch.Tensor) -> str:
    """Tensor ``(num_chunks, width)`` -> base64 safetensors string for requests."""
    from safetensors.torch import save

    return base64.b64encode(save({WIRE_TENSOR_NAME: embeds.detach().cpu().contiguous()})).decode("ascii")


def decode_embeds(payload: str, *, max_bytes: int = 256 * 2**20) -> torch.Tensor:
    """base64 safetensors -> tensor. Raises ``ValueError`` on anything malformed."""
    from safetensors.torch import load

    if not isinstance(payload, str):
        raise ValueError("embedding payload must be a base64 string")
    if len(payload) > max_bytes * 4 // 3 + 4:
        raise ValueError(f"embedding payload larger than {max_bytes} bytes")
    try:
        raw = base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise ValueError(f"embedding payload is not valid base64: {e}") from None
    try:
        tensors = load(raw)
    except Exception as e:  # safetensors raises its own error types
        raise ValueError(f"embedding payload is not a valid safetensors buffer: {e}") from None
    if set(tensors) != {WIRE_TENSOR_NAME}:
        raise ValueError(
            f"embedding payload must hold exactly one tensor named {WIRE_TENSOR_NAME!r}, "
            f"found {sorted(tensors)}"
        )
    return tensors[WIRE_TENSOR_NAME]
