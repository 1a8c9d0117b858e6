"""Helpers shared by the test modules: the tiny prompts, engines, the reference check and
the real server.  Fixtures live in ``conftest.py``."""

import contextlib
import gc

LOGPROB_ATOL = 1e-3
"""vLLM vs reference, fp32 tiny models: CPU attention kernels vs torch SDPA differ ~1e-6."""

PASSAGES = [
    "Paris is the capital of France and Berlin is the capital of Germany. "
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Python lists are mutable sequences; tuples are immutable sequences. "
    "Numbers like 12345 and 67890 appear in tables, logs and reports.",
    "Retrieval augmented generation adds passages from an index to the prompt. "
    "The encoder embeds each chunk and a projector maps it into the decoder space.",
]
QUESTION = "What is the capital of France?"


def load_reference_and_builder(ckpt):
    """The PyTorch reference and the prompt builder of one checkpoint."""
    from refrag_vllm import RefragPromptBuilder
    from refrag_vllm.reference import RefragReferenceModel

    return RefragReferenceModel.load(ckpt), RefragPromptBuilder.from_pretrained(ckpt)


def index_of(texts, folder, ckpt):
    """A passage index (``refrag-vllm index``'s build) of ``texts`` for ``ckpt``, in ``folder``."""
    import json

    from refrag_vllm.retrieval.index import build_index

    corpus = folder / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return build_index(corpus, folder / "index", ckpt, batch_size=8, progress=False)


def make_llm(model_dir, **kwargs):
    """:func:`refrag_vllm.engine.make_llm` with the tests' settings: fp32, a fixed seed and
    block size, the KV cache from ``VLLM_CPU_KVCACHE_SPACE``; ``kwargs`` override them."""
    from refrag_vllm.engine import make_llm as make_engine

    return make_engine(model_dir, **(dict(dtype="float32", max_num_seqs=8, seed=0, block_size=32,
                                          kv_cache_memory_bytes=None) | kwargs))


def shutdown_llm(llm):
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:
        pass
    del llm
    gc.collect()


def greedy(llm, prompts, max_tokens=8):
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, logprobs=0, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    result = []
    for o in outs:
        c = o.outputs[0]
        result.append((list(c.token_ids), [lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids)], o))
    return result


def assert_matches_reference(reference, prompt, vllm_result, max_tokens=8):
    tokens, logprobs, _ = vllm_result
    ref = reference.greedy_generate(prompt, max_tokens)
    assert tokens == ref.token_ids
    for a, b in zip(logprobs, ref.logprobs):
        assert abs(a - b) < LOGPROB_ATOL, (logprobs, ref.logprobs)


# ------------------------------------------------------------------ the real server
@contextlib.contextmanager
def serve_tiny(ckpt, tmp_path_factory, extra_flags=(), env=None):
    """``vllm serve ckpt`` on 127.0.0.1 with the test engine settings; yields its URL.
    ``env`` replaces the default (a 1 GiB CPU KV cache); a value of None unsets a variable."""
    from benchmarks.server import VllmServer

    flags = ["--enforce-eager", "--dtype", "float32", "--max-model-len", "8192", "--block-size", "32",
             "--max-num-seqs", "8", *extra_flags]
    with VllmServer(ckpt, flags, env={"VLLM_CPU_KVCACHE_SPACE": "1"} if env is None else env, timeout=300,
                    log_path=tmp_path_factory.mktemp("server") / "server.log") as srv:
        yield srv.url


def openai_client(url):
    from openai import OpenAI

    return OpenAI(base_url=url, api_key="none", max_retries=0, timeout=120)


EXACT = {"ignore_eos": True, "return_tokens_as_token_ids": True}
"""Request extras that make a server reply comparable token by token with the reference."""


def token_id(token: str) -> int:
    assert token.startswith("token_id:"), token
    return int(token.split(":", 1)[1])


def marked(passages, question=QUESTION):
    """A RAG user message: passage markup, then the question."""
    return "Answer the question using these passages.\n\n" + "\n\n".join(passages) + f"\n\nQuestion: {question}"


def chat_prompt(builder, content):
    text = builder.tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                 add_generation_prompt=True)
    return builder.render(text)


def check_chat(client, builder, reference, content, max_tokens=8):
    """One chat request: the server's greedy tokens and logprobs equal the reference's."""
    resp = client.chat.completions.create(
        model="refrag", messages=[{"role": "user", "content": content}], max_tokens=max_tokens,
        temperature=0, logprobs=True, extra_body=EXACT)
    ref = reference.greedy_generate(chat_prompt(builder, content), max_tokens)
    assert [token_id(t.token) for t in resp.choices[0].logprobs.content] == ref.token_ids
    got = [t.logprob for t in resp.choices[0].logprobs.content]
    assert len(got) == len(ref.logprobs)
    assert max(abs(a - b) for a, b in zip(got, ref.logprobs)) < LOGPROB_ATOL
    return resp


def assert_server_serves(client):
    """A good request succeeds (after a bad one)."""
    ok = client.chat.completions.create(model="refrag", max_tokens=2, messages=[
        {"role": "user", "content": f"<passage>{PASSAGES[0]}</passage> {QUESTION}"}])
    assert ok.choices[0].finish_reason in ("length", "stop")
