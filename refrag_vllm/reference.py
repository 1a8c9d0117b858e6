"""The PyTorch/transformers reference: exactly the forward pass the vLLM model runs.

``RefragReferenceModel`` *is* a transformers ``LlamaForCausalLM`` with three extra
submodules, so its ``state_dict`` names are the checkpoint's names:

* ``model.*`` / ``lm_head.*``  -- the Llama decoder (plain HF names);
* ``chunk_encoder.model.*``    -- the HF BERT/RoBERTa encoder;
* ``projector.fc1/fc2.*``      -- the projector MLP;
* ``expansion_policy.*``       -- the optional selective-expansion policy.

Training uses it, the parity tests use it, and ``refrag-vllm build`` writes
checkpoints with its ``save_pretrained``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from .chunks import CompressedChunks
from .config import ARCHITECTURE, ENCODER_TOKENIZER_DIR, MODALITY, RefragConfig, refrag_config_from_hf
from .encoder import ChunkEncoder, tokenize_chunks
from .projector import ChunkProjector


class RefragReferenceModel(LlamaForCausalLM):
    """Llama decoder + chunk encoder + projector, in plain PyTorch."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__(config)
        self.refrag_config: RefragConfig = refrag_config_from_hf(config)
        cfg = self.refrag_config
        self.chunk_encoder = ChunkEncoder(cfg.encoder, cfg.encoder_pooling)
        self.projector = ChunkProjector(cfg.projector)
        self.encoder_tokenizer = None  # set by from_pretrained / set_encoder_tokenizer
        config.architectures = [ARCHITECTURE]

    # ------------------------------------------------------------ loading
    @classmethod
    def load(cls, model_dir: str | Path, dtype: torch.dtype = torch.float32) -> "RefragReferenceModel":
        from transformers import AutoTokenizer

        model = cls.from_pretrained(str(model_dir), dtype=dtype)
        model.encoder_tokenizer = AutoTokenizer.from_pretrained(str(Path(model_dir) / ENCODER_TOKENIZER_DIR))
        model.eval()
        return model

    # ---------------------------------------------------------- embedding
    def encode_texts(self, texts) -> torch.Tensor:
        """Chunk texts -> encoder vectors ``(n, encoder_hidden)``."""
        input_ids, mask = tokenize_chunks(self.encoder_tokenizer, texts, self.refrag_config.encoder_max_tokens)
        return self.chunk_encoder(input_ids.to(self.device), mask.to(self.device))

    def project_item(self, item: CompressedChunks) -> torch.Tensor:
        """One compressed-chunk item -> ``(num_chunks, hidden)`` decoder inputs."""
        dtype = self.projector.fc1.weight.dtype
        if item.kind == "projected":
            return item.embeds.to(self.device, self.dtype)
        if item.kind == "encoder":
            enc = item.embeds.to(self.device, dtype)
        else:
            enc = self.encode_texts(item.texts).to(dtype)
        return self.projector(enc).to(self.dtype)

    def embed_prompt(self, prompt: dict) -> torch.Tensor:
        """vLLM-style prompt dict -> ``(1, positions, hidden)`` inputs_embeds.

        Each placeholder token in ``prompt_token_ids`` stands for one item and is
        replaced by that item's ``num_chunks`` projected vectors.
        """
        ids = list(prompt["prompt_token_ids"])
        items = list(prompt.get("multi_modal_data", {}).get(MODALITY, []))
        pid = self.refrag_config.placeholder_token_id
        n_placeholders = sum(1 for t in ids if t == pid)
        if n_placeholders != len(items):
            raise ValueError(f"{n_placeholders} placeholder tokens for {len(items)} items")
        embed = self.get_input_embeddings()
        pieces: list[torch.Tensor] = []
        run: list[int] = []
        it = iter(items)
        for t in ids + [None]:
            if t is not None and t != pid:
                run.append(t)
                continue
            if run:
                pieces.append(embed(torch.tensor(run, device=self.device)))
                run = []
            if t == pid:
                pieces.append(self.project_item(next(it)))
        return torch.cat(pieces).unsqueeze(0)

    # ----------------------------------------------------------- generate
    @torch.no_grad()
    def greedy_generate(self, prompt: dict, max_new_tokens: int) -> "GreedyOutput":
        """Greedy decoding with the chosen tokens' log-probabilities (fp32)."""
        embeds = self.embed_prompt(prompt)
        out = self(inputs_embeds=embeds, use_cache=True)
        tokens, logprobs = [], []
        for _ in range(max_new_tokens):
            lp = torch.log_softmax(out.logits[0, -1].float(), -1)
            tok = int(lp.argmax())
            tokens.append(tok)
            logprobs.append(float(lp[tok]))
            nxt = self.get_input_embeddings()(torch.tensor([[tok]], device=self.device))
            out = self(inputs_embeds=nxt, past_key_values=out.past_key_values, use_cache=True)
        return GreedyOutput(tokens, logprobs)


@dataclass
class GreedyOutput:
    token_ids: list[int]
    logprobs: list[float]
