"""With no passages, RefragLlamaForCausalLM gives exactly what plain vLLM Llama gives."""

import json

import pytest
from safetensors.torch import load_file, save_file

from helpers import QUESTION, greedy, make_llm, shutdown_llm

pytestmark = pytest.mark.engine

PROMPTS = [QUESTION, "The quick brown fox", "Python lists are"]


@pytest.fixture(scope="module")
def plain_llama_dir(tiny_ckpt, tmp_path_factory):
    """The checkpoint's decoder alone, as an ordinary HF Llama folder."""
    out = tmp_path_factory.mktemp("plain") / "llama"
    out.mkdir()
    cfg = json.loads((tiny_ckpt / "config.json").read_text())
    cfg.pop("refrag")
    cfg["architectures"] = ["LlamaForCausalLM"]
    (out / "config.json").write_text(json.dumps(cfg))
    weights = load_file(tiny_ckpt / "model.safetensors")
    save_file({k: v for k, v in weights.items() if k.startswith(("model.", "lm_head."))}, out / "model.safetensors")
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        if (tiny_ckpt / f).exists():
            (out / f).write_bytes((tiny_ckpt / f).read_bytes())
    return out


def test_no_passages_equals_plain_llama(tiny_ckpt, plain_llama_dir, builder):
    prompts = [builder.build(q, []) for q in PROMPTS] + [{"prompt_token_ids": builder.tokenizer(q)["input_ids"]} for q in PROMPTS]
    llm = make_llm(plain_llama_dir)
    plain = greedy(llm, prompts)
    shutdown_llm(llm)
    llm = make_llm(tiny_ckpt)
    refrag = greedy(llm, prompts)
    shutdown_llm(llm)
    for p, r in zip(plain, refrag):
        assert p[0] == r[0]
        assert p[1] == r[1]  # bit-identical: same decoder, same kernels
