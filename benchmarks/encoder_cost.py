"""What each chunk encoder costs: ms per 1,000 context tokens, side by side in one run.

    python -m benchmarks.encoder_cost --out benchmarks/results/cpu [--tokens 8192]

The encoders are the modules the engine runs (``refrag_vllm.encoder.ChunkEncoder``,
bucketed, bf16), built from the shipped base models: all-MiniLM-L6-v2 and the
decoder's own first N layers (``decoder-layers:N``).  The input is real text (the
standard library's docstrings), cut into chunks of k decoder tokens as serving cuts
it, then tokenized by each encoder's tokenizer.  Timing: median of ``--repeats`` calls
after one warm-up, torch threads as given.  This is the encoder alone; the uncached
text path pays it on every request (``benchmarks.ttft`` measures the whole TTFT).
"""

from __future__ import annotations

import argparse
import statistics

import torch

from refrag_vllm.markdown import table_lines

from .options import timed_calls, write_result

ENCODERS = ("minilm", "decoder-layers:4", "decoder-layers:8")


def _chunks(tokenizer, total_tokens: int, k: int) -> list[str]:
    from refrag_vllm.retrieval.corpora import sample_passages
    from refrag_vllm.prompt import chunk_text

    passages = sample_passages(max(1, total_tokens // 128), 128, tokenizer)
    ids = [t for p in passages for t in tokenizer(p, add_special_tokens=False)["input_ids"][:128]][:total_tokens]
    return [chunk_text(tokenizer, ids[i : i + k]) for i in range(0, len(ids), k)]


def measure(encoders=ENCODERS, total_tokens: int = 8192, k: int = 16, repeats: int = 5,
            dtype=torch.bfloat16) -> dict:
    from refrag_vllm.checkpoint import encoder_config_dict
    from refrag_vllm.default_models import load_decoder, load_encoder
    from refrag_vllm.encoder import ChunkEncoder, tokenize_chunks

    decoder, dec_tok = load_decoder(None, dtype)
    texts = _chunks(dec_tok, total_tokens, k)
    rows = []
    for spec in encoders:
        model, tok = load_encoder(None if spec == "minilm" else spec, decoder, dec_tok)
        encoder = ChunkEncoder(encoder_config_dict(model))
        encoder.model = model.to(dtype).eval()
        ids, mask = tokenize_chunks(tok, texts, 64)
        with torch.no_grad():
            times = timed_calls(lambda: encoder(ids, mask), repeats)
        seconds = statistics.median(times)
        rows.append({"encoder": spec, "chunks": len(texts), "context_tokens": len(texts) * k,
                     "encoder_tokens": int(mask.sum()), "median_s": seconds, "min_s": min(times),
                     "ms_per_1000_tokens": 1000 * seconds / (len(texts) * k) * 1000,
                     "params_m": sum(p.numel() for p in model.parameters()) / 1e6})
    return {"k": k, "dtype": str(dtype), "threads": torch.get_num_threads(), "repeats": repeats, "rows": rows}


def markdown(result: dict) -> str:
    lines = [f"Chunk encoders alone (k={result['k']}, {result['dtype']}, {result['threads']} threads, median of "
             f"{result['repeats']}):", ""]
    lines += table_lines(
        ["encoder", "parameters (M)", "chunks", "encoder tokens", "s per call", "ms per 1,000 context tokens"],
        [(r["encoder"], f"{r['params_m']:.1f}", r["chunks"], r["encoder_tokens"], f"{r['median_s']:.3f}",
          f"{r['ms_per_1000_tokens']:.1f}") for r in result["rows"]])
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    result = measure(total_tokens=args.tokens, repeats=args.repeats)
    write_result(args.out, "encoder_cost", result, markdown(result))


if __name__ == "__main__":
    main()
