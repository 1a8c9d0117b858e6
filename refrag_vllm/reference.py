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
from .embedder import ChunkEmbedder
from .encoder import ChunkEncoder
from .expansion_policy import ExpansionPolicy
from .projector import ChunkProjector


class RefragReferenceModel(LlamaForCausalLM):
    """Llama decoder + chunk encoder + projector, in plain PyTorch."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__(config)
        self.refrag_config: RefragConfig = refrag_config_from_hf(config)
        cfg = self.refrag_config
        self.chunk_encoder = ChunkEncoder(cfg.encoder, cfg.encoder_pooling)
        self.projector = ChunkProjector(cfg.projector)
        self.expansion_policy = ExpansionPolicy(cfg.expansion_policy) if cfg.expansion_policy else None
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
    @property
    def chunk_embedder(self) -> ChunkEmbedder:
        """This model's encoder, encoder tokenizer and projector (shared, not copied)."""
        return ChunkEmbedder(self.chunk_encoder, self.projector, self.encoder_tokenizer,
                             self.refrag_config.encoder_max_tokens)

    def encode_texts(self, texts) -> torch.Tensor:
        """Chunk texts -> encoder vectors ``(n, encoder_hidden)``."""
        return self.chunk_embedder.encode(texts)

    def project_item(self, item: CompressedChunks) -> torch.Tensor:
        """One compressed-chunk item -> ``(num_chunks, hidden)`` decoder inputs."""
        return self.project_items([item])[0]

    def project_items(self, items: list[CompressedChunks]) -> list[torch.Tensor]:
        """Items -> ``[(num_chunks, hidden)]``; all text chunks go through ONE encoder call."""
        return self.chunk_embedder.project_items(items, self.dtype)

    def embed_prompts(self, prompts: list[dict], projected: list[torch.Tensor] | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """vLLM-style prompt dicts -> ``inputs_embeds (B, T, hidden)``, ``attention_mask (B, T)``.

        Each placeholder token in ``prompt_token_ids`` stands for one item and is
        replaced by that item's ``num_chunks`` projected vectors.  Sequences are
        right-padded to the longest (``T``); ``attention_mask`` is 1 on real positions.
        ``projected``: the prompts' items already through :meth:`project_items`, in order,
        when the caller needs the vectors too (a training loss on them); by default the
        items are projected here.
        """
        pid = self.refrag_config.placeholder_token_id
        all_items: list[CompressedChunks] = []
        for prompt in prompts:
            ids = prompt["prompt_token_ids"]
            items = list(prompt.get("multi_modal_data", {}).get(MODALITY, []))
            n_placeholders = sum(1 for t in ids if t == pid)
            if n_placeholders != len(items):
                raise ValueError(f"{n_placeholders} placeholder tokens for {len(items)} items")
            all_items += items
        if projected is None:
            projected = self.project_items(all_items)
        elif len(projected) != len(all_items):
            raise ValueError(f"{len(projected)} projected items for {len(all_items)} items")
        projected = iter(projected)
        embed = self.get_input_embeddings()
        rows: list[torch.Tensor] = []
        for prompt in prompts:
            pieces: list[torch.Tensor] = []
            run: list[int] = []
            for t in list(prompt["prompt_token_ids"]) + [None]:
                if t is not None and t != pid:
                    run.append(int(t))
                    continue
                if run:
                    pieces.append(embed(torch.tensor(run, device=self.device)))
                    run = []
                if t == pid:
                    pieces.append(next(projected))
            rows.append(torch.cat(pieces))
        lengths = [r.shape[0] for r in rows]
        width = max(lengths)
        inputs_embeds = torch.zeros(len(rows), width, rows[0].shape[1], dtype=rows[0].dtype, device=self.device)
        attention_mask = torch.zeros(len(rows), width, dtype=torch.long, device=self.device)
        for b, r in enumerate(rows):
            inputs_embeds[b, : r.shape[0]] = r
            attention_mask[b, : r.shape[0]] = 1
        return inputs_embeds, attention_mask

    def embed_prompt(self, prompt: dict) -> torch.Tensor:
        """One prompt dict -> ``(1, positions, hidden)`` inputs_embeds."""
        return self.embed_prompts([prompt])[0]

    def target_logits(self, prompts: list[dict], num_targets: list[int],
                      projected: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Next-token logits at each prompt's last ``num_targets[b]`` tokens (the positions
        that predict them).  Returns ``[(num_targets[b], vocab)]`` fp32 (differentiable when
        grads are on).  ``projected`` as in :meth:`embed_prompts`."""
        inputs_embeds, attention_mask = self.embed_prompts(prompts, projected)
        hidden = self.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask).last_hidden_state
        lengths = attention_mask.sum(1).tolist()
        out = []
        for b, (n, length) in enumerate(zip(num_targets, lengths)):
            if not 0 < n < length:
                raise ValueError(f"prompt {b}: {n} target tokens in a sequence of {length} positions")
            out.append(self.lm_head(hidden[b, length - n - 1 : length - 1]).float())
        return out

    def target_logprobs(self, prompts: list[dict], num_targets: list[int],
                        projected: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Log-probabilities of each prompt's last ``num_targets[b]`` tokens, given all before.

        The scoring function of training losses, rewards and evaluation alike.
        Returns ``[(num_targets[b],)]`` fp32 (differentiable when grads are on).
        ``projected`` as in :meth:`embed_prompts`.
        """
        out = []
        for prompt, n, logits in zip(prompts, num_targets, self.target_logits(prompts, num_targets, projected)):
            targets = torch.tensor(prompt["prompt_token_ids"][-n:], device=logits.device)
            out.append(torch.log_softmax(logits, -1).gather(1, targets[:, None]).squeeze(1))
        return out

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
