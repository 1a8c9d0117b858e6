"""Stream a RAG answer from `vllm serve <refrag checkpoint>` with the stock openai client.

    .venv/bin/vllm serve checkpoints/refrag-smollm2-minilm-k16 --max-model-len 8192 &
    .venv/bin/python examples/openai_chat_client.py "What does the json module do?"

Passages travel inside the message as <passage>...</passage>; the server compresses them.
"""

import argparse
import json

from openai import OpenAI

PASSAGES = [json.__doc__, json.dumps.__doc__, json.loads.__doc__]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("question", nargs="?", default="What does the json module do?")
    ap.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    args = ap.parse_args()
    client = OpenAI(base_url=args.base_url, api_key="none")
    model = client.models.list().data[0].id
    passages = "\n\n".join(f"<passage>{' '.join(p.split())}</passage>" for p in PASSAGES)
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


if __name__ == "__main__":
    main()
