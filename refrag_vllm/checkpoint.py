"""Assemble a REFRAG checkpoint directory from a Llama decoder and a BERT-like encoder.

Layout (one Hugging Face-style folder, served by ``vllm serve DIR`` as is)::

    config.json               Llama fields + architectures + "refrag": {...}
    model.safetensors         decoder, chunk_encoder, projector (+ expansion_policy)
    tokenizer*.json           decoder tokenizer with the placeholder token added
    encoder_tokenizer/        encoder tokenizer
    generation_config.json
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .config import (
    ARCHITECTURE,
    ENCODER_TOKENIZER_DIR,
    PLACEHOLDER_TOKEN,
    ProjectorConfig,
    RefragConfig,
)


def encoder_config_dict(encoder_model) -> dict:
    """The encoder's HF config as a plain dict (diff-free of transformers' defaults)."""
    d = encoder_model.config.to_dict()
    for key in ("architectures", "_name_or_path", "transformers_version", "torch_dtype", "dtype"):
        d.pop(key, None)
    return d


def add_placeholder_token(tokenizer) -> int:
    """Add REFRAG's placeholder as a special token; return its id."""
    if PLACEHOLDER_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [PLACEHOLDER_TOKEN]})
    return int(tokenizer.convert_tokens_to_ids(PLACEHOLDER_TOKEN))


def assemble_model(
    decoder,
    decoder_tokenizer,
    encoder,
    encoder_tokenizer,
    *,
    chunk_size: int = 16,
    encoder_pooling: str = "mean",
    encoder_max_tokens: int | None = None,
    max_chunks_per_item: int = 256,
    weights: dict[str, torch.Tensor] | None = None,
    dtype: torch.dtype | None = None,
    seed: int = 0,
    standardize_projector_inputs: bool = False,
    projector_output_norm: float | None = None,
):
    """Decoder + encoder (+ fresh projector) -> an in-memory ``RefragReferenceModel``.

    ``decoder`` is a transformers ``LlamaForCausalLM`` and ``encoder`` a transformers
    encoder model (``BertModel``, ``RobertaModel``...).  ``weights`` overrides any
    tensor by checkpoint name, e.g. ``projector.fc1.weight``.  Adds the placeholder
    token to ``decoder_tokenizer``.  The projector standardizes its inputs
    (``ProjectorConfig.standardize_inputs``) when asked, or when ``weights`` hold its
    ``projector.input_mean``.  ``projector_output_norm="tokens"`` scales every projected
    vector to the decoder's mean token-embedding norm; a number sets the norm itself.
    """
    from .reference import RefragReferenceModel

    placeholder_id = add_placeholder_token(decoder_tokenizer)
    enc_cfg = encoder_config_dict(encoder)
    hidden = int(decoder.config.hidden_size)
    if encoder_max_tokens is None:
        encoder_max_tokens = min(8 * chunk_size, int(enc_cfg.get("max_position_embeddings", 512)))
    trained = bool(weights) and any(k.startswith("projector.") for k in weights)
    standardize = standardize_projector_inputs or bool(weights and "projector.input_mean" in weights)
    cfg = RefragConfig(
        chunk_size=chunk_size,
        placeholder_token=PLACEHOLDER_TOKEN,
        placeholder_token_id=placeholder_id,
        encoder=enc_cfg,
        projector=ProjectorConfig(in_dim=int(enc_cfg["hidden_size"]), hidden_dim=hidden, out_dim=hidden,
                                  standardize_inputs=standardize,
                                  output_norm=_output_norm(projector_output_norm, decoder)),
        encoder_pooling=encoder_pooling,
        encoder_max_tokens=encoder_max_tokens,
        max_chunks_per_item=max_chunks_per_item,
        projector_initialised="trained" if trained else "random",
    )
    config = decoder.config.__class__.from_dict(decoder.config.to_dict())
    config.architectures = [ARCHITECTURE]
    config.refrag = cfg.to_dict()
    dtype = dtype or decoder.dtype
    torch.manual_seed(seed)
    model = RefragReferenceModel(config)
    state = {}
    state.update(decoder.state_dict())
    state.update({f"chunk_encoder.model.{k}": v for k, v in encoder.state_dict().items()})
    state.update({f"projector.{k}": v for k, v in model.projector.state_dict().items()})
    if weights:
        unknown = set(weights) - set(model.state_dict())
        if unknown:
            raise ValueError(f"--weights has tensors the model does not: {sorted(unknown)[:5]}...")
        state.update(weights)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (m == "lm_head.weight" and config.tie_word_embeddings)]
    unexpected = [u for u in unexpected if not u.startswith("chunk_encoder.model.pooler.")]
    if missing or unexpected:
        raise ValueError(f"checkpoint assembly: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.to(dtype)
    model.config.dtype = dtype
    model.encoder_tokenizer = encoder_tokenizer
    model.eval()
    return model


def _output_norm(spec, decoder) -> float | None:
    """``None``, a norm, or ``"tokens"``: the decoder's mean token-embedding norm."""
    if spec in (None, "", 0):
        return None
    if spec == "tokens":
        weight = decoder.get_input_embeddings().weight.detach().float()
        return round(float(weight.norm(dim=-1).mean()), 4)
    return float(spec)


def set_refrag_config(model, cfg: RefragConfig) -> None:
    """Replace a model's ``refrag`` config section (kept in ``config.json``)."""
    model.config.refrag = cfg.to_dict()
    model.refrag_config = cfg


def write_checkpoint(model, out_dir: str | Path, decoder_tokenizer, encoder_tokenizer) -> Path:
    """Save an in-memory ``RefragReferenceModel`` as a checkpoint folder vLLM serves."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    decoder_tokenizer.save_pretrained(out)
    encoder_tokenizer.save_pretrained(out / ENCODER_TOKENIZER_DIR)
    # save_pretrained may rewrite architectures from the class name; pin it.
    cfg_path = out / "config.json"
    raw = json.loads(cfg_path.read_text())
    raw["architectures"] = [ARCHITECTURE]
    cfg_path.write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
    return out


def assemble_checkpoint(out_dir: str | Path, decoder, decoder_tokenizer, encoder, encoder_tokenizer, **kwargs) -> Path:
    """Write a checkpoint (see :func:`assemble_model` for the arguments); returns its path."""
    model = assemble_model(decoder, decoder_tokenizer, encoder, encoder_tokenizer, **kwargs)
    return write_checkpoint(model, out_dir, decoder_tokenizer, encoder_tokenizer)


def load_tensors(model_dir: str | Path, prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Only the tensors under ``prefixes`` from a (possibly sharded) safetensors checkpoint."""
    from safetensors import safe_open

    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else [
        "model.safetensors"]
    out = {}
    for name in files:
        with safe_open(str(model_dir / name), framework="pt") as f:
            for key in f.keys():
                if key.startswith(prefixes):
                    out[key] = f.get_tensor(key)
    return out
