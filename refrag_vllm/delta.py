"""Trained deltas: only what training changed, applied on top of the base models.

A delta folder holds

    adapter_config.json         peft LoRA config (decoder and encoder targets)
    adapter_model.safetensors   LoRA A/B matrices (bf16)
    refrag_heads.safetensors    projector.* (+ expansion_policy.*), bf16
    refrag_delta.json           chunk size, policy shape, provenance

``refrag-vllm build`` applies the shipped delta to SmolLM2 + MiniLM; a training run
exports its checkpoint through the same :func:`apply_delta`, so the shipped weights
reproduce the trained checkpoint exactly.  LoRA is merged into the base weights:
the served model has no adapter at run time.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .checkpoint import set_refrag_config
from .config import PolicyConfig, ProjectorConfig, check_chunk_size
from .expansion_policy import ExpansionPolicy

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
HEADS = "refrag_heads.safetensors"
META = "refrag_delta.json"
DELTA_DTYPE = torch.bfloat16
SHIPPED_DELTA = Path(__file__).parent / "weights" / "smollm2"


def save_delta(
    out_dir: str | Path,
    *,
    adapter_config=None,
    adapter_state: dict[str, torch.Tensor] | None = None,
    heads: dict[str, torch.Tensor],
    meta: dict[str, Any],
    dtype: torch.dtype = DELTA_DTYPE,
) -> Path:
    """Write a delta folder (tensors in ``dtype``: bf16 to ship, fp32 to resume).  ``heads`` maps checkpoint names (``projector.*``,
    ``expansion_policy.*``) to tensors; ``meta`` must give ``chunk_size`` and, with a
    policy, ``expansion_policy`` (a :class:`PolicyConfig` as a dict)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bad = [k for k in heads if not k.startswith(("projector.", "expansion_policy."))]
    if bad:
        raise ValueError(f"delta heads must be projector.* / expansion_policy.*, got {bad[:3]}")
    if adapter_state:
        adapter_config.save_pretrained(str(out))
        # A delta applies to whatever base `build` assembles: no machine's path in it.
        config_path = out / ADAPTER_CONFIG
        config = json.loads(config_path.read_text())
        config["base_model_name_or_path"] = None
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_file({k: v.detach().to(dtype).contiguous() for k, v in adapter_state.items()},
                  str(out / ADAPTER_WEIGHTS))
    save_file({k: v.detach().to(dtype).contiguous() for k, v in heads.items()}, str(out / HEADS))
    (out / META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return out


def copy_delta(src: str | Path, dst: str | Path, dtype: torch.dtype = DELTA_DTYPE) -> Path:
    """Copy a delta folder's files (nothing else), converting its tensors to ``dtype``."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for name in (ADAPTER_CONFIG, META):
        if (src / name).exists():
            (dst / name).write_bytes((src / name).read_bytes())
    for name in (ADAPTER_WEIGHTS, HEADS):
        if (src / name).exists():
            tensors = {k: v.to(dtype).contiguous() for k, v in load_file(str(src / name)).items()}
            save_file(tensors, str(dst / name))
    return dst


def delta_fingerprint(delta_dir: str | Path) -> str:
    """sha256 over a delta folder's files (name and bytes): which trained weights a checkpoint holds."""
    import hashlib

    digest = hashlib.sha256()
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, HEADS, META):
        path = Path(delta_dir) / name
        if path.exists():
            digest.update(name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def read_delta_meta(delta_dir: str | Path) -> dict[str, Any]:
    path = Path(delta_dir) / META
    if not path.exists():
        raise FileNotFoundError(f"{delta_dir}: not a REFRAG delta folder (no {META})")
    return json.loads(path.read_text())


def apply_delta(model, delta_dir: str | Path, *, chunk_size: int | None = None):
    """Merge a delta into an in-memory ``RefragReferenceModel``; returns the merged model.

    The projector (built as the delta's ``projector`` config says, if it gives one) and
    the policy are replaced, LoRA is merged into the decoder and encoder weights, and the
    ``refrag`` config records the delta's chunk size (or ``chunk_size``), projector, encoder
    pooling, policy shape and RAG layout (``question_first``).
    """
    delta_dir = Path(delta_dir)
    meta = read_delta_meta(delta_dir)
    chunk_size = check_chunk_size(meta["chunk_size"] if chunk_size is None else chunk_size)
    dtype = model.dtype
    tokenizer = model.encoder_tokenizer
    if (delta_dir / ADAPTER_CONFIG).exists():
        from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

        lora_config = LoraConfig.from_pretrained(str(delta_dir))
        peft_model = get_peft_model(model, lora_config)
        result = set_peft_model_state_dict(peft_model, load_file(str(delta_dir / ADAPTER_WEIGHTS)))
        missing = [k for k in result.missing_keys if "lora_" in k]
        if missing or result.unexpected_keys:
            raise ValueError(f"{delta_dir}: LoRA weights do not fit the model: "
                             f"missing {missing[:3]}, unexpected {result.unexpected_keys[:3]}")
        model = peft_model.merge_and_unload()
    heads = load_file(str(delta_dir / HEADS))
    cfg = model.refrag_config
    policy_cfg = None
    if any(k.startswith("expansion_policy.") for k in heads):
        policy_cfg = PolicyConfig(**meta["expansion_policy"])
        model.expansion_policy = ExpansionPolicy(policy_cfg)
    if meta.get("projector") and ProjectorConfig(**meta["projector"]) != cfg.projector:
        # The projector the delta was trained as (input standardization, output norm).
        from .projector import ChunkProjector

        cfg = dataclasses.replace(cfg, projector=ProjectorConfig(**meta["projector"]))
        model.projector = ChunkProjector(cfg.projector)
    pooling = meta.get("encoder_pooling", cfg.encoder_pooling)
    model.chunk_encoder.set_pooling(pooling)  # no weights: only how the chunk is read
    cfg = dataclasses.replace(
        cfg,
        chunk_size=chunk_size,
        encoder_pooling=pooling,
        expansion_policy=policy_cfg,
        projector_initialised="trained",
        question_first=bool(meta.get("question_first", False)),
    )
    set_refrag_config(model, cfg)
    missing, unexpected = model.load_state_dict(heads, strict=False)
    if unexpected:
        raise ValueError(f"{delta_dir}: heads the model does not have: {unexpected[:3]}")
    model.to(dtype)
    model.encoder_tokenizer = tokenizer
    return model
