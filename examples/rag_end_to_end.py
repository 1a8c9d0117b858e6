"""The end-to-end RAG loop on a small real corpus that this example prepares itself.

    .venv/bin/python examples/rag_end_to_end.py [--workdir runs/rag-example]

1. corpus: passages from the Python documentation (Debian's python3-doc, if installed:
   ``apt-get install python3-doc``), else from the standard library's docstrings;
2. index: FAISS over MiniLM sentence embeddings + the REFRAG cache of every chunk
   (``refrag-vllm index`` does the same);
3. ask: each question in three modes on one engine: REFRAG with cached chunk vectors,
   REFRAG with the encoder in the engine, and vanilla RAG (passages as tokens).
"""

import argparse
import json
import time
from pathlib import Path

from vllm import SamplingParams

from refrag_vllm.engine import DEFAULT_CHECKPOINT, ensure_default_checkpoint, make_llm
from refrag_vllm.retrieval.corpora import docstring_texts
from refrag_vllm.retrieval.index import build_index
from refrag_vllm.retrieval.rag import MODES, RefragRAG

QUESTIONS = ["How do I copy a file and its permissions?", "How can I parse command-line options?",
             "What does json.dumps return?"]


def python_doc_passages(limit: int) -> list[str]:
    """Paragraphs of the Python documentation, or stdlib docstrings without python3-doc."""
    try:
        from refrag_train.data import clean_rst, find_python_docs

        sources = find_python_docs()
        paragraphs = []
        for path in sorted(sources.rglob("*.txt")):
            for para in clean_rst(path.read_text(encoding="utf-8", errors="replace")).split("\n\n"):
                if 30 <= len(para.split()) <= 200:
                    paragraphs.append(" ".join(para.split()))
            if len(paragraphs) >= limit:
                break
        if paragraphs:
            return paragraphs[:limit]
    except (ImportError, FileNotFoundError):
        pass
    return [d for _, d in zip(range(limit), docstring_texts(min_words=30))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(DEFAULT_CHECKPOINT))
    ap.add_argument("--workdir", default="runs/rag-example")
    ap.add_argument("--passages", type=int, default=2000)
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    model = ensure_default_checkpoint(Path(args.model))
    corpus = work / "corpus.jsonl"
    if not corpus.exists():
        corpus.write_text("".join(json.dumps({"text": p}) + "\n" for p in python_doc_passages(args.passages)))
    index = build_index(corpus, work / "index", model)  # appendable: a re-run adds nothing
    rag = RefragRAG(index, make_llm(model))
    params = SamplingParams(max_tokens=64, temperature=0.0)
    for mode in MODES:
        start = time.perf_counter()
        answers = rag.generate(QUESTIONS, top_k=3, mode=mode, sampling_params=params)
        print(f"\n=== {mode}: {time.perf_counter() - start:.1f} s for {len(QUESTIONS)} questions")
        for a in answers:
            print(f"Q: {a.question}  [{a.positions} decoder positions]\nA: {a.answer.strip()}")
            print("   passages: " + ", ".join(f"{h.id[:8]} ({h.score:.2f})" for h in a.passages))


if __name__ == "__main__":
    main()
