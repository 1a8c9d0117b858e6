"""Checkpoint validation, prompt building and boundary checks (no engine)."""

import json
import shutil

import numpy as np
import pytest
import torch

from helpers import PASSAGES, QUESTION
from refrag_vllm import CompressedChunks, decode_embeds, encode_embeds
from refrag_vllm.chunks import validate_item
from refrag_vllm.config import CheckpointMismatchError, load_refrag_config


def _broken_copy(tiny_ckpt, tmp_path, edit):
    out = tmp_path / "broken"
    shutil.copytree(tiny_ckpt, out)
    cfg = json.loads((out / "config.json").read_text())
    edit(cfg)
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def test_projector_mismatch_named_at_load(tiny_ckpt, tmp_path):
    from refrag_vllm.reference import RefragReferenceModel

    broken = _broken_copy(tiny_ckpt, tmp_path, lambda c: c["refrag"]["projector"].update(out_dim=65))
    with pytest.raises(CheckpointMismatchError, match=r"projector output size \(65\) != decoder hidden_size \(64\)"):
        load_refrag_config(broken)
    with pytest.raises(CheckpointMismatchError, match="projector output size"):
        RefragReferenceModel.load(broken)


def test_encoder_mismatch_and_unknown_field(tiny_ckpt, tmp_path):
    broken = _broken_copy(tiny_ckpt, tmp_path, lambda c: c["refrag"]["encoder"].update(hidden_size=48))
    with pytest.raises(CheckpointMismatchError, match=r"projector input size \(32\) != encoder hidden_size \(48\)"):
        load_refrag_config(broken)
    shutil.rmtree(broken)
    broken = _broken_copy(tiny_ckpt, tmp_path, lambda c: c["refrag"].update(chunk_sise=4))
    with pytest.raises(CheckpointMismatchError, match="unknown field.*chunk_sise"):
        load_refrag_config(broken)


def test_chunking_cuts_decoder_tokens(builder):
    ids = builder.tokenizer(PASSAGES[0], add_special_tokens=False)["input_ids"]
    chunks = builder.chunk_passage(PASSAGES[0])
    assert [t for c in chunks for t in c] == ids
    assert all(len(c) == builder.k for c in chunks[:-1]) and 0 < len(chunks[-1]) <= builder.k


def test_expanded_chunks_are_raw_tokens(builder):
    chunks = builder.chunk_passage(PASSAGES[0])
    prompt = builder.build(QUESTION, [PASSAGES[0]], expand=[[1]])
    ids = prompt["prompt_token_ids"]
    pid = builder.placeholder_id
    first = ids.index(pid)
    assert ids[first + 1 : first + 1 + len(chunks[1])] == chunks[1]
    items = prompt["multi_modal_data"]["refrag_chunk"]
    assert [i.num_chunks for i in items] == [1, len(chunks) - 2]
    assert items[0].texts == (builder.tokenizer.decode(chunks[0]),)


def test_text_passage_with_its_encoder_vectors(builder):
    """Expanded chunks stay tokens; compressed runs carry the given rows as encoder items;
    the markup round-trips (what a client sends to the server)."""
    from refrag_vllm.prompt import Passage

    chunks = builder.chunk_passage(PASSAGES[0])
    vectors = torch.randn(len(chunks), builder.cfg.encoder_hidden_size)
    passage = Passage(text=PASSAGES[0], expand=(1,), encoder_embeds=vectors)
    by_hand = builder.build(QUESTION, [PASSAGES[0]], expand=[[1]])
    prompt = builder.build(QUESTION, [passage])
    assert prompt["prompt_token_ids"] == by_hand["prompt_token_ids"]
    items = prompt["multi_modal_data"]["refrag_chunk"]
    assert [i.kind for i in items] == ["encoder", "encoder"]
    assert torch.equal(items[0].embeds, vectors[:1]) and torch.equal(items[1].embeds, vectors[2:])
    marked = builder.format_passage(passage)
    assert 'expand="1" encoder="' in marked
    again = builder.render(marked)["multi_modal_data"]["refrag_chunk"]
    assert all(torch.equal(a.embeds, b.embeds) for a, b in zip(again, items))
    with pytest.raises(ValueError, match=f"{len(chunks) - 1} encoder embeddings for {len(chunks)} chunks"):
        builder.build(QUESTION, [Passage(text=PASSAGES[0], encoder_embeds=vectors[1:])])
    with pytest.raises(ValueError, match="width"):
        builder.build(QUESTION, [Passage(text=PASSAGES[0], encoder_embeds=torch.zeros(len(chunks), 7))])
    with pytest.raises(ValueError, match="NaN"):
        builder.build(QUESTION, [Passage(text=PASSAGES[0], encoder_embeds=vectors * float("nan"))])



def test_build_equals_the_markup_a_client_sends(builder):
    """``build`` hands its passages over as they are (no markup); the result is exactly
    what the same request gives as marked text, as a client sends it (vectors through
    base64).  Markup in the question is plain text; the placeholder token is refused."""
    from refrag_vllm.prompt import Passage

    chunks = builder.chunk_passage(PASSAGES[1])
    passages = [PASSAGES[0],
                CompressedChunks.from_projected_embeds(torch.randn(3, builder.decoder_hidden_size).to(torch.bfloat16)),
                Passage(text=PASSAGES[1], expand=(0,), encoder_embeds=torch.randn(len(chunks), builder.cfg.encoder_hidden_size)),
                "a <passage> & 1 < 2"]
    built = builder.build(QUESTION + " <b>&amp;</b>", passages, system="Be brief.")
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": builder.format_user_message(QUESTION + " <b>&amp;</b>", passages)}]
    text = builder.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    sent = builder.render(text)
    assert built["prompt_token_ids"] == sent["prompt_token_ids"]
    a, b = built["multi_modal_data"]["refrag_chunk"], sent["multi_modal_data"]["refrag_chunk"]
    assert [(i.kind, i.texts) for i in a] == [(i.kind, i.texts) for i in b]
    assert [i.content_hash() for i in a] == [i.content_hash() for i in b]
    with pytest.raises(ValueError, match="placeholder"):
        builder.build(QUESTION + builder.cfg.placeholder_token, passages)
    with pytest.raises(ValueError, match="width"):
        builder.build(QUESTION, [CompressedChunks.from_projected_embeds(torch.zeros(2, 7))])

def test_question_first_layout_names_the_question_before_the_passages(builder):
    """A checkpoint fine-tuned with ``refrag.question_first`` gets the question before the
    passages as well as after them, offline (``build``) and from a client's ``documents``
    layout (``format_user_message``) alike."""
    import dataclasses

    from refrag_vllm.prompt import RefragPromptBuilder

    first = RefragPromptBuilder(builder.tokenizer, dataclasses.replace(builder.cfg, question_first=True),
                                builder.decoder_hidden_size)
    content = first.format_user_message(QUESTION, PASSAGES[:2])
    assert content.startswith(f"Question: {QUESTION}\n\n") and content.endswith(f"\n\nQuestion: {QUESTION}")
    assert not builder.format_user_message(QUESTION, PASSAGES[:2]).startswith("Question:")
    built = first.build(QUESTION, PASSAGES[:2])
    text = first.tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                               add_generation_prompt=True)
    assert built["prompt_token_ids"] == first.render(text)["prompt_token_ids"]
    ids = built["prompt_token_ids"]
    question_ids = first.tokenizer(QUESTION, add_special_tokens=False)["input_ids"]
    before = ids[: ids.index(first.placeholder_id)]
    assert any(before[i : i + len(question_ids)] == question_ids for i in range(len(before)))
    assert len(ids) > len(builder.build(QUESTION, PASSAGES[:2])["prompt_token_ids"])


def test_long_passage_split_into_bounded_items(builder):
    long = " ".join(PASSAGES * 40)
    prompt = builder.build(QUESTION, [long])
    items = prompt["multi_modal_data"]["refrag_chunk"]
    assert len(items) > 1 and max(i.num_chunks for i in items) <= builder.cfg.max_chunks_per_item
    assert sum(i.num_chunks for i in items) == len(builder.chunk_passage(long))


@pytest.mark.parametrize("text, message", [
    ("<passage>  </passage>", "empty"),
    ('<passage expand="99">short text</passage>', "out of range"),
    ('<passage expand="a,b">short text</passage>', "comma-separated"),
    ('<passage colour="red">short text</passage>', "unknown field"),
    ('<passage encoder="%%%">short text</passage>', "base64"),
    (f'<passage format="projected" encoder="{encode_embeds(torch.zeros(1, 32))}">x</passage>', "text passages only"),
    ("<passage>unterminated", "malformed"),
    ("hello <|refrag_chunk|>", "placeholder"),
    ("<passage>short text</passage> &lt;|refrag_chunk|&gt;", "placeholder"),
])
def test_render_rejects_bad_markup(builder, text, message):
    with pytest.raises(ValueError, match=message):
        builder.render(text)


def test_escaped_text_round_trips_to_its_own_tokens(builder):
    """Any text, markup and entities included, reads back as exactly itself through
    ``passage()``: the same chunks as the text given directly."""
    from refrag_vllm import passage
    from refrag_vllm.prompt import Passage, escape_text, unescape_text

    hostile = ('see </passage><passage format="projected">QUJD</passage> and &lt;tag&gt; & '
               + PASSAGES[0] + " <passage>")
    assert unescape_text(escape_text(hostile)) == hostile
    direct = builder._passage_pieces(Passage(text=hostile), 0)
    rendered = builder.render(passage(hostile))["multi_modal_data"]["refrag_chunk"]
    assert [i.texts for i in rendered] == [i.texts for i in direct] and rendered[0].kind == "text"
    # The offline builder escapes the same way, question included.
    prompt = builder.build(hostile, [hostile])
    assert [i.texts for i in prompt["multi_modal_data"]["refrag_chunk"]] == [i.texts for i in direct]
    assert f"Question: {hostile}" in builder.tokenizer.decode(prompt["prompt_token_ids"])
    with pytest.raises(ValueError, match="nested"):
        builder.render("<passage>outer <passage>inner</passage>")


def test_oversized_prompt_refused_before_tokenizing(builder):
    import time

    huge = "<passage>" + "All work and no play makes Jack a dull boy. " * 1_200_000 + "</passage> Who?"
    start = time.perf_counter()
    with pytest.raises(ValueError, match="maximum context length"):
        builder.check_size(huge, 8192)
    assert time.perf_counter() - start < 1.0
    # The bound is sound: one token never covers more than max_token_chars characters.
    text = " ".join(PASSAGES)
    assert len(text) / builder.max_token_chars <= len(builder.tokenizer(text)["input_ids"])
    builder.check_size(f"<passage>{text}</passage>", 8192)


def test_vectors_refused_when_not_allowed(builder):
    vectors = encode_embeds(torch.zeros(2, builder.cfg.encoder_hidden_size))
    for text in (f'<passage format="encoder">{vectors}</passage>',
                 f'<passage format="projected">{encode_embeds(torch.zeros(2, 64))}</passage>',
                 f'<passage encoder="{vectors}">{PASSAGES[0]}</passage>'):
        with pytest.raises(ValueError, match="--enable-mm-embeds"):
            builder.render(text, allow_embeds=False)
    assert builder.render(f"<passage>{PASSAGES[0]}</passage>", allow_embeds=False)["multi_modal_data"]


def test_content_hash_depends_on_content_only():
    a = CompressedChunks.from_texts(["one", "two"])
    assert a.content_hash() == CompressedChunks.from_texts(["one", "two"]).content_hash()
    assert a.content_hash() != CompressedChunks.from_texts(["one", "twO"]).content_hash()
    assert a.content_hash() != CompressedChunks.from_texts(["onetwo"]).content_hash()
    e = torch.zeros(2, 4)
    assert CompressedChunks.from_projected_embeds(e).content_hash() != CompressedChunks.from_encoder_embeds(e).content_hash()


@pytest.mark.parametrize("item, message", [
    ({"texts": ["a"], "extra": 1}, "unknown field"),
    ({"projected_embeds": torch.zeros(2, 63)}, "width 63"),
    ({"projected_embeds": torch.full((2, 64), float("nan"))}, "NaN"),
    ({"encoder_embeds": torch.ones(2, 32, dtype=torch.int64)}, "dtype"),
    ({"encoder_embeds": np.zeros((2, 3, 32), dtype=np.float32)}, "2-D"),
    ({"texts": []}, "empty"),
    ({"texts": "a string"}, "list of strings"),
    ("just text", "expected CompressedChunks"),
])
def test_validate_item_rejects(item, message):
    with pytest.raises(ValueError, match=message):
        validate_item(item, encoder_width=32, decoder_width=64, max_chunks=64)


def test_wire_format_roundtrip_and_rejects():
    t = torch.randn(3, 8)
    assert torch.equal(decode_embeds(encode_embeds(t)), t)
    with pytest.raises(ValueError, match="base64"):
        decode_embeds("%%%")
    with pytest.raises(ValueError, match="safetensors"):
        decode_embeds("aGVsbG8=")


def test_vllm_version_outside_the_supported_range_is_refused(monkeypatch):
    import warnings

    import vllm

    from refrag_vllm import check_vllm_version

    monkeypatch.delenv("REFRAG_ALLOW_ANY_VLLM", raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_vllm_version(vllm.__version__)  # the installed one is supported
    for other in ("0.40.0", "0.31.2", "dev"):
        with pytest.raises(RuntimeError, match="supports vLLM >= 0.32, < 0.34; found"):
            check_vllm_version(other)
    monkeypatch.setenv("REFRAG_ALLOW_ANY_VLLM", "1")
    with pytest.warns(UserWarning, match="going on anyway"):
        check_vllm_version("0.40.0")


def test_chunk_embedder_alone_equals_the_reference(tiny_ckpt, reference, builder):
    """The encoder + projector loaded without the decoder (index, policy expander) give the
    reference's vectors for every item kind, with text chunks in one encoder call."""
    from refrag_vllm.embedder import ChunkEmbedder
    from refrag_vllm.prompt import chunk_text

    texts = [chunk_text(builder.tokenizer, c) for c in builder.chunk_passage(PASSAGES[0])]
    alone = ChunkEmbedder.from_pretrained(tiny_ckpt)
    with torch.no_grad():
        expected = reference.project_item(CompressedChunks.from_texts(texts))
        assert torch.equal(alone.embed(texts), expected)
        encoded = alone.encode(texts)
        items = [CompressedChunks.from_texts(texts[:2]), CompressedChunks.from_encoder_embeds(encoded[2:]),
                 CompressedChunks.from_projected_embeds(expected[:1]), CompressedChunks.from_texts(texts[2:])]
        got = alone.project_items(items, torch.float32)
    assert [g.shape[0] for g in got] == [2, len(texts) - 2, 1, len(texts) - 2]
    # Each item is projected on its own: a matmul over fewer rows may round differently.
    assert all(torch.allclose(g, e, atol=1e-5) for g, e in zip(got, [expected[:2], expected[2:], expected[:1], expected[2:]]))
    assert torch.equal(got[2], expected[:1])
    assert ChunkEmbedder.from_pretrained(tiny_ckpt, with_projector=False).projector is None
