"""Offline batch generation with ``vllm.LLM``: many RAG prompts, passages compressed.

    .venv/bin/python examples/offline_batch.py [--model checkpoints/refrag-smollm2-k16]

Each question gets the docstrings of one standard-library module as its passages; the
whole batch goes through one ``LLM.generate`` call.
"""

import argparse
import inspect
import time

from vllm import LLM, SamplingParams

from refrag_vllm import RefragPromptBuilder
from refrag_vllm.engine import DEFAULT_CHECKPOINT, ensure_default_checkpoint, serving_dtype

MODULES = ["json", "csv", "pathlib", "shutil", "heapq", "textwrap", "uuid", "zipfile"]


def passages_of(module_name: str, max_passages: int = 4) -> list[str]:
    module = __import__(module_name)
    docs = [inspect.getdoc(module)] + [inspect.getdoc(getattr(module, n)) for n in sorted(dir(module))
                                       if not n.startswith("_") and callable(getattr(module, n))]
    return [" ".join(d.split()) for d in docs if d and len(d.split()) > 20][:max_passages]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(DEFAULT_CHECKPOINT))
    args = ap.parse_args()
    model = ensure_default_checkpoint(__import__("pathlib").Path(args.model))
    builder = RefragPromptBuilder.from_pretrained(model)
    questions = [f"What is the {m} module for?" for m in MODULES]
    prompts = [builder.build(q, passages_of(m)) for q, m in zip(questions, MODULES)]
    llm = LLM(model=str(model), max_model_len=8192, dtype=serving_dtype(), enforce_eager=True,
              kv_cache_memory_bytes=2 << 30)  # a fixed KV cache starts on a busy machine
    start = time.perf_counter()
    outputs = llm.generate(prompts, SamplingParams(max_tokens=48, temperature=0.0))
    seconds = time.perf_counter() - start
    for q, p, o in zip(questions, prompts, outputs):
        print(f"\nQ: {q}  [{builder.num_positions(p)} decoder positions]\nA: {o.outputs[0].text.strip()}")
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    print(f"\n{len(prompts)} prompts, {tokens} output tokens in {seconds:.1f} s")


if __name__ == "__main__":
    main()
