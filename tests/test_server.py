"""The real OpenAI-compatible server (`vllm serve`) on 127.0.0.1, driven by the stock openai client."""


import pytest
import torch

from helpers import EXACT, LOGPROB_ATOL, PASSAGES, assert_server_serves, check_chat, marked, openai_client, serve_tiny, token_id
from refrag_vllm import CompressedChunks, encode_embeds

pytestmark = [pytest.mark.slow, pytest.mark.engine]


@pytest.fixture(scope="module")
def server(tiny_ckpt, tmp_path_factory):
    # Precomputed vectors are opt-in (vLLM's --enable-mm-embeds); this server takes them.
    with serve_tiny(tiny_ckpt, tmp_path_factory, ["--enable-mm-embeds"]) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server)


def test_chat_with_text_passages(client, builder, reference):
    content = marked([f"<passage>{p}</passage>" for p in PASSAGES])
    resp = check_chat(client, builder, reference, content)
    # The passages were compressed: far fewer prompt positions than their tokens.
    n_text = sum(len(builder.tokenizer(p)["input_ids"]) for p in PASSAGES)
    assert resp.usage.prompt_tokens < n_text


def test_chat_mixed_expanded_and_precomputed(client, builder, reference):
    texts = [builder.tokenizer.decode(c) for c in builder.chunk_passage(PASSAGES[1])]
    with torch.no_grad():
        proj = reference.project_item(CompressedChunks.from_texts(texts))
        enc = reference.encode_texts(texts)
    content = marked([f'<passage expand="1">{PASSAGES[0]}</passage>',
                       f'<passage format="projected">{encode_embeds(proj)}</passage>',
                       f'<passage format="encoder">{encode_embeds(enc)}</passage>'])
    check_chat(client, builder, reference, content)


def test_completions_with_passages(client, builder, reference):
    prompt = marked([f"<passage>{p}</passage>" for p in PASSAGES])
    resp = client.completions.create(model="refrag", prompt=prompt, max_tokens=8, temperature=0, logprobs=1,
                                     extra_body=EXACT)
    ref = reference.greedy_generate(builder.render(prompt, add_special_tokens=True), 8)
    assert [token_id(t) for t in resp.choices[0].logprobs.tokens] == ref.token_ids
    got = resp.choices[0].logprobs.token_logprobs
    assert max(abs(a - b) for a, b in zip(got, ref.logprobs)) < LOGPROB_ATOL


def test_streaming_equals_non_streaming(client):
    messages = [{"role": "user", "content": marked([f"<passage>{p}</passage>" for p in PASSAGES])}]
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
    assert_server_serves(client)
