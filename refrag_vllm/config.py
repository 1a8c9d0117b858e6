"""REFRAG's own configuration, stored under the ``refrag`` key of ``config.json``.

The checkpoint directory is a Hugging Face Llama folder (``model_type: llama``,
``architectures: ["RefragLlamaForCausalLM"]``) whose ``config.json`` carries one
extra dict, ``refrag``, parsed here into :class:`RefragConfig`.  Both the vLLM
model class and the PyTorch reference read it through :func:`load_refrag_config`,
so there is exactly one place that decides what a checkpoint means.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PLACEHOLDER_TOKEN = "<|refrag_chunk|>"
MODALITY = "refrag_chunk"
ARCHITECTURE = "RefragLlamaForCausalLM"
ENCODER_TOKENIZER_DIR = "encoder_tokenizer"


class CheckpointMismatchError(ValueError):
    """The parts of a REFRAG checkpoint disagree with each other."""


def check_chunk_size(k) -> int:
    """``k`` as an int if it is a positive number of tokens; ``ValueError`` otherwise."""
    if isinstance(k, bool) or int(k) != k or k < 1:
        raise ValueError(f"chunk size {k!r}: k must be a positive number of tokens")
    return int(k)


def chunk_size_arg(text: str) -> int:
    """argparse ``type=`` of a k flag: :func:`check_chunk_size`, refused as a usage error."""
    import argparse

    try:
        return check_chunk_size(int(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: k must be a positive number of tokens") from None


@dataclass(frozen=True)
class ProjectorConfig:
    """2-layer MLP ``in_dim -> hidden_dim -> out_dim`` (paper: hidden == out)."""

    in_dim: int
    hidden_dim: int
    out_dim: int
    activation: str = "gelu"
    standardize_inputs: bool = False
    """Subtract a per-dimension mean and divide by a per-dimension std (buffers
    ``input_mean`` / ``input_inv_std``, measured on training chunks) before ``fc1``.
    Mean-pooled decoder-layer features share a large common component in a few
    dimensions; standardized, every dimension reaches ``fc1`` on the same scale."""
    output_norm: float | None = None
    """If set, every projected vector is scaled to this L2 norm (e.g. the decoder's mean
    token-embedding norm), so a chunk position enters the decoder at a token's scale."""


DECODER_STACK_TYPES = ("llama",)
"""Encoder model types that are decoder stacks (causal, no pooler)."""

POOLINGS = ("mean", "cls", "eos")
"""How token states become one chunk vector: the masked mean, the first token's state (BERT's
[CLS]), or the state of an end-of-sequence token appended after the chunk (decoder stacks only:
causal, it reads the whole chunk in order, as the memory tokens of ICAE and PISCO do)."""


def eos_token_id(encoder_config: dict) -> int | None:
    """The encoder config's end-of-sequence id (its first, if it lists several), or None."""
    eos = encoder_config.get("eos_token_id")
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if eos else None
    return None if eos is None else int(eos)


def check_pooling(pooling: str, encoder_config: dict) -> None:
    """Raise :class:`CheckpointMismatchError` unless ``pooling`` is one of :data:`POOLINGS` that
    this encoder can do (``eos``: a decoder stack with an EOS id)."""
    if pooling not in POOLINGS:
        raise CheckpointMismatchError(f"encoder pooling must be one of {POOLINGS}, got {pooling!r}")
    model_type = encoder_config.get("model_type")
    if pooling == "eos" and (model_type not in DECODER_STACK_TYPES or eos_token_id(encoder_config) is None):
        raise CheckpointMismatchError(
            f"eos pooling needs a decoder-stack encoder ({DECODER_STACK_TYPES}, e.g. decoder-layers:N) with an "
            f"eos_token_id; this one is {model_type!r} (eos {eos_token_id(encoder_config)})")


@dataclass(frozen=True)
class PolicyConfig:
    """Selective-expansion policy: a small transformer over chunk embeddings."""

    in_dim: int
    d_model: int = 256
    num_layers: int = 2
    num_heads: int = 4


@dataclass(frozen=True)
class RefragConfig:
    chunk_size: int
    """k: decoder tokens per compressed chunk."""
    placeholder_token: str
    placeholder_token_id: int
    encoder: dict[str, Any]
    """The encoder's Hugging Face config (BERT / RoBERTa ...), as a dict."""
    projector: ProjectorConfig
    encoder_pooling: str = "mean"
    """How token states become one chunk vector: ``mean`` (masked), ``cls`` or ``eos``
    (:data:`POOLINGS`)."""
    encoder_max_tokens: int = 128
    """Encoder tokens kept per chunk (a k-token chunk is re-tokenized for the encoder)."""
    max_chunks_per_item: int = 256
    """Longest run of compressed chunks carried by one multimodal item."""
    expansion_policy: PolicyConfig | None = None
    projector_initialised: str = "random"
    """Provenance of the projector weights: ``random`` or ``trained``."""
    question_first: bool = False
    """The RAG user turn this checkpoint was fine-tuned on names the question before the
    passages as well as after them (:func:`~refrag_vllm.prompt.rag_user_message`)."""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def encoder_hidden_size(self) -> int:
        return int(self.encoder["hidden_size"])

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RefragConfig":
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise CheckpointMismatchError(
                f"config.json 'refrag' has unknown field(s) {sorted(unknown)}; "
                f"known fields are {sorted(known)}"
            )
        d["projector"] = ProjectorConfig(**d["projector"])
        if d.get("expansion_policy") is not None:
            d["expansion_policy"] = PolicyConfig(**d["expansion_policy"])
        return cls(**d)


def refrag_config_from_hf(hf_config: Any) -> RefragConfig:
    """Parse and validate the ``refrag`` section of a loaded HF (Llama) config."""
    raw = getattr(hf_config, "refrag", None)
    if raw is None:
        raise CheckpointMismatchError(
            "config.json has no 'refrag' section: this is not a REFRAG checkpoint "
            "(build one with `refrag-vllm build`)"
        )
    cfg = raw if isinstance(raw, RefragConfig) else RefragConfig.from_dict(raw)
    validate_against_decoder(cfg, hf_config)
    return cfg


def validate_against_decoder(cfg: RefragConfig, decoder_config: Any) -> None:
    """Fail with a message naming the mismatch if the parts disagree."""
    hidden = int(decoder_config.hidden_size)
    enc_hidden = cfg.encoder_hidden_size
    p = cfg.projector
    if p.out_dim != hidden:
        raise CheckpointMismatchError(
            f"projector output size ({p.out_dim}) != decoder hidden_size ({hidden})"
        )
    if p.in_dim != enc_hidden:
        raise CheckpointMismatchError(
            f"projector input size ({p.in_dim}) != encoder hidden_size ({enc_hidden})"
        )
    if cfg.expansion_policy is not None and cfg.expansion_policy.in_dim != enc_hidden:
        raise CheckpointMismatchError(
            f"expansion_policy input size ({cfg.expansion_policy.in_dim}) != "
            f"encoder hidden_size ({enc_hidden})"
        )
    if cfg.chunk_size < 1:
        raise CheckpointMismatchError(f"chunk_size must be >= 1, got {cfg.chunk_size}")
    check_pooling(cfg.encoder_pooling, cfg.encoder)
    enc_max_pos = int(cfg.encoder.get("max_position_embeddings", 10**9))
    if cfg.encoder_max_tokens > enc_max_pos:
        raise CheckpointMismatchError(
            f"encoder_max_tokens ({cfg.encoder_max_tokens}) > encoder "
            f"max_position_embeddings ({enc_max_pos})"
        )


def load_refrag_config(model_dir: str | Path) -> tuple[dict[str, Any], RefragConfig]:
    """Read ``config.json`` from a checkpoint directory (no transformers needed)."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: not a checkpoint directory")
    raw = json.loads(path.read_text())
    if ARCHITECTURE not in raw.get("architectures", []):
        raise CheckpointMismatchError(
            f"{path}: architectures is {raw.get('architectures')}, expected "
            f"[{ARCHITECTURE!r}]"
        )

    class _Ns:
        pass

    ns = _Ns()
    ns.__dict__.update(raw)
    return raw, refrag_config_from_hf(ns)


def bytes_from_env(name: str, default: int, *, allow_zero: bool = False) -> int:
    """A byte count from the environment variable ``name`` (``default`` when unset or empty).
    Anything but a positive integer (or 0, with ``allow_zero``) is refused, naming the variable."""
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0 or (value == 0 and not allow_zero):
        kind = "non-negative" if allow_zero else "positive"
        raise ValueError(f"{name} must be a {kind} integer (bytes), got {raw!r}")
    return value
