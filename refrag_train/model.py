"""The model being trained: the shared reference model + LoRA (peft) + trainable heads.

``TrainingModel.refrag`` is the same ``RefragReferenceModel`` the parity tests compare
with vLLM, with LoRA layers injected by peft into

* the decoder's attention and MLP projections (trained in CPT and SFT), and
* the chunk encoder's attention and dense layers (trained in every stage but RL);

the projector and the expansion policy are trained in full (fp32).  Frozen base
weights stay in ``run.dtype`` (bf16 by default).
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file

from refrag_vllm.checkpoint import assemble_model, set_refrag_config
from refrag_vllm.config import PolicyConfig
from refrag_vllm.delta import ADAPTER_WEIGHTS, HEADS, apply_delta, save_delta
from refrag_vllm.embedder import strip_prefix
from refrag_vllm.engine import cpu_has_native_bf16
from refrag_vllm.expansion_policy import ExpansionPolicy
from refrag_vllm.reference import RefragReferenceModel

from .config import TrainConfig

DECODER_LORA = "decoder"
ENCODER_LORA = "encoder"


def learning_groups(stage_cfg) -> list[str]:
    """The groups a stage trains, from its ``train_projector``, ``train_decoder`` and
    ``train_encoder`` flags (the reading stages', CPT's and SFT's tables)."""
    return ((["projector"] if stage_cfg.train_projector else []) + ([DECODER_LORA] if stage_cfg.train_decoder else [])
            + ([ENCODER_LORA] if stage_cfg.train_encoder else []))


def load_base(cfg: TrainConfig, base_checkpoint: str | Path | None = None):
    """The untrained REFRAG model and decoder tokenizer.

    From ``base_checkpoint`` (a REFRAG checkpoint folder, used by tests) or from
    ``run.decoder`` / ``run.encoder`` (the shipped SmolLM2 + MiniLM by default).
    """
    from transformers import AutoTokenizer

    dtype = getattr(torch, cfg.run.dtype)
    if base_checkpoint:
        model = RefragReferenceModel.load(base_checkpoint, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(str(base_checkpoint))
    else:
        from refrag_vllm.default_models import load_decoder, load_encoder

        decoder, tokenizer = load_decoder(cfg.run.decoder or None, dtype)
        encoder, enc_tok = load_encoder(cfg.run.encoder or None, decoder, tokenizer)
        model = assemble_model(
            decoder, tokenizer, encoder, enc_tok, chunk_size=cfg.run.default_chunk_size,
            encoder_max_tokens=cfg.run.encoder_max_tokens, dtype=dtype, seed=cfg.run.seed,
            standardize_projector_inputs=cfg.run.standardize_projector_inputs,
            projector_output_norm=cfg.run.projector_output_norm or None,
        )
    # the RAG layout SFT trains on is the one the exported checkpoint builds prompts with
    pooling = cfg.run.encoder_pooling or model.refrag_config.encoder_pooling
    model.chunk_encoder.set_pooling(pooling)
    set_refrag_config(model, dataclasses.replace(model.refrag_config, question_first=cfg.run.question_first,
                                                 encoder_pooling=pooling))
    return model, tokenizer


def lora_config(cfg: TrainConfig) -> LoraConfig:
    """One peft adapter over decoder and encoder, with a rank per side."""
    lc = cfg.lora
    dec = "|".join(map(re.escape, lc.decoder_targets))
    enc = "|".join(map(re.escape, lc.encoder_targets))
    # decoder blocks; a BERT-like encoder's layers; a decoder-stack encoder's blocks
    target = (rf"^(model\.layers\.\d+\.(self_attn|mlp)\.({dec})"
              rf"|chunk_encoder\.model\.encoder\.layer\.\d+\.(.*\.)?({enc})"
              rf"|chunk_encoder\.model\.layers\.\d+\.(self_attn|mlp)\.({dec}))$")
    return LoraConfig(
        r=lc.decoder_rank,
        lora_alpha=lc.decoder_alpha,
        target_modules=target,
        rank_pattern={r"chunk_encoder\..*": lc.encoder_rank},
        alpha_pattern={r"chunk_encoder\..*": lc.encoder_alpha},
        lora_dropout=0.0,
        bias="none",
    )


def decoder_lora_scale(config: LoraConfig) -> float:
    """alpha / r of the decoder's LoRA (the encoder's has its own, in the rank and alpha patterns)."""
    return config.lora_alpha / config.r


def grow_lora_rank(saved: dict[str, torch.Tensor], current: dict[str, torch.Tensor],
                   saved_scale: float, scale: float) -> dict[str, torch.Tensor]:
    """A saved decoder LoRA of rank r0 inside this model's rank r >= r0, as the same function.

    ``lora_A`` (r, in): its first r0 rows are the saved ones, the rest keep this model's fresh
    init; ``lora_B`` (out, r): its first r0 columns are the saved ones times
    ``saved_scale / scale``, the rest zero. So B A * scale equals the saved B0 A0 * saved_scale,
    and the new directions start learning from the first step. Tensors whose shapes match pass.
    """
    grown = {}
    for name, tensor in saved.items():
        target = current.get(name)
        if target is None or target.shape == tensor.shape:
            grown[name] = tensor
            continue
        if ".chunk_encoder." in name or "lora_" not in name:
            raise ValueError(f"{name}: saved shape {tuple(tensor.shape)}, this model's {tuple(target.shape)}")
        if "lora_A" in name and tensor.shape[1:] == target.shape[1:] and tensor.shape[0] < target.shape[0]:
            out = target.detach().clone().to(tensor.dtype)
            out[: tensor.shape[0]] = tensor
        elif "lora_B" in name and tensor.shape[:1] == target.shape[:1] and tensor.shape[1] < target.shape[1]:
            out = torch.zeros(target.shape, dtype=tensor.dtype)
            out[:, : tensor.shape[1]] = tensor * (saved_scale / scale)
        else:
            raise ValueError(f"{name}: saved shape {tuple(tensor.shape)} does not fit this model's "
                             f"{tuple(target.shape)} (only a larger decoder rank can start from it)")
        grown[name] = out
    return grown


class TrainingModel:
    """Holds the peft-wrapped reference model, the policy, and their trainable groups."""

    def __init__(self, cfg: TrainConfig, base_checkpoint: str | Path | None = None) -> None:
        torch.manual_seed(cfg.run.seed)
        if cfg.run.dtype == "bfloat16" and cpu_has_native_bf16() is False:
            warnings.warn("run.dtype = bfloat16 on a CPU without AVX-512 BF16 or AMX: torch emulates bf16 "
                          "matmuls here, far slower than float32 (--set run.dtype=float32 trains faster; "
                          "the shipped timings are on a CPU with native bf16)", stacklevel=2)
        self.cfg = cfg
        self.base_checkpoint = base_checkpoint
        base, self.tokenizer = load_base(cfg, base_checkpoint)
        self.encoder_tokenizer = base.encoder_tokenizer
        self.lora_config = lora_config(cfg)
        self.peft_model = get_peft_model(base, self.lora_config)
        self.refrag: RefragReferenceModel = self.peft_model.base_model.model
        self.refrag.projector.float()
        self.policy_config = PolicyConfig(
            in_dim=self.refrag.refrag_config.encoder_hidden_size,
            d_model=cfg.policy.d_model, num_layers=cfg.policy.num_layers, num_heads=cfg.policy.num_heads,
        )
        self.policy = ExpansionPolicy(self.policy_config).float()
        self.placeholder_id = self.refrag.refrag_config.placeholder_token_id

    # ------------------------------------------------------------ parameters
    def named_groups(self) -> dict[str, list[tuple[str, torch.nn.Parameter]]]:
        groups: dict[str, list] = {DECODER_LORA: [], ENCODER_LORA: [], "projector": [], "policy": []}
        for name, p in self.peft_model.named_parameters():
            if "lora_" in name:
                groups[ENCODER_LORA if ".chunk_encoder." in name else DECODER_LORA].append((name, p))
        groups["projector"] = list(self.refrag.projector.named_parameters())
        groups["policy"] = list(self.policy.named_parameters())
        return groups

    def trainable(self, groups: list[str]) -> list[torch.nn.Parameter]:
        """Freeze everything, then unfreeze ``groups``; returns their parameters."""
        for p in self.peft_model.parameters():
            p.requires_grad_(False)
        for p in self.policy.parameters():
            p.requires_grad_(False)
        params = []
        for g, named in self.named_groups().items():
            for _, p in named:
                if g in groups:
                    p.requires_grad_(True)
                    params.append(p)
        return params

    def frozen_copy(self, delta_dir: str | Path | None) -> "TrainingModel":
        """Another model holding ``delta_dir``'s weights (None: the untrained base), nothing
        trainable (a distillation teacher)."""
        copy = TrainingModel(self.cfg, self.base_checkpoint)
        if delta_dir is not None:
            copy.load_delta_weights(delta_dir)
        copy.trainable([])
        copy.train(False)
        return copy

    def train(self, mode: bool = True) -> None:
        self.peft_model.train(mode)
        self.policy.train(mode)

    # ------------------------------------------------------------ save/load
    def heads_state(self) -> dict[str, torch.Tensor]:
        heads = {f"projector.{k}": v for k, v in self.refrag.projector.state_dict().items()}
        heads.update({f"expansion_policy.{k}": v for k, v in self.policy.state_dict().items()})
        return heads

    def save_delta(self, out_dir: str | Path, meta: dict | None = None, with_policy: bool = True) -> Path:
        heads = self.heads_state()
        if not with_policy:
            heads = {k: v for k, v in heads.items() if k.startswith("projector.")}
        full_meta = {
            "chunk_size": self.cfg.run.default_chunk_size,
            "expansion_policy": vars(self.policy_config) if with_policy else None,
            "chunk_sizes_trained": self.cfg.run.chunk_sizes,
            "encoder": self.cfg.run.encoder or None,
            "encoder_pooling": self.refrag.refrag_config.encoder_pooling,
            "projector": dataclasses.asdict(self.refrag.refrag_config.projector),
            "question_first": self.cfg.run.question_first,
            **(meta or {}),
        }
        return save_delta(out_dir, adapter_config=self.lora_config, dtype=torch.float32,
                          adapter_state=get_peft_model_state_dict(self.peft_model), heads=heads, meta=full_meta)

    def load_delta_weights(self, delta_dir: str | Path) -> None:
        """Load a saved delta's trainable weights into this (unmerged) model, to continue training.

        Stage outputs are saved in fp32, so resuming continues bit for bit. A delta whose decoder
        LoRA has a smaller rank than ``lora.decoder_rank`` grows into it (:func:`grow_lora_rank`)."""
        delta_dir = Path(delta_dir)
        saved = load_file(str(delta_dir / ADAPTER_WEIGHTS))
        saved = grow_lora_rank(saved, get_peft_model_state_dict(self.peft_model),
                               decoder_lora_scale(LoraConfig.from_pretrained(str(delta_dir))),
                               decoder_lora_scale(self.lora_config))
        result = set_peft_model_state_dict(self.peft_model, saved)
        if result.unexpected_keys:
            raise ValueError(f"{delta_dir}: unexpected LoRA weights {result.unexpected_keys[:3]}")
        heads = load_file(str(delta_dir / HEADS))
        heads = {k: v.float() for k, v in heads.items()}
        self.refrag.projector.load_state_dict(strip_prefix(heads, "projector."))
        policy = strip_prefix(heads, "expansion_policy.")
        if policy:
            self.policy.load_state_dict(policy)


def export_checkpoint(cfg: TrainConfig, delta_dir: str | Path, out_dir: str | Path,
                      base_checkpoint: str | Path | None = None, chunk_size: int | None = None) -> Path:
    """Base models + delta -> a checkpoint folder vLLM serves unchanged.

    The same path as ``refrag-vllm build --delta``: a fresh base, :func:`apply_delta`, save.
    ``chunk_size``: the k the checkpoint serves at (default: the k the delta was trained for).
    """
    from refrag_vllm.checkpoint import write_checkpoint

    model, tokenizer = load_base(cfg, base_checkpoint)
    enc_tok = model.encoder_tokenizer
    model = apply_delta(model, delta_dir, chunk_size=chunk_size)
    return write_checkpoint(model, out_dir, tokenizer, enc_tok)
