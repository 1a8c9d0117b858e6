"""What bf16 costs against fp32 on this CPU: serving, indexing and training, side by side.

    python -m benchmarks.dtype_cost --model CKPT --out benchmarks/results/dtype [--tokens 2048]

Serving: for each dtype, the TTFT benchmark's offline engine (``benchmarks.ttft``: the same
engine settings, eager) and its requests (fresh passages every time, so every prefill is
cold): vanilla RAG, REFRAG with the encoder in the engine and REFRAG with cached vectors at
k=16, ``--tokens`` context tokens each, TTFT median of ``--repeats`` after one warm-up each.
Indexing: the two models ``refrag-vllm index`` runs, each in each dtype, over the same passages:
the retriever's passage embeddings, and the checkpoint's encoder + projector over their chunks.
Training: the recipe's model (``refrag_train.model.TrainingModel``, ``--config``) built in each
``run.dtype``, one forward and backward of the next-token loss over ``--train-tokens`` tokens
with the groups CPT trains (the decoder's LoRA and the projector), median of ``--repeats``
after one warm-up.  Engines and the index's models run in ``refrag_vllm.engine.serving_dtype``,
and training warns in bf16, where the CPU has no native bf16; this says what that is worth here.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics

import torch

from refrag_vllm.markdown import table_lines

from .options import timed_calls, write_result

DTYPES = ("bfloat16", "float32")
MODES = ("vanilla", "refrag", "refrag-cached")


def measure_serving(model: str, tokens: int, repeats: int, k: int = 16) -> list[dict]:
    from .ttft import PROFILES, OfflineEngine, engine_env, measure_point
    from .workload import RequestFactory

    factory = RequestFactory(model)
    rows = []
    for dtype in DTYPES:
        cfg = dataclasses.replace(PROFILES["default"], dtype=dtype, enforce_eager=True, repeats=repeats,
                                  decode_tokens=2, throughput_requests=1)
        os.environ.update(engine_env(cfg))
        engine = OfflineEngine(model, cfg)
        for mode in MODES:
            make = lambda: factory.make(mode, tokens, None if mode == "vanilla" else k)  # noqa: E731
            engine.measure(make().prompt, 0)  # warm-up
            point = measure_point(engine, make, cfg)
            rows.append({"dtype": dtype, "mode": mode, "positions": point["positions"],
                         "ttft_s": point["ttft_s"]["median"]})
        engine.shutdown()
    return rows


def measure_index_models(model: str, tokens: int, repeats: int, k: int = 16) -> list[dict]:
    """What ``refrag-vllm index`` computes per passage, in each dtype: the retriever's passage
    embeddings and the checkpoint's encoder + projector over the passages' chunks."""
    from refrag_vllm.embedder import ChunkEmbedder
    from refrag_vllm.prompt import RefragPromptBuilder
    from refrag_vllm.retrieval.index import Retriever

    from .workload import PassageSource

    builder = RefragPromptBuilder.from_pretrained(model)
    passages = PassageSource(builder.tokenizer).passages(tokens)
    chunks = [c for p in passages for c in builder.chunk_texts(p)]
    rows = []
    for dtype in DTYPES:
        retriever = Retriever(dtype=dtype)
        embedder = ChunkEmbedder.from_pretrained(model, dtype=getattr(torch, dtype))
        for name, run in (("retriever", lambda: retriever.embed(passages)),
                          ("encoder + projector", lambda: embedder.project(embedder.encode(chunks)))):
            with torch.no_grad():
                seconds = statistics.median(timed_calls(run, repeats))
            rows.append({"dtype": dtype, "mode": name, "seconds": seconds})
    return rows


def measure_training(config: str, tokens: int, repeats: int) -> list[dict]:
    from refrag_train.config import load_config
    from refrag_train.model import DECODER_LORA, TrainingModel

    rows = []
    for dtype in DTYPES:
        model = TrainingModel(load_config(config, [f"run.dtype={dtype}"]))
        model.trainable([DECODER_LORA, "projector"])
        ids = torch.randint(100, model.tokenizer.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0))

        def step():
            logits = model.peft_model(input_ids=ids).logits.float()
            torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]).backward()

        rows.append({"dtype": dtype, "step_s": statistics.median(timed_calls(step, repeats))})
        del model
    return rows


def ratio_table(first: str, rows: list[dict], key: str, digits: int = 3) -> list[str]:
    """One table row per mode (a training row has none: "training step"): its ``key`` in each
    dtype, and bf16's over fp32's."""
    by_mode: dict = {}
    for r in rows:
        by_mode.setdefault(r.get("mode", "training step"), {})[r["dtype"]] = r[key]
    return table_lines([first, *DTYPES, "bf16 / fp32"],
                       [(mode, *(f"{t[d]:.{digits}f}" for d in DTYPES), f"{t['bfloat16'] / t['float32']:.1f}×")
                        for mode, t in by_mode.items()])


def markdown(result: dict) -> str:
    m, tokens, repeats = result["machine"], result["tokens"], result["repeats"]
    return "\n".join([
        f"bf16 against fp32 on {m['machine']} (torch CPU capability {m['cpu_capability']}, native bf16: "
        f"{m['native_bf16']}; {m['threads']} threads); `serving_dtype()` here: **{m['serving_dtype']}**.", "",
        f"Serving, offline engine, batch 1, cold, {tokens} context tokens (TTFT s, median of {repeats}):", "",
        *ratio_table("mode", result["serving"], "ttft_s"), "",
        f"Indexing, the models `refrag-vllm index` runs over the same {tokens} tokens of passages "
        f"(s, median of {repeats}):", "",
        *ratio_table("model", result["index"], "seconds"), "",
        f"Training, one forward + backward over {result['train_tokens']} tokens (`--config {result['config']}`, "
        f"s, median of {repeats}):", "",
        *ratio_table("", result["training"], "step_s", digits=2)]) + "\n"


def main() -> None:
    from refrag_vllm.engine import cpu_has_native_bf16, serving_dtype

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a REFRAG checkpoint folder")
    p.add_argument("--out", required=True)
    p.add_argument("--tokens", type=int, default=2048, help="context tokens of the serving requests")
    p.add_argument("--train-tokens", type=int, default=256)
    p.add_argument("--config", default="cpu", help="the training config whose model steps")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="torch threads of the training step")
    args = p.parse_args()
    result = {"model": args.model, "tokens": args.tokens, "train_tokens": args.train_tokens, "config": args.config,
              "repeats": args.repeats,
              "machine": {"machine": platform.machine(), "threads": args.threads,
                          "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                          "native_bf16": cpu_has_native_bf16(), "serving_dtype": serving_dtype()}}
    result["serving"] = measure_serving(args.model, args.tokens, args.repeats)
    torch.set_num_threads(args.threads)
    result["index"] = measure_index_models(args.model, args.tokens, args.repeats)
    result["training"] = measure_training(args.config, args.train_tokens, args.repeats)
    write_result(args.out, "dtype_cost", result, markdown(result))


if __name__ == "__main__":
    main()
