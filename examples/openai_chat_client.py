"""Stream a RAG answer from `vllm serve <refrag checkpoint>` with the stock openai client.

    .venv/bin/vllm serve checkpoints/refrag-smollm2-k16 --max-model-len 8192 --kv-cache-memory-bytes 2G \
        --middleware refrag_vllm.middleware.RequestSizeLimit &
    .venv/bin/python examples/openai_chat_client.py "What does the json module do?"
    # --index sends vectors: the server needs --enable-mm-embeds
    .venv/bin/python examples/openai_chat_client.py --index runs/rag-example/index "How do I copy a file?"

Passages travel inside the message as <passage>...</passage>, escaped by
``refrag_vllm.passage``; the server compresses them.  With ``--index`` (built by
``refrag-vllm index`` or examples/rag_end_to_end.py) the passages are retrieved, and sent
as their cached chunk vectors (<passage format="projected">), so the server runs no encoder.
"""

import argparse
import json
from pathlib import Path

from openai import OpenAI

PASSAGES = [json.__doc__, json.dumps.__doc__, json.loads.__doc__]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("question", nargs="?", default="What does the json module do?")
    ap.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    ap.add_argument("--index", help="retrieve passages from this index (its cached chunk vectors)")
    ap.add_argument("--top-k", type=int, default=3)
    args = ap.parse_args()
    client = OpenAI(base_url=args.base_url, api_key="none")
    model = client.models.list().data[0].id
    if args.index:
        passages = "\n\n".join(retrieved_passages(args.index, args.question, args.top_k, model))
    else:
        from refrag_vllm import passage

        passages = "\n\n".join(passage(" ".join(p.split())) for p in PASSAGES)
    content = f"Answer the question using these passages.\n\n{passages}\n\nQuestion: {args.question}"
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": content}], max_tokens=96, temperature=0,
        stream=True, stream_options={"include_usage": True},
    )
    usage = None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
        usage = chunk.usage or usage
    print(f"\n[prompt positions: {usage.prompt_tokens}]" if usage else "")


def retrieved_passages(index_dir: str, question: str, top_k: int, served_model: str) -> list[str]:
    from refrag_vllm import encode_embeds
    from refrag_vllm.retrieval.index import PassageIndex, Retriever

    index = PassageIndex.open(index_dir)
    if Path(served_model).exists():  # the served name is the checkpoint path unless renamed
        index.check_model(served_model)
    hits = index.search(Retriever(index.meta["retriever"]["model"]).embed([question]), top_k)[0]
    for h in hits:
        print(f"[passage {h.id[:8]}, score {h.score:.2f}] {h.text[:80]}...")
    return [f'<passage format="projected">{encode_embeds(index.chunk_embeds(h.row))}</passage>' for h in hits]


if __name__ == "__main__":
    main()
