"""Turn (question, passages) into a vLLM prompt whose passages are compressed.

The one format everything goes through is *marked text*: passages inside the
prompt string as

    <passage>plain text</passage>
    <passage expand="0,3">plain text, chunks 0 and 3 kept as raw tokens</passage>
    <passage format="encoder">BASE64 safetensors (n, encoder_hidden)</passage>
    <passage format="projected">BASE64 safetensors (n, decoder_hidden)</passage>
    <passage expand="2" encoder="BASE64 (n, encoder_hidden)">plain text, with the encoder
        vectors of all its n chunks: compressed chunks go to the engine as those
        vectors (the policy path, which has already encoded every chunk)</passage>

:meth:`RefragPromptBuilder.render_segments` cuts each text passage into chunks of k
*decoder* tokens; compressed runs become ``refrag_chunk`` items (one placeholder
token in the prompt per item, one decoder position per chunk after processing),
expanded chunks stay as their own tokens.  The OpenAI server's renderer
(:meth:`RefragPromptBuilder.render`) parses the markup into text and passages; the
offline API (:meth:`RefragPromptBuilder.build`) hands over its passages as they are,
so nothing it produced is parsed again and vectors never round-trip through text.
Both end in ``render_segments``, so they give the same tokens for the same request.

Escaping.  In a prompt that holds passage markup, ``&lt;``, ``&gt;`` and ``&amp;``
stand for ``<``, ``>`` and ``&``, inside passage bodies and outside them.  A text
passage's body must not contain a raw ``<passage`` (nested markup is refused), so
retrieved text cannot open a passage of its own: escape it with :func:`escape_text`,
or build the markup with :func:`passage`.  A prompt with no markup is left as it is.

Precomputed vectors (``format="encoder"``, ``format="projected"``, ``encoder=``) are
accepted only when the caller allows them (the server: ``--enable-mm-embeds``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from .chunks import CompressedChunks, check_embeds, decode_embeds
from .config import MODALITY, RefragConfig, load_refrag_config

_PASSAGE_RE = re.compile(r"<passage(?P<attrs>(?:\s+[A-Za-z_]+=\"[^\"]*\")*)\s*>(?P<body>.*?)</passage>", re.S)
_ATTR_RE = re.compile(r"\s+([A-Za-z_]+)=\"([^\"]*)\"")
_PASSAGE_FIELDS = {"format", "expand", "encoder"}
_FORMATS = {"text", "encoder", "projected"}
_ESCAPES = {"&": "&amp;", "<": "&lt;", ">": "&gt;"}
_ESCAPE_RE = re.compile("[&<>]")
_UNESCAPE_RE = re.compile("&(amp|lt|gt);")
_UNESCAPES = {"amp": "&", "lt": "<", "gt": ">"}
EMBEDS_DISABLED = (
    "precomputed chunk vectors (format=\"encoder\", format=\"projected\", encoder=\"...\") are "
    "disabled: start the server with --enable-mm-embeds (LLM(enable_mm_embeds=True) offline) to accept "
    "them, and only from clients you trust. Text passages always work."
)

Prompt = dict[str, Any]
"""``{"prompt_token_ids": [...], "multi_modal_data": {"refrag_chunk": [CompressedChunks, ...]}}``"""


@dataclass(frozen=True)
class Passage:
    """A passage for :meth:`RefragPromptBuilder.build`: text, or precomputed chunks."""

    text: str | None = None
    chunks: CompressedChunks | None = None
    expand: tuple[int, ...] = ()
    """Chunk indices (of a text passage) to keep as raw decoder tokens."""
    encoder_embeds: Any = None
    """``(num_chunks, encoder_hidden)``: the encoder's vectors of every chunk of a text
    passage (expanded ones too).  Its compressed chunks are then sent as these vectors
    (``encoder`` items), so the engine does not encode them again."""


def has_passages(text: str) -> bool:
    return "<passage" in text


def escape_text(text: str) -> str:
    """Plain text -> text that passage markup reads back as exactly ``text``
    (``&`` -> ``&amp;``, ``<`` -> ``&lt;``, ``>`` -> ``&gt;``)."""
    return _ESCAPE_RE.sub(lambda m: _ESCAPES[m.group(0)], text)


def unescape_text(text: str) -> str:
    """The inverse of :func:`escape_text` (one pass: ``&amp;lt;`` -> ``&lt;``)."""
    return _UNESCAPE_RE.sub(lambda m: _UNESCAPES[m.group(1)], text)


def passage(text: str, expand: Sequence[int] = (), encoder_embeds=None) -> str:
    """One text passage as markup for any prompt or chat message, its text escaped.

    ``expand`` lists chunk indices to keep as raw tokens; ``encoder_embeds`` (optional,
    ``(num_chunks, encoder_hidden)``) are its chunks' encoder vectors.  Any text may go
    in, markup included: the server reads back exactly ``text``.
    """
    from .chunks import encode_embeds

    attrs = f' expand="{",".join(str(int(e)) for e in expand)}"' if len(expand) else ""
    if encoder_embeds is not None:
        attrs += f' encoder="{encode_embeds(encoder_embeds)}"'
    return f"<passage{attrs}>{escape_text(text)}</passage>"


def chunk_text(tokenizer, chunk_ids: Sequence[int]) -> str:
    """The text the encoder sees for one chunk of decoder tokens."""
    text = tokenizer.decode(list(chunk_ids))
    return text if text else " "


def chunk_pieces(
    tokenizer, chunks: Sequence[Sequence[int]], expand: Sequence[int] = (), max_items: int = 256,
    encoder_embeds=None,
) -> list[int | CompressedChunks]:
    """Chunks of decoder tokens -> prompt pieces: raw token ids for expanded chunks,
    ``CompressedChunks`` (at most ``max_items`` chunks each) for runs of compressed
    ones.  Serving, training and evaluation all cut contexts here.

    Runs are text items, or, given ``encoder_embeds (len(chunks), encoder_hidden)``,
    encoder items holding those rows.
    """
    expand = set(int(e) for e in expand)
    pieces: list[int | CompressedChunks] = []
    run: list[int] = []

    def flush() -> None:
        if run:
            if encoder_embeds is None:
                item = CompressedChunks.from_texts([chunk_text(tokenizer, chunks[j]) for j in run])
            else:
                item = CompressedChunks.from_encoder_embeds(encoder_embeds[run[0] : run[-1] + 1])
            pieces.extend(item.split(max_items))
            run.clear()

    for j, chunk_ids in enumerate(chunks):
        if j in expand:
            flush()
            pieces.extend(int(t) for t in chunk_ids)
        else:
            run.append(j)
    flush()
    return pieces


def pieces_to_prompt(pieces: Sequence[int | CompressedChunks], placeholder_id: int) -> "Prompt":
    """Token ids and items in order -> vLLM prompt dict (one placeholder per item)."""
    ids: list[int] = []
    items: list[CompressedChunks] = []
    for piece in pieces:
        if isinstance(piece, CompressedChunks):
            ids.append(placeholder_id)
            items.append(piece)
        else:
            ids.append(int(piece))
    prompt: Prompt = {"prompt_token_ids": ids}
    if items:
        prompt["multi_modal_data"] = {MODALITY: items}
    return prompt


def rag_user_message(passage_markup: Sequence[str], question_markup: str, *, question_first: bool = False) -> str:
    """The one RAG user-turn layout (offline builder, chat ``documents``): the passages'
    markup, then the question, both already marked text.  ``question_first`` (the
    checkpoint's ``refrag.question_first``) also names the question before the passages, so
    the decoder reads every compressed passage knowing what is asked."""
    context = "\n\n".join(passage_markup)
    if question_first:
        return (f"Question: {question_markup}\n\nAnswer it using these passages.\n\n{context}"
                f"\n\nQuestion: {question_markup}")
    return f"Answer the question using these passages.\n\n{context}\n\nQuestion: {question_markup}"


def document_text(document, index: int) -> str:
    """A chat ``documents`` entry (``{"text": ..., "title"?: ...}``) -> its passage text:
    the title, a newline and the text, or the text alone."""
    if not isinstance(document, dict) or not isinstance(document.get("text"), str) or not document["text"].strip():
        raise ValueError(f"documents[{index}] must be an object with a non-empty \"text\" string")
    title = document.get("title")
    return f"{title}\n{document['text']}" if isinstance(title, str) and title.strip() else document["text"]


class RefragPromptBuilder:
    """Builds REFRAG prompts for one checkpoint (its tokenizer, k and widths)."""

    def __init__(self, tokenizer, cfg: RefragConfig, decoder_hidden_size: int, expander=None) -> None:
        self.tokenizer = tokenizer
        self.expander = expander
        """A :class:`~refrag_vllm.expansion_policy.PolicyExpander`, for ``build(expand_fraction=...)``."""
        self.cfg = cfg
        self.k = cfg.chunk_size
        self.decoder_hidden_size = decoder_hidden_size
        self.placeholder_id = cfg.placeholder_token_id

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, *, load_policy: bool = False) -> "RefragPromptBuilder":
        """``load_policy`` also loads the checkpoint's encoder and expansion policy (CPU)."""
        from transformers import AutoTokenizer

        raw, cfg = load_refrag_config(model_dir)
        expander = None
        if load_policy:
            from .expansion_policy import PolicyExpander

            expander = PolicyExpander.from_pretrained(model_dir)
        return cls(AutoTokenizer.from_pretrained(str(model_dir)), cfg, int(raw["hidden_size"]), expander)

    # ------------------------------------------------------------------ tokens
    def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    def chunk_passage(self, text: str) -> list[list[int]]:
        """Cut a passage into chunks of k decoder tokens (the last may be shorter)."""
        ids = self._encode(text, add_special_tokens=False)
        return [ids[i : i + self.k] for i in range(0, len(ids), self.k)]

    def chunk_texts(self, text: str) -> list[str]:
        """A passage's chunks as the encoder sees them (:func:`chunk_text` of each chunk)."""
        return [chunk_text(self.tokenizer, c) for c in self.chunk_passage(text)]

    def every_chunk(self, passages: Sequence[str]) -> list[list[int]]:
        """``expand`` for :meth:`build` that keeps every chunk of every passage raw (vanilla RAG)."""
        return [list(range(len(self.chunk_passage(p)))) for p in passages]

    @staticmethod
    def _check_no_stray_markup(text: str) -> None:
        """Client text between passages holds no passage markup (the placeholder token is
        checked once, after unescaping, in :meth:`render_segments`)."""
        if "<passage" in text or "</passage>" in text:
            raise ValueError(
                "malformed <passage> markup: expected <passage [format=\"text|encoder|projected\"] "
                "[expand=\"i,j\"]>...</passage>"
            )

    # -------------------------------------------------------------- passages
    def _passage_pieces(self, passage: Passage, index: int) -> list[int | CompressedChunks]:
        """Token ids and compressed items for one passage, in order."""
        max_items = self.cfg.max_chunks_per_item
        if passage.chunks is not None:
            chunks = passage.chunks
            if chunks.kind != "text":
                width = self.cfg.encoder_hidden_size if chunks.kind == "encoder" else self.decoder_hidden_size
                chunks = CompressedChunks(kind=chunks.kind, embeds=check_embeds(
                    chunks.embeds, width=width, what=f"passage {index} ({chunks.kind} embeddings)"))
            return list(chunks.split(max_items))
        text = passage.text or ""
        if not text.strip():
            raise ValueError(f"passage {index} is empty")
        if self.cfg.placeholder_token in text:
            raise ValueError(f"passage {index} contains the placeholder token {self.cfg.placeholder_token!r}")
        chunks = self.chunk_passage(text)
        bad = [e for e in passage.expand if not 0 <= e < len(chunks)]
        if bad:
            raise ValueError(
                f"passage {index}: expand indices {bad} out of range (passage has {len(chunks)} chunks)"
            )
        embeds = passage.encoder_embeds
        if embeds is not None:
            embeds = check_embeds(embeds, width=self.cfg.encoder_hidden_size,
                                  what=f"passage {index} (encoder embeddings of its chunks)")
            if embeds.shape[0] != len(chunks):
                raise ValueError(f"passage {index}: {embeds.shape[0]} encoder embeddings for "
                                 f"{len(chunks)} chunks of k={self.k} tokens")
        return chunk_pieces(self.tokenizer, chunks, passage.expand, max_items, embeds)

    def _parse_passage_markup(self, attrs: str, body: str, index: int, allow_embeds: bool = True) -> Passage:
        fields = dict(_ATTR_RE.findall(attrs))
        unknown = set(fields) - _PASSAGE_FIELDS
        if unknown:
            raise ValueError(
                f"passage {index}: unknown field(s) {sorted(unknown)}; allowed: {sorted(_PASSAGE_FIELDS)}"
            )
        fmt = fields.get("format", "text")
        if fmt not in _FORMATS:
            raise ValueError(f"passage {index}: unknown format {fmt!r}; allowed: {sorted(_FORMATS)}")
        if not allow_embeds and (fmt != "text" or "encoder" in fields):
            raise ValueError(f"passage {index}: {EMBEDS_DISABLED}")
        if fmt == "text":
            if "<passage" in body:
                raise ValueError(
                    f"passage {index} contains nested <passage markup; escape its text "
                    "('<' as '&lt;', '&' as '&amp;'; refrag_vllm.passage() does)"
                )
            body = unescape_text(body)
            encoder_embeds = decode_embeds(fields["encoder"]) if "encoder" in fields else None
            expand: tuple[int, ...] = ()
            if fields.get("expand", "").strip():
                try:
                    expand = tuple(int(x) for x in fields["expand"].split(","))
                except ValueError:
                    raise ValueError(
                        f"passage {index}: expand must be comma-separated chunk indices, "
                        f"got {fields['expand']!r}"
                    ) from None
            return Passage(text=body, expand=expand, encoder_embeds=encoder_embeds)
        if "expand" in fields or "encoder" in fields:
            raise ValueError(f"passage {index}: expand and encoder apply to text passages only")
        if not body.strip():
            raise ValueError(f"passage {index} is empty")
        # Shape, dtype and finiteness are checked with every vector passage, in _passage_pieces.
        return Passage(chunks=CompressedChunks(kind=fmt, embeds=decode_embeds(body)))

    # ---------------------------------------------------------------- public
    @cached_property
    def max_token_chars(self) -> int:
        """The longest text one decoder token stands for (81 characters for SmolLM2)."""
        vocab = self.tokenizer.get_vocab()
        return max(len(self.tokenizer.convert_tokens_to_string([t])) for t in vocab)

    def check_size(self, text: str, max_positions: int) -> None:
        """Refuse marked text that cannot fit ``max_positions`` decoder positions, before
        any tokenizing: its text needs at least ``chars / max_token_chars`` tokens, and a
        text passage's tokens at least ``1/k`` as many positions (vector payloads are
        not counted here; they are bounded once decoded)."""
        per_token = self.max_token_chars
        outside = in_passages = 0
        pos = 0
        while True:  # str.find, not the markup regex: a scan of 50 MB takes milliseconds
            start = text.find("<passage", pos)
            opened = text.find(">", start) if start >= 0 else -1
            end = text.find("</passage>", opened) if opened >= 0 else -1
            if end < 0:
                outside += len(text) - pos
                break
            outside += start - pos
            attrs = text[start:opened]
            if 'format="' not in attrs or 'format="text"' in attrs:
                in_passages += end - opened - 1
            pos = end + len("</passage>")
        positions = outside / per_token + in_passages / (per_token * self.k)
        if positions > max_positions:
            raise ValueError(
                f"the prompt ({len(text):,} characters) needs at least {int(positions):,} decoder positions "
                f"at k={self.k}, more than the maximum context length of {max_positions:,}"
            )

    def render(self, text: str, *, add_special_tokens: bool = False, allow_embeds: bool = True) -> Prompt:
        """Marked text (what a client sends) -> vLLM prompt dict (token ids + compressed chunk items).

        With ``allow_embeds=False`` a passage of precomputed vectors is refused
        (``ValueError``) before its vectors are decoded.
        """
        segments: list[str | Passage] = []
        pos = 0
        for index, m in enumerate(_PASSAGE_RE.finditer(text)):
            before = text[pos : m.start()]
            self._check_no_stray_markup(before)
            parsed = self._parse_passage_markup(m.group("attrs"), m.group("body"), index, allow_embeds)
            segments += [unescape_text(before), parsed]
            pos = m.end()
        tail = text[pos:]
        self._check_no_stray_markup(tail)
        segments.append(unescape_text(tail) if pos else tail)
        return self.render_segments(segments, add_special_tokens=add_special_tokens)

    def render_segments(self, segments: Sequence[str | Passage], *, add_special_tokens: bool = False) -> Prompt:
        """Plain text and parsed passages, in order -> vLLM prompt dict.  The one place a
        prompt becomes tokens and items: :meth:`render` gets here by parsing markup,
        :meth:`build` directly.  Special tokens go before the first text segment only."""
        pieces: list[int | CompressedChunks] = []
        index = 0
        for n, segment in enumerate(segments):
            if isinstance(segment, Passage):
                pieces += self._passage_pieces(segment, index)
                index += 1
            else:
                if self.cfg.placeholder_token in segment:
                    raise ValueError(
                        f"the prompt contains the placeholder token {self.cfg.placeholder_token!r} "
                        "without chunk data; send passages as <passage>...</passage> instead"
                    )
                pieces += self._encode(segment, add_special_tokens and n == 0)
        return pieces_to_prompt(pieces, self.placeholder_id)

    @staticmethod
    def as_passage(item: str | Passage | CompressedChunks) -> Passage:
        """A passage as :class:`Passage` (text, or precomputed vectors)."""
        if isinstance(item, str):
            item = Passage(text=item)
        elif isinstance(item, CompressedChunks):
            item = Passage(chunks=item)
        if item.chunks is not None and item.chunks.kind == "text":
            raise ValueError("give text passages as str or Passage(text=...)")
        return item

    def format_passage(self, item: str | Passage | CompressedChunks) -> str:
        """One passage as marked text, for a client (a text passage through :func:`passage`)."""
        from .chunks import encode_embeds

        item = self.as_passage(item)
        if item.chunks is not None:
            return f'<passage format="{item.chunks.kind}">{encode_embeds(item.chunks.embeds)}</passage>'
        return passage(item.text or "", item.expand, item.encoder_embeds)

    def format_user_message(self, question: str, passages: Sequence[str | Passage | CompressedChunks]) -> str:
        """The RAG user turn: passages, then the question, as marked text (the question
        escaped, so it reads back as given)."""
        parts = [self.format_passage(p) for p in passages]
        if not parts:
            return question
        return rag_user_message(parts, escape_text(question), question_first=self.cfg.question_first)

    def build(
        self,
        question: str,
        passages: Sequence[str | Passage | CompressedChunks] = (),
        *,
        expand: Sequence[Sequence[int]] | None = None,
        expand_fraction: float | None = None,
        system: str | None = None,
        use_chat_template: bool = True,
    ) -> Prompt:
        """(question, passages, which chunks to keep expanded) -> prompt for ``LLM.generate``.

        ``expand[i]`` lists chunk indices of passage ``i`` kept as raw tokens.  Or
        ``expand_fraction=p``: the checkpoint's RL policy picks ``round(p * L)`` of
        the L chunks of all text passages (needs ``from_pretrained(..., load_policy=True)``);
        the policy's encoder vectors are reused for the compressed chunks.
        Uses the decoder's chat template when it has one.
        """
        passages = list(passages)
        if expand_fraction is not None:
            if expand is not None:
                raise ValueError("give expand or expand_fraction, not both")
            passages = self.policy_passages(passages, expand_fraction)
        if expand is not None:
            if len(expand) != len(passages):
                raise ValueError(f"expand has {len(expand)} entries for {len(passages)} passages")
            passages = [
                Passage(text=p, expand=tuple(e)) if isinstance(p, str) else p
                for p, e in zip(passages, expand)
            ]
        # The user turn is the client's (format_user_message) with each passage's markup
        # replaced by the placeholder token; the templated text is cut there and the
        # parsed passages go in as they are, so nothing is re-parsed.
        slots = [self.as_passage(p) for p in passages]
        marker = self.cfg.placeholder_token
        for name, text in (("question", question), ("system prompt", system or "")):
            if marker in text:
                raise ValueError(f"the {name} contains the placeholder token {marker!r}")
        content = (rag_user_message([marker] * len(slots), question, question_first=self.cfg.question_first)
                   if slots else question)
        if use_chat_template and getattr(self.tokenizer, "chat_template", None):
            messages = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": content}
            ]
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            add_special_tokens = False
        else:
            text = f"{system}\n\n{content}" if system else content
            add_special_tokens = True
        texts = text.split(marker)
        segments: list[str | Passage] = [texts[0]]
        for slot, after in zip(slots, texts[1:], strict=True):
            segments += [slot, after]
        return self.render_segments(segments, add_special_tokens=add_special_tokens)

    def policy_passages(self, passages: Sequence[str | Passage | CompressedChunks],
                        fraction: float) -> list[Passage | CompressedChunks]:
        """The policy's choice over all text passages' chunks at once: each text passage
        becomes ``Passage(text, expand=its picked chunks, encoder_embeds=its chunks' vectors)``;
        other passages are returned as given."""
        if self.expander is None:
            raise ValueError("expand_fraction needs the policy: RefragPromptBuilder.from_pretrained(dir, load_policy=True)")
        chunked = {i: self.chunk_passage(p) for i, p in enumerate(passages) if isinstance(p, str)}
        texts = [chunk_text(self.tokenizer, c) for chunks in chunked.values() for c in chunks]
        if not texts:
            return list(passages)
        embeds = self.expander.encode(texts)
        picks = set(self.expander.choose_from_embeds(embeds, fraction))
        out: list[Passage | CompressedChunks] = list(passages)
        start = 0
        for i, chunks in chunked.items():
            rows = range(start, start + len(chunks))
            out[i] = Passage(text=passages[i], expand=tuple(j - start for j in rows if j in picks),
                             encoder_embeds=embeds[rows.start : rows.stop])
            start = rows.stop
        return out

    def policy_expansions(self, passages: Sequence[str | Passage | CompressedChunks], fraction: float) -> list[list[int]]:
        """Per passage, the chunk indices the policy keeps expanded (over all passages' chunks at once)."""
        return [list(p.expand) if isinstance(p, Passage) else [] for p in self.policy_passages(passages, fraction)]

    @staticmethod
    def num_positions(prompt: Prompt) -> int:
        """Decoder positions the prompt occupies once its items are expanded."""
        items = prompt.get("multi_modal_data", {}).get(MODALITY, [])
        return len(prompt["prompt_token_ids"]) - len(items) + sum(i.num_chunks for i in items)
