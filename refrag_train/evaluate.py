"""Evaluation in the shape of the paper's Table 1: log-perplexity of o tokens after s.

On held-out windows of ``s + o`` tokens, each condition feeds the s context tokens
differently and scores the same continuation tokens (the o tokens after the first,
which every condition sees as given, so "no context" has something to start from).
Every sample starts with the tokenizer's BOS (``samples.start_ids``), so no condition
puts its first input at the decoder's attention sink:

* no context; full context (s raw tokens);
* truncated context: the last tokens, as many positions as REFRAG16 uses (LLaMA_K);
* REFRAG-k for each k: the s tokens compressed in chunks of k;
* REFRAG16 with the RL policy expanding a fraction p of chunks, and with random
  expansion at the same rate;
* a control: REFRAG16 with another window's chunks (equal to REFRAG16 means the
  compressed chunks carry nothing the decoder uses), and the same with another
  window's raw tokens;
* the control's chunks but the window's own last one: how much of the content sits in
  the chunk the continuation starts from.

Table 1 ends with its content line (:func:`content_summary`): what the window's own chunks
give over another window's, beside what its own raw tokens give over another window's; then
the same by where the scored token sits in the continuation (:func:`content_by_position`,
plotted in ``content_by_position.png``): the first tokens continue the context's last words,
the later ones its subject and style.

An optional second table scores held-out RAG QA answers (the SFT format) with no
passages, compressed passages, raw passages and the control, another question's passages
compressed; ``num_windows = 0`` leaves Table 1 out.  Scoring goes through the shared
``RefragReferenceModel.target_logprobs``, the function training uses.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from tqdm import tqdm

from refrag_vllm.expansion_policy import choose_expansions, num_expanded
from refrag_vllm.markdown import table_lines
from refrag_vllm.prompt import RefragPromptBuilder, chunk_text
from refrag_vllm.reference import RefragReferenceModel

from .config import EvalConfig
from .qa_generation import paired_difference
from .samples import Sample, TokenCorpus, context_sample, control_partners, lm_sample, random_expansion, split_chunks


def score_tokens(model: RefragReferenceModel, samples: list[Sample], batch_size: int, desc: str) -> list[list[float]]:
    """Each sample's NLL of each target token, ``[[num_targets]]``."""
    out = []
    with torch.no_grad():
        for i in tqdm(range(0, len(samples), batch_size), desc=desc, unit="batch", leave=False):
            batch = samples[i : i + batch_size]
            lps = model.target_logprobs([s.prompt for s in batch], [s.num_targets for s in batch])
            out += [(-lp).tolist() for lp in lps]
    return out


def score_samples(model: RefragReferenceModel, samples: list[Sample], batch_size: int, desc: str) -> list[float]:
    """Mean NLL per sample."""
    return [sum(t) / len(t) for t in score_tokens(model, samples, batch_size, desc)]


def _positions(sample: Sample) -> int:
    return RefragPromptBuilder.num_positions(sample.prompt)


def lm_conditions(model: RefragReferenceModel, tokenizer, windows: list[list[int]], cfg: EvalConfig, seed: int):
    """``{condition: [Sample per window]}`` for the Table 1 rows."""
    s, o = cfg.context_tokens, cfg.continuation_tokens
    pid = model.refrag_config.placeholder_token_id
    conds: dict[str, list[Sample]] = {"No context": [], "Full context": []}
    ks = list(cfg.chunk_sizes)
    for k in ks:
        conds[f"REFRAG{k}"] = []
    kp, p = model.refrag_config.chunk_size, cfg.expand_fraction
    policy_name = f"REFRAG{kp} + RL policy (p={p:g})"
    random_name = f"REFRAG{kp} + random expansion (p={p:g})"
    if model.expansion_policy is not None:
        conds[policy_name] = []
    conds[random_name] = []
    rng = random.Random(seed)
    policy = model.expansion_policy.float() if model.expansion_policy is not None else None
    for w in windows:
        ctx, cont = w[:s], w[s:]
        conds["No context"].append(context_sample(tokenizer, pid, [], cont, kp, num_targets=o - 1))
        conds["Full context"].append(lm_sample(tokenizer, pid, ctx + cont, o - 1))
        for k in ks:
            conds[f"REFRAG{k}"].append(context_sample(tokenizer, pid, ctx, cont, k, num_targets=o - 1))
        L = len(split_chunks(ctx, kp))
        if policy is not None:
            enc = model.encode_texts([chunk_text(tokenizer, c) for c in split_chunks(ctx, kp)]).float()
            expand = choose_expansions(policy, enc, p)
            conds[policy_name].append(context_sample(tokenizer, pid, ctx, cont, kp, expand, num_targets=o - 1))
        conds[random_name].append(
            context_sample(tokenizer, pid, ctx, cont, kp, random_expansion(L, p, rng), num_targets=o - 1))
    # Control: the right continuation after another window's compressed context.  If this
    # scores like REFRAG-kp, the compressed chunks carry no content the decoder uses.
    other_ctx = [w[:s] for w in control_partners(windows)]
    conds[f"REFRAG{kp}, another window's chunks (control)"] = [
        context_sample(tokenizer, pid, other, w[s:], kp, num_targets=o - 1) for other, w in zip(other_ctx, windows)
    ]
    # Where the content sits: the control's chunks but the window's own last chunk (the words the
    # continuation starts from). Against the control, what the last chunk carries; against
    # REFRAG-kp, what all the others do.
    last = (s - 1) // kp * kp  # where the last chunk starts
    conds[f"REFRAG{kp}, another window's chunks but its own last"] = [
        context_sample(tokenizer, pid, other[:last] + w[last:s], w[s:], kp, num_targets=o - 1)
        for other, w in zip(other_ctx, windows)
    ]
    # The same control with raw tokens: what an unrelated uncompressed context does.
    conds["Full context, another window's tokens (control)"] = [
        lm_sample(tokenizer, pid, other + w[s:], o - 1) for other, w in zip(other_ctx, windows)
    ]
    # LLaMA_K: the last K raw context tokens, K = REFRAG-kp's context positions.
    K = L if f"REFRAG{kp}" in conds else s // kp
    conds[f"Truncated context (last {K} tokens)"] = [
        lm_sample(tokenizer, pid, w[s - K : s] + w[s:], o - 1) for w in windows
    ]
    return conds, num_expanded(L, p)


QA_COMPRESSED = "Compressed passages"
QA_CONTROL = "Compressed, another question's passages (control)"


def qa_conditions(builder: RefragPromptBuilder, examples: list[dict], eos_id: int):
    """``{condition: [Sample per example]}``: no passages, compressed, raw, and (two examples
    or more) the control: another question's passages compressed, paired as
    :mod:`refrag_train.qa_generation` pairs them (:func:`~refrag_train.qa_generation.control_examples`)."""
    from .qa_generation import control_examples
    from .samples import qa_sample

    conds: dict[str, list[Sample]] = {"No passages": [], QA_COMPRESSED: [], "Raw passages": []}
    for ex in examples:
        q, a, ps = ex["question"], ex["answer"], ex["passages"]
        conds["No passages"].append(qa_sample(builder, q, [], a, eos_id))
        conds[QA_COMPRESSED].append(qa_sample(builder, q, ps, a, eos_id))
        conds["Raw passages"].append(qa_sample(builder, q, ps, a, eos_id, expand=builder.every_chunk(ps)))
    others = control_examples(examples)
    if others:
        conds[QA_CONTROL] = [qa_sample(builder, ex["question"], o["passages"], ex["answer"], eos_id)
                             for ex, o in zip(examples, others)]
    return conds


def qa_rows(per_example: dict[str, list[float]]) -> list[dict]:
    """One row per QA condition: mean answer log-PPL, its share of the no-passages -> raw gap
    and, paired over the same answers, its gain over no passages (mean, standard error)."""
    from .qa_generation import paired_difference

    none, raw = per_example["No passages"], per_example["Raw passages"]
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    gap = mean(none) - mean(raw)
    rows = []
    for name, nll in per_example.items():
        gain = paired_difference(none, nll)  # none - row: lower log-PPL is a gain
        rows.append({"condition": name, "answer_log_ppl": mean(nll), "num_examples": len(nll),
                     "gap_recovered": (mean(none) - mean(nll)) / gap if gap > 0 else None,
                     "gain_over_none": gain["mean"], "gain_over_none_se": gain["se"], "per_example": nll})
    return rows


def evaluate(checkpoint: str | Path, heldout_texts: list[str], cfg: EvalConfig, out_dir: str | Path, *,
             qa_examples: list[dict] | None = None, seed: int = 0, batch_size: int = 8,
             threads: int = 0) -> dict:
    """Score a checkpoint; writes ``eval.json`` and ``eval.md`` into ``out_dir``, with the
    content probe (:mod:`refrag_train.diagnose`) of the same text unless ``cfg.probe_windows`` is 0."""
    from transformers import AutoTokenizer

    from .sft import end_of_turn_id

    if threads:
        torch.set_num_threads(threads)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = RefragReferenceModel.load(checkpoint, dtype=getattr(torch, cfg.dtype))
    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
    result = {
        "checkpoint": str(checkpoint),
        "context_tokens": cfg.context_tokens,
        "continuation_tokens": cfg.continuation_tokens,
        "scored_tokens": cfg.continuation_tokens - 1,
        "num_windows": 0,
        "num_heldout_docs": len(heldout_texts),
        "rows": [],
    }
    if cfg.num_windows:  # 0: the QA table (and the probe) alone
        corpus = TokenCorpus.from_texts(heldout_texts, tokenizer, desc="tokenizing held-out")
        windows = corpus.windows(cfg.context_tokens + cfg.continuation_tokens, cfg.num_windows, seed)
        conds, result["expanded_chunks"] = lm_conditions(model, tokenizer, windows, cfg, seed)
        rows = result["rows"]
        for name, samples in conds.items():
            per_token = score_tokens(model, samples, batch_size, name)  # every window scores o - 1 tokens
            nll = [sum(t) / len(t) for t in per_token]
            rows.append({"condition": name, "log_ppl": sum(nll) / len(nll),
                         "positions": sum(map(_positions, samples)) / len(samples), "per_window": nll,
                         "per_position": [sum(col) / len(col) for col in zip(*per_token)]})
        by = {r["condition"]: r["log_ppl"] for r in rows}
        gap = by["No context"] - by["Full context"]
        for r in rows:
            r["gap_recovered"] = (by["No context"] - r["log_ppl"]) / gap if gap > 0 else None
        result["num_windows"] = len(windows)
    if qa_examples:
        builder = RefragPromptBuilder(tokenizer, model.refrag_config, model.config.hidden_size)
        qa = qa_conditions(builder, qa_examples, end_of_turn_id(tokenizer))
        result["qa"] = qa_rows({name: score_samples(model, samples, batch_size, name) for name, samples in qa.items()})
        for row in result["qa"]:
            row["positions"] = sum(map(_positions, qa[row["condition"]])) / len(qa[row["condition"]])
    if cfg.probe_windows:
        from .diagnose import content_probe

        result["probe"] = content_probe(model, tokenizer, heldout_texts, shapes=[tuple(x) for x in cfg.probe_shapes],
                                        num_windows=cfg.probe_windows, seed=seed)
    (out / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "eval.md").write_text(markdown_table(result))
    if content_by_position(result["rows"]):
        from .plots import plot_content_by_position

        plot_content_by_position(result, out / "content_by_position.png")
    return result


RAW_CONTROL = "Full context, another window's tokens (control)"


def content_conditions(conditions) -> tuple[str, str] | None:
    """``(treatment, control)``: the names of REFRAG-k and its another-window control among
    ``conditions``; ``None`` without the control."""
    for control in conditions:
        if control.endswith("another window's chunks (control)"):
            return control.split(",")[0], control
    return None


def window_content(rows: dict[str, list[float]]) -> dict[str, list[float]]:
    """``{"content (control − REFRAG-k)": per window}``: another window's chunks minus the
    window's own, in nats (higher: the chunks carry more); ``{}`` without the control row."""
    names = content_conditions(rows)
    if names is None:
        return {}
    treatment, control = names
    return {f"content (control − {treatment})": [c - t for c, t in zip(rows[control], rows[treatment])]}


def content_summary(rows: list[dict]) -> dict | None:
    """What the compressed chunks carry of *their own* window, beside what its raw tokens carry.

    ``compressed``: REFRAG-k's gap recovered minus its another-window control's (points), and the
    same per window in nats (mean ± s.e.); ``raw``: full context's 100% minus another window's raw
    tokens' (points); ``share``: compressed / raw. Where another window's raw tokens already recover
    much of the gap (prose in a known style), little is left to carry, and ``share`` says how much
    of that little the vectors carry. ``None`` without the control rows."""
    per_window = {r["condition"]: r["per_window"] for r in rows}
    recovered = {r["condition"]: r["gap_recovered"] for r in rows}
    names = content_conditions(recovered)
    if names is None or RAW_CONTROL not in recovered or None in recovered.values():
        return None
    treatment, control = names
    d = paired_difference(per_window[control], per_window[treatment])
    compressed = recovered[treatment] - recovered[control]
    raw = recovered["Full context"] - recovered[RAW_CONTROL]
    return {"treatment": treatment, "compressed": compressed, "compressed_nats": d["mean"], "compressed_nats_se": d["se"],
            "raw": raw, "share": compressed / raw if raw > 0 else None}


POSITION_SPANS = ((1, 4), (5, 16), (17, None))
"""Spans of the continuation's scored tokens, 1-based and inclusive (None: to the last)."""


def content_by_position(rows: list[dict], spans=POSITION_SPANS) -> list[dict]:
    """:func:`content_summary` by where the scored token sits, in nats per token averaged over the
    span's tokens and the windows: ``gap`` (no context − full context), ``compressed`` (control −
    REFRAG-k), ``raw`` (another window's tokens − full context) and ``share`` (compressed / raw).
    ``[]`` without the rows or their ``per_position``."""
    curves = {r["condition"]: r.get("per_position") for r in rows}
    names = content_conditions(curves)
    needed = ("No context", "Full context", RAW_CONTROL)
    if names is None or any(curves.get(n) is None for n in (*needed, *names)):
        return []
    treatment, control = names

    out = []
    scored = len(curves["Full context"])
    for first, last in spans:
        last = scored if last is None else min(last, scored)
        if first > last:
            continue
        mean = {name: sum(curves[name][first - 1 : last]) / (last - first + 1)
                for name in (*needed, *names)}
        compressed = mean[control] - mean[treatment]
        raw = mean[RAW_CONTROL] - mean["Full context"]
        out.append({"tokens": f"{first}–{last}", "gap": mean["No context"] - mean["Full context"],
                    "compressed": compressed, "raw": raw, "share": compressed / raw if raw > 0 else None})
    return out


def markdown_table(result: dict) -> str:
    s, o = result["context_tokens"], result["continuation_tokens"]
    lines = []
    if result["rows"]:
        lines += [
            f"Log-perplexity of {result['scored_tokens']} continuation tokens after s={s} context tokens "
            f"(o={o}), {result['num_windows']} windows from {result['num_heldout_docs']} held-out documents. "
            "Lower is better; *gap recovered* = (no context - row) / (no context - full context).",
            "",
        ]
        lines += table_lines(
            ["Condition", "log-PPL", "decoder positions (context + o)", "gap recovered"],
            [(r["condition"], f"{r['log_ppl']:.3f}", f"{r['positions']:.0f}",
              "" if r["gap_recovered"] is None else f"{100 * r['gap_recovered']:.0f}%") for r in result["rows"]])
        lines.append("")
        c = content_summary(result["rows"])
        if c:
            share = "" if c["share"] is None else f"; the vectors carry {100 * c['share']:.0f}% of it"
            lines += [f"*Content*, what a window's own context gives over another window's: compressed "
                      f"({c['treatment']}) {100 * c['compressed']:.0f} points ({c['compressed_nats']:+.3f} ± "
                      f"{c['compressed_nats_se']:.3f} nats per token, paired over the windows); raw tokens "
                      f"{100 * c['raw']:.0f} points{share}.", ""]
        spans = content_by_position(result["rows"])
        if spans:
            lines += ["The same by where the scored token sits in the continuation (nats per token; "
                      "`content_by_position.png` plots every token):", ""]
            lines += table_lines(
                ["continuation tokens", "no context − full context", "content, compressed", "content, raw tokens",
                 "share"],
                [(p["tokens"], f"{p['gap']:.3f}", f"{p['compressed']:+.3f}", f"{p['raw']:+.3f}",
                  "" if p["share"] is None else f"{100 * p['share']:.0f}%") for p in spans])
            lines.append("")
    if result.get("qa"):
        lines += ["Held-out RAG QA (SFT format): log-perplexity of the answer; *recovered* = (no passages - row) / "
                  "(no passages - raw passages); *gain* = no passages - row, paired over the same answers "
                  "(± its standard error).", ""]
        lines += table_lines(
            ["Passages", "answer log-PPL", "recovered", "gain over no passages (nats)", "decoder positions", "examples"],
            [(r["condition"], f"{r['answer_log_ppl']:.3f}",
              "" if r.get("gap_recovered") is None else f"{100 * r['gap_recovered']:.0f}%",
              f"{r['gain_over_none']:+.3f} ± {r['gain_over_none_se']:.3f}" if "gain_over_none" in r else "",
              f"{r['positions']:.0f}", r["num_examples"]) for r in result["qa"]])
        lines.append("")
    if result.get("probe"):
        from .diagnose import probe_markdown

        lines += ["Content probe (`refrag_train.diagnose`): reconstruction log-PPL of held-out n x k tokens "
                      "from the window's own chunk vectors, another window's, one mean vector, and none.", "",
                  probe_markdown(result["probe"]).rstrip("\n")]
    return "\n".join(lines).rstrip("\n") + "\n"
