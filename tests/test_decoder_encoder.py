"""The decoder-stack encoder (``decoder-layers:N``): the decoder's own first layers as the
chunk encoder, served by vLLM with the same parity as the BERT encoder.  Its projector
standardizes its inputs (``ProjectorConfig.standardize_inputs``), with random statistics,
and scales its outputs to the token embeddings' norm (``output_norm``), and it pools each
chunk at an end-of-sequence token appended after it (``encoder_pooling = "eos"``; the BERT
modules cover ``mean``), so the parity tests also cover these options and show vLLM loads
the statistics.

One engine for the module (prefix caching on, chunked prefill in small steps)."""

import pytest
import torch

from helpers import (PASSAGES, QUESTION, assert_matches_reference, greedy, load_reference_and_builder, make_llm,
                     shutdown_llm)
from refrag_vllm import CompressedChunks


@pytest.fixture(scope="module")
def stack_ckpt(tmp_path_factory):
    from tiny_models import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-stack", k=16, max_positions=8192,
                                encoder="decoder-layers:1", standardize_projector_inputs=True,
                                projector_output_norm="tokens", encoder_pooling="eos")


@pytest.fixture(scope="module")
def stack_models(stack_ckpt):
    return load_reference_and_builder(stack_ckpt)


@pytest.fixture(scope="module")
def llm(stack_ckpt):
    llm = make_llm(stack_ckpt, enable_prefix_caching=True, max_num_batched_tokens=64,
                   enable_chunked_prefill=True)
    yield llm
    shutdown_llm(llm)


def test_encoder_is_the_decoders_first_layers(stack_models):
    """The encoder's token states are the decoder's layer-1 states (final norm applied)."""
    stack_reference, _ = stack_models
    ids = stack_reference.encoder_tokenizer(PASSAGES[0], return_tensors="pt")["input_ids"]
    cfg = stack_reference.refrag_config
    assert cfg.encoder["model_type"] == "llama" and cfg.encoder["num_hidden_layers"] == 1
    with torch.no_grad():
        enc = stack_reference.chunk_encoder.model(input_ids=ids).last_hidden_state
        dec = stack_reference.model(input_ids=ids, output_hidden_states=True).hidden_states[1]
        torch.testing.assert_close(enc, stack_reference.model.norm(dec), rtol=1e-5, atol=1e-5)
    # A separate copy: training the encoder leaves the decoder's layers as they are.
    assert (stack_reference.chunk_encoder.model.layers[0].self_attn.q_proj.weight.data_ptr()
            != stack_reference.model.layers[0].self_attn.q_proj.weight.data_ptr())


def test_eos_pooling_reads_an_end_token_appended_after_each_chunk(stack_models):
    """``eos`` pooling: a chunk's vector is the encoder's state at an EOS placed right after the
    chunk's own tokens, whatever the padding around it and the bucket it is encoded in."""
    from refrag_vllm.encoder import ChunkEncoder, tokenize_chunks

    stack_reference, _ = stack_models
    encoder = stack_reference.chunk_encoder
    assert stack_reference.refrag_config.encoder_pooling == "eos" and encoder.pooling == "eos"
    texts = [PASSAGES[0][: 7 * (i + 1)] for i in range(5)]  # five lengths: padding in every batch
    ids, mask = tokenize_chunks(stack_reference.encoder_tokenizer, texts, 64)
    eos = stack_reference.refrag_config.encoder["eos_token_id"]
    with torch.no_grad():
        one_batch = encoder(ids, mask)
        encoder.bucket_size = 2  # sorted into buckets of two, put back in order
        try:
            bucketed = encoder(ids, mask)
        finally:
            encoder.bucket_size = 32
        for i, n in enumerate(mask.sum(1).tolist()):
            alone = torch.cat([ids[i, :n], torch.tensor([eos])])[None]
            expected = encoder.model(input_ids=alone).last_hidden_state[0, -1]
            torch.testing.assert_close(one_batch[i], expected, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(bucketed[i], expected, rtol=1e-5, atol=1e-5)
    bert = {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
            "intermediate_size": 64, "vocab_size": 100}
    with pytest.raises(ValueError, match="eos pooling needs a decoder-stack encoder"):
        ChunkEncoder(bert, "eos")
    with pytest.raises(ValueError, match="encoder pooling must be one of"):
        ChunkEncoder(bert, "max")


def test_training_records_the_pooling_and_export_serves_it(stack_ckpt, tmp_path):
    """``run.encoder_pooling`` sets how the trained model reads its chunks; the delta records it
    and ``apply_delta`` gives the exported checkpoint the same."""
    import dataclasses

    from refrag_train.config import load_config
    from refrag_train.model import TrainingModel
    from refrag_vllm.delta import apply_delta, read_delta_meta
    from refrag_vllm.reference import RefragReferenceModel

    cfg = load_config("tiny")
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, encoder_pooling="mean"))
    model = TrainingModel(cfg, stack_ckpt)  # the base checkpoint pools at eos; the run says mean
    assert model.refrag.refrag_config.encoder_pooling == "mean" and model.refrag.chunk_encoder.pooling == "mean"
    delta = model.save_delta(tmp_path / "delta")
    assert read_delta_meta(delta)["encoder_pooling"] == "mean"
    served = apply_delta(RefragReferenceModel.load(stack_ckpt, dtype=torch.float32), delta)
    assert served.refrag_config.encoder_pooling == "mean" and served.chunk_encoder.pooling == "mean"


def test_projector_standardizes_with_its_checkpoint_statistics(stack_models):
    stack_reference, _ = stack_models
    projector = stack_reference.projector
    assert stack_reference.refrag_config.projector.standardize_inputs
    x = torch.randn(3, projector.fc1.in_features)
    expected = projector.fc2(projector.act(projector.fc1((x - projector.input_mean) * projector.input_inv_std)))
    norm = stack_reference.refrag_config.projector.output_norm
    token_norm = stack_reference.get_input_embeddings().weight.detach().norm(dim=-1).mean()
    assert norm == pytest.approx(float(token_norm), rel=1e-3)
    torch.testing.assert_close(projector(x), expected * norm / expected.norm(dim=-1, keepdim=True))
    assert not torch.allclose(projector.input_mean, torch.zeros_like(projector.input_mean))


@pytest.mark.engine
def test_text_chunks_match_reference(llm, stack_models):
    stack_reference, stack_builder = stack_models
    prompt = stack_builder.build(QUESTION, PASSAGES)
    assert_matches_reference(stack_reference, prompt, greedy(llm, [prompt])[0])


@pytest.mark.engine
def test_encoder_vectors_and_mixed_input_match_reference(llm, stack_models):
    stack_reference, stack_builder = stack_models
    texts = [stack_builder.tokenizer.decode(c) for c in stack_builder.chunk_passage(PASSAGES[1])]
    with torch.no_grad():
        enc = stack_reference.encode_texts(texts)
    prompt = stack_builder.build(QUESTION, [PASSAGES[0], CompressedChunks.from_encoder_embeds(enc)],
                                 expand=[[1], []])
    result = greedy(llm, [prompt])[0]
    assert_matches_reference(stack_reference, prompt, result)
    same_as_text = greedy(llm, [stack_builder.build(QUESTION, PASSAGES[:2], expand=[[1], []])])[0]
    assert result[0] == same_as_text[0]


@pytest.mark.engine
def test_prefix_cache_hit_matches_reference(llm, stack_models):
    stack_reference, stack_builder = stack_models
    prompt = stack_builder.build(QUESTION, [" ".join(PASSAGES) + " Cached once."])
    first, second = greedy(llm, [prompt])[0], greedy(llm, [prompt])[0]
    assert second[2].num_cached_tokens > 0
    assert first[0] == second[0]
    assert_matches_reference(stack_reference, prompt, second)
