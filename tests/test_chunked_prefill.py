"""Chunked prefill (a token budget far smaller than the prompt) does not change results."""

import pytest
import torch

from helpers import PASSAGES, QUESTION, assert_matches_reference, greedy, make_llm, shutdown_llm
from refrag_vllm import CompressedChunks

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def llm(tiny_ckpt):
    llm = make_llm(tiny_ckpt, max_num_batched_tokens=32, enable_chunked_prefill=True, enable_prefix_caching=False)
    yield llm
    shutdown_llm(llm)


def test_chunked_prefill_matches_reference(llm, builder, reference):
    prompt = builder.build(QUESTION, [" ".join(PASSAGES)] + PASSAGES, expand=[[2, 5], [], [1], []])
    assert builder.num_positions(prompt) > 2 * 32  # several prefill steps, items cut across steps
    assert_matches_reference(reference, prompt, greedy(llm, [prompt])[0])


def test_chunked_prefill_projected_vectors(llm, builder, reference):
    texts = [builder.tokenizer.decode(c) for c in builder.chunk_passage(" ".join(PASSAGES * 2))]
    with torch.no_grad():
        proj = reference.project_item(CompressedChunks.from_texts(texts))
    prompt = builder.build(QUESTION, [CompressedChunks.from_projected_embeds(proj)])
    assert builder.num_positions(prompt) > 32
    assert_matches_reference(reference, prompt, greedy(llm, [prompt])[0])
