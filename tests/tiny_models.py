"""Tiny random Llama + BERT REFRAG checkpoints, built from scratch for the tests (no hub)."""

from __future__ import annotations

from pathlib import Path

import torch

CORPUS = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Paris is the capital of France and Berlin is the capital of Germany.",
    "Python lists are mutable sequences; tuples are immutable sequences.",
    "A compressed chunk occupies one decoder position instead of k tokens.",
    "Retrieval augmented generation adds passages from an index to the prompt.",
    "The encoder embeds each chunk and a projector maps it into the decoder space.",
    "Prefill cost grows with prompt length, and attention grows quadratically.",
    "Numbers like 12345 and 67890 appear in tables, logs and reports.",
] * 4

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_decoder_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    hf.chat_template = CHAT_TEMPLATE
    return hf


def make_encoder_tokenizer():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(
        vocab_size=300, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    )
    tok.train_from_iterator(CORPUS, trainer)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    return BertTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]",
    )


def make_tiny_checkpoint(out_dir: str | Path, *, k: int = 4, seed: int = 0, max_positions: int = 4096,
                         encoder: str = "bert", standardize_projector_inputs: bool = False,
                         projector_output_norm=None, encoder_pooling: str = "mean") -> Path:
    """A random tiny REFRAG checkpoint: Llama (hidden 64, head_dim 32) + BERT (hidden 32),
    or with ``encoder="decoder-layers:N"`` the decoder's own first N layers as the encoder.
    ``standardize_projector_inputs`` gives the projector random (non-trivial) input statistics;
    ``projector_output_norm`` and ``encoder_pooling`` are passed on (see ``assemble_model``)."""
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

    from refrag_vllm.checkpoint import assemble_checkpoint

    torch.manual_seed(seed)
    dec_tok = make_decoder_tokenizer()
    enc_tok = make_encoder_tokenizer()
    dec_cfg = LlamaConfig(
        vocab_size=len(dec_tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=max_positions,
        bos_token_id=dec_tok.bos_token_id, eos_token_id=dec_tok.eos_token_id,
        pad_token_id=dec_tok.pad_token_id, tie_word_embeddings=False, rope_theta=10000.0,
    )
    decoder = LlamaForCausalLM(dec_cfg)
    # Larger random weights give peaked, well-separated logits: greedy ties are unlikely.
    with torch.no_grad():
        decoder.model.embed_tokens.weight.normal_(0, 1.0)
        decoder.lm_head.weight.normal_(0, 0.3)
    if encoder.startswith("decoder-layers:"):
        from refrag_vllm.default_models import load_encoder

        stack, stack_tok = load_encoder(encoder, decoder, dec_tok)
        stats = _random_input_statistics(dec_cfg.hidden_size) if standardize_projector_inputs else None
        return assemble_checkpoint(
            out_dir, decoder, dec_tok, stack, stack_tok, chunk_size=k, max_chunks_per_item=64,
            dtype=torch.float32, seed=seed, weights=stats, projector_output_norm=projector_output_norm,
            encoder_pooling=encoder_pooling,
        )
    enc_cfg = BertConfig(
        vocab_size=len(enc_tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=128, pad_token_id=enc_tok.pad_token_id,
    )
    encoder = BertModel(enc_cfg, add_pooling_layer=False)
    return assemble_checkpoint(
        out_dir, decoder, dec_tok, encoder, enc_tok, chunk_size=k, max_chunks_per_item=64,
        dtype=torch.float32, seed=seed,
        weights=_random_input_statistics(enc_cfg.hidden_size) if standardize_projector_inputs else None,
        projector_output_norm=projector_output_norm, encoder_pooling=encoder_pooling,
    )


def _random_input_statistics(width: int) -> dict[str, torch.Tensor]:
    return {"projector.input_mean": torch.randn(width), "projector.input_inv_std": torch.rand(width) + 0.5}


def add_random_policy(ckpt: str | Path, out_dir: str | Path, seed: int = 0) -> Path:
    """A copy of a tiny checkpoint with a random (untrained) expansion policy."""
    import dataclasses

    from refrag_vllm.checkpoint import set_refrag_config, write_checkpoint
    from refrag_vllm.config import PolicyConfig
    from refrag_vllm.expansion_policy import ExpansionPolicy
    from refrag_vllm.reference import RefragReferenceModel
    from transformers import AutoTokenizer

    torch.manual_seed(seed)
    model = RefragReferenceModel.load(ckpt)
    policy_cfg = PolicyConfig(in_dim=model.refrag_config.encoder_hidden_size, d_model=16, num_layers=1, num_heads=2)
    model.expansion_policy = ExpansionPolicy(policy_cfg)
    set_refrag_config(model, dataclasses.replace(model.refrag_config, expansion_policy=policy_cfg))
    return write_checkpoint(model, out_dir, AutoTokenizer.from_pretrained(str(ckpt)), model.encoder_tokenizer)
