"""The real OpenAI-compatible server (`vllm serve`) on 127.0.0.1, driven by the stock openai client."""


import pytest
import torch

from conftest import LOGPROB_ATOL, PASSAGES, QUESTION
from refrag_vllm import CompressedChunks, encode_embeds

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tiny_ckpt, tmp_path_factory):
    from benchmarks.server import VllmServer

    flags = ["--enforce-eager", "--dtype", "float32", "--max-model-len", "8192", "--block-size", "32",
             "--max-num-seqs", "8"]
    with VllmServer(tiny_ckpt, flags, env={"VLLM_CPU_KVCACHE_SPACE": "1"}, timeout=300,
                    log_path=tmp_path_factory.mktemp("server") / "server.log") as srv:
        yield srv.url


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server, api_key="none", max_retries=0, timeout=120)


EXACT = {"ignore_eos": True, "return_tokens_as_token_ids": True}


def _token_id(token: str) -> int:
    assert token.startswith("token_id:"), token
    return int(token.split(":", 1)[1])


def _marked(passages):
    return "Answer the question using these passages.\n\n" + "\n\n".join(passages) + f"\n\nQuestion: {QUESTION}"


def _chat_prompt(builder, content):
    text = builder.tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                 add_generation_prompt=True)
    return builder.render(text)


def _check_chat(client, builder, reference, content, max_tokens=8):
    resp = client.chat.completions.create(
        model="refrag", messages=[{"role": "user", "content": content}], max_tokens=max_tokens,
        temperature=0, logprobs=True, extra_body=EXACT)
    ref = reference.greedy_generate(_chat_prompt(builder, content), max_tokens)
    assert [_token_id(t.token) for t in resp.choices[0].logprobs.content] == ref.token_ids
    got = [t.logprob for t in resp.choices[0].logprobs.content]
    assert len(got) == len(ref.logprobs)
    assert max(abs(a - b) for a, b in zip(got, ref.logprobs)) < LOGPROB_ATOL
    return resp


def test_chat_with_text_passages(client, builder, reference):
    content = _marked([f"<passage>{p}</passage>" for p in PASSAGES])
    resp = _check_chat(client, builder, reference, content)
    # The passages were compressed: far fewer prompt positions than their tokens.
    n_text = sum(len(builder.tokenizer(p)["input_ids"]) for p in PASSAGES)
    assert resp.usage.prompt_tokens < n_text


def test_chat_mixed_expanded_and_precomputed(client, builder, reference):
    texts = [builder.tokenizer.decode(c) for c in builder.chunk_passage(PASSAGES[1])]
    with torch.no_grad():
        proj = reference.project_item(CompressedChunks.from_texts(texts))
        enc = reference.encode_texts(texts)
    content = _marked([f'<passage expand="1">{PASSAGES[0]}</passage>',
                       f'<passage format="projected">{encode_embeds(proj)}</passage>',
                       f'<passage format="encoder">{encode_embeds(enc)}</passage>'])
    _check_chat(client, builder, reference, content)


def test_completions_with_passages(client, builder, reference):
    prompt = _marked([f"<passage>{p}</passage>" for p in PASSAGES])
    resp = client.completions.create(model="refrag", prompt=prompt, max_tokens=8, temperature=0, logprobs=1,
                                     extra_body=EXACT)
    ref = reference.greedy_generate(builder.render(prompt, add_special_tokens=True), 8)
    assert [_token_id(t) for t in resp.choices[0].logprobs.tokens] == ref.token_ids
    got = resp.choices[0].logprobs.token_logprobs
    assert max(abs(a - b) for a, b in zip(got, ref.logprobs)) < LOGPROB_ATOL


def test_streaming_equals_non_streaming(client):
    messages = [{"role": "user", "content": _marked([f"<passage>{p}</passage>" for p in PASSAGES])}]
    full = client.chat.completions.create(model="refrag", messages=messages, max_tokens=12, temperature=0,
                                          extra_body={"ignore_eos": True})
    stream = client.chat.completions.create(model="refrag", messages=messages, max_tokens=12, temperature=0,
                                            stream=True, extra_body={"ignore_eos": True})
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert len([p for p in pieces if p]) > 1
    assert "".join(pieces) == full.choices[0].message.content


BAD_INPUTS = {
    "wrong width": (f'<passage format="projected">{encode_embeds(torch.zeros(3, 65))}</passage>', "width"),
    "NaN": (f'<passage format="projected">{encode_embeds(torch.full((2, 64), float("nan")))}</passage>', "NaN"),
    "inf": (f'<passage format="encoder">{encode_embeds(torch.full((2, 32), float("inf")))}</passage>', "infinite"),
    "wrong dtype": (f'<passage format="projected">{encode_embeds(torch.ones(2, 64, dtype=torch.int32))}</passage>', "dtype"),
    "malformed payload": ('<passage format="projected">not base64 at all!</passage>', "base64"),
    "not safetensors": ('<passage format="projected">aGVsbG8gd29ybGQ=</passage>', "safetensors"),
    "too many chunks": (f'<passage format="projected">{encode_embeds(torch.zeros(9000, 64))}</passage>', "maximum context length"),
    "empty passage": ("<passage>   </passage>", "empty"),
    "placeholder without data": ("tell me about <|refrag_chunk|> please", "placeholder"),
    "unknown field": ('<passage source="x">some text</passage>', "unknown field"),
    "unknown format": ('<passage format="pickle">gASV</passage>', "unknown format"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_is_400_and_server_survives(client, name):
    import openai

    content, expected = BAD_INPUTS[name]
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="refrag", messages=[{"role": "user", "content": content}],
                                       max_tokens=4)
    assert expected.lower() in str(err.value).lower()
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="refrag", prompt=content, max_tokens=4)
    # The server keeps serving.
    ok = client.chat.completions.create(model="refrag", max_tokens=2, messages=[
        {"role": "user", "content": f"<passage>{PASSAGES[0]}</passage> {QUESTION}"}])
    assert ok.choices[0].finish_reason in ("length", "stop")
