"""The training package on tiny random models: curriculum, policy maths, every stage, resume, export."""

import copy
import dataclasses
import json
import math
import re
import shutil

import numpy as np
import pytest
import torch
from helpers import PASSAGES

from refrag_train.config import CurriculumConfig, config_from_dict, load_config
from refrag_train.curriculum import curriculum_batches, geometric_counts, stage_counts
from refrag_train.policy_rl import grpo_advantages, grpo_loss
from refrag_vllm.config import PolicyConfig
from refrag_vllm.expansion_policy import ExpansionPolicy, choose_expansions, sample_expansions, sequence_logprob

# ------------------------------------------------------------------ curriculum


def test_curriculum_reproduces_paper_table8_rows():
    # Rows quoted in the paper's Table 8 (9 stages).
    assert geometric_counts(2000, 1 / 3, 9) == [1333, 445, 148, 49, 16, 6, 2, 1, 0]
    assert geometric_counts(4000, 1.745, 9) == [20, 35, 61, 106, 185, 324, 565, 985, 1719]
    paper_256 = [1, 3, 9, 25, 73, 212, 618, 1802, 5259]
    ours = geometric_counts(8000, 2.918, 9)
    assert sum(ours) == 8000 and all(abs(a - b) <= 1 for a, b in zip(ours, paper_256))


def test_curriculum_default_mix_and_totals():
    cfg = CurriculumConfig()
    stages = stage_counts(cfg)
    assert len(stages) == 9
    for n, total in zip(cfg.num_chunks, cfg.totals):
        assert sum(s[n] for s in stages) == total
    # Stage 1 is dominated by single-chunk samples, the last stage by the longest.
    assert max(stages[0], key=stages[0].get) == 1
    assert max(stages[-1], key=stages[-1].get) == 256
    # Easy types fade out, hard types grow, stage over stage.
    assert [s[1] for s in stages] == sorted((s[1] for s in stages), reverse=True)
    assert [s[256] for s in stages] == sorted(s[256] for s in stages)


def test_curriculum_batches_follow_the_schedule():
    cfg = CurriculumConfig(num_chunks=[1, 2, 4], totals=[60, 40, 40], ratios=[0.5, 1.0, 2.0], num_stages=3)
    cost = lambda n, k: n * (k + 1)  # noqa: E731
    steps = curriculum_batches(cfg, 64, [4, 8], [0.5, 0.5], seed=0, positions_per_sample=cost)
    assert steps == curriculum_batches(cfg, 64, [4, 8], [0.5, 0.5], seed=0, positions_per_sample=cost)
    stages = [b.stage for b in steps]
    assert stages == sorted(stages), "stage by stage"
    for s, counts in enumerate(stage_counts(cfg)):
        for n, count in counts.items():
            assert sum(b.batch_size for b in steps if b.stage == s and b.num_chunks == n) == count
    for b in steps:
        assert b.batch_size * cost(b.num_chunks, b.chunk_size) <= 64 or b.batch_size == 1


def test_config_overrides_take_toml_values():
    from refrag_train.config import load_config

    cfg = load_config("probe", ["reconstruction.lr=3e-3", "run.encoder=decoder-layers:8",
                                "run.bos_first=false", "reconstruction.curriculum.totals=[64]"])
    assert cfg.reconstruction.lr == 3e-3 and cfg.run.encoder == "decoder-layers:8"
    assert cfg.run.bos_first is False and cfg.reconstruction.curriculum.totals == [64]
    with pytest.raises(ValueError, match="unknown key"):
        load_config("probe", ["reconstruction.lrr=1"])
    with pytest.raises(ValueError, match="section.key=VALUE"):
        load_config("probe", ["reconstruction.lr"])


def test_samples_start_with_bos_so_no_chunk_sits_at_the_attention_sink():
    from tiny_models import make_decoder_tokenizer

    from refrag_train.samples import context_sample, reconstruction_sample

    tok = make_decoder_tokenizer()
    ids = tok("The quick brown fox jumps over the lazy dog")["input_ids"][:8]
    sample = reconstruction_sample(tok, 999, ids, 4)
    assert sample.prompt["prompt_token_ids"][:2] == [tok.bos_token_id, 999]
    assert sample.num_targets == 8
    old_layout = context_sample(tok, 999, ids, ids, 4, start=False)
    assert old_layout.prompt["prompt_token_ids"][0] == 999


def test_recall_sample_compresses_the_window_and_shows_only_the_recalled_chunk():
    from tiny_models import make_decoder_tokenizer

    from refrag_train.samples import recall_sample

    tok = make_decoder_tokenizer()
    ids = tok("The quick brown fox jumps over the lazy dog and runs far away")["input_ids"][:12]
    sample = recall_sample(tok, 999, ids, 4, chunk=1, cue=1)
    # BOS, one placeholder for the three chunks, then chunk 1 raw; the loss skips its cue token
    assert sample.prompt["prompt_token_ids"] == [tok.bos_token_id, 999] + ids[4:8]
    assert sample.num_targets == 3
    assert sample.prompt["multi_modal_data"]["refrag_chunk"][0].num_chunks == 3
    with pytest.raises(ValueError, match="nothing to recall"):
        recall_sample(tok, 999, ids, 4, chunk=0, cue=4)


def test_config_keys_k_now_sets_are_dropped_or_refused():
    """The policy's k is the served k: an older config's copy of it loads where it agrees."""
    cfg = config_from_dict({"run": {"default_chunk_size": 8}, "policy_rl": {"chunk_size": 8},
                            "eval": {"policy_chunk_size": 8}})
    assert cfg.run.default_chunk_size == 8
    with pytest.raises(ValueError, match="policy_rl.chunk_size = 16 is gone.*run.default_chunk_size"):
        config_from_dict({"run": {"default_chunk_size": 8}, "policy_rl": {"chunk_size": 16}})


def test_config_rejects_unknown_keys():
    with pytest.raises(ValueError, match="unknown key"):
        config_from_dict({"cpt": {"learning_rate": 1e-4}})
    with pytest.raises(FileNotFoundError, match="shipped configs"):
        load_config("no-such-config")
    for name in ("cpu", "quick", "cpu_minilm", "probe", "gpu", "tiny", "ablation_long_recon", "ablation_encoder_cpt",
                 "ablation_cpu_noreading"):
        load_config(name)
    cpu = load_config("cpu")
    assert cpu.run.default_chunk_size == 16
    assert cpu.data.extra_train == ["data/fortunes"] and cpu.data.extra_train_stages == ["cpt", "policy", "sft"]


# ---------------------------------------------------------------- policy maths


def test_policy_never_picks_a_chunk_twice():
    g = torch.Generator().manual_seed(0)
    for L in (1, 2, 5, 16):
        logits = torch.randn(64, L, generator=g) * 5
        actions, logprob = sample_expansions(logits, L, generator=g)
        assert actions.shape == (64, L)
        for row in actions.tolist():
            assert sorted(row) == list(range(L)), "all distinct"
        assert torch.isfinite(logprob).all()
        assert torch.allclose(sequence_logprob(logits, actions), logprob, atol=1e-5)


def test_policy_sequence_logprob_by_hand():
    logits = torch.tensor([[0.0, 1.0, 2.0]])
    actions = torch.tensor([[2, 0]])
    p1 = math.exp(2) / (1 + math.e + math.exp(2))
    p2 = 1 / (1 + math.e)  # chunk 2 masked out
    assert sequence_logprob(logits, actions).item() == pytest.approx(math.log(p1) + math.log(p2), abs=1e-6)
    greedy, _ = sample_expansions(logits, 2, greedy=True)
    assert greedy.tolist() == [[2, 1]]


def test_policy_network_any_length_and_padding():
    policy = ExpansionPolicy(PolicyConfig(in_dim=8, d_model=16, num_layers=2, num_heads=2))
    for L in (1, 7, 300):
        assert policy(torch.randn(2, L, 8)).shape == (2, L)
    mask = torch.tensor([[True, True, False]])
    logits = policy(torch.randn(1, 3, 8), mask)
    assert logits[0, 2] == float("-inf") and torch.isfinite(logits[0, :2]).all()
    picks = choose_expansions(policy, torch.randn(20, 8), 0.1)
    assert len(picks) == 2 and len(set(picks)) == 2 and picks == sorted(picks)
    assert choose_expansions(policy, torch.randn(20, 8), 0.0) == []
    with pytest.raises(ValueError, match="fraction"):
        choose_expansions(policy, torch.randn(20, 8), 1.5)


def test_grpo_advantages_by_hand():
    rewards = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 5.0, 5.0, 5.0]])
    adv = grpo_advantages(rewards)
    std = math.sqrt(1.25)  # population std of 1..4
    expected = [(-1.5 / std), (-0.5 / std), (0.5 / std), (1.5 / std)]
    assert adv[0].tolist() == pytest.approx(expected, abs=1e-5)
    assert adv[1].tolist() == [0.0, 0.0, 0.0, 0.0]


def test_grpo_clipping_by_hand():
    old = torch.zeros(4)
    # ratios e^0.5=1.65, e^-0.5=0.61, 1.1, 0.9
    new = torch.tensor([0.5, -0.5, math.log(1.1), math.log(0.9)])
    adv = torch.tensor([1.0, -1.0, 2.0, -2.0])
    # pessimistic min(r*A, clip(r)*A), eps=0.2:
    terms = [min(math.exp(0.5) * 1, 1.2 * 1),   # clipped at 1.2
             min(math.exp(-0.5) * -1, 0.8 * -1),  # clipped ratio 0.8 -> -0.8 is larger; min is r*A
             min(1.1 * 2, 1.1 * 2),
             min(0.9 * -2, 0.9 * -2)]
    assert grpo_loss(new, old, adv, 0.2).item() == pytest.approx(-sum(terms) / 4, abs=1e-6)
    # Gradient vanishes where the clip is active and the move is in the advantage's direction.
    new_g = new.clone().requires_grad_(True)
    grpo_loss(new_g, old, adv, 0.2).backward()
    assert new_g.grad[0].item() == 0.0 and new_g.grad[2].item() != 0.0


# -------------------------------------------------------------- the stages


def _corpus_texts():
    return [" ".join(PASSAGES[i:] + PASSAGES[:i]) * 2 for i in range(len(PASSAGES))]


@pytest.fixture(scope="module")
def tiny_cfg():
    return load_config("tiny")


@pytest.fixture(scope="module")
def base_ckpt(tmp_path_factory):
    from tiny_models import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("train") / "tiny-base", k=4, max_positions=4096)


def _model(cfg, ckpt):
    from refrag_train.model import TrainingModel

    return TrainingModel(cfg, ckpt)


def _corpus(model):
    from refrag_train.samples import TokenCorpus

    return TokenCorpus.from_texts(_corpus_texts(), model.tokenizer)


def _qa_examples():
    return [{"question": f"What does passage {i} say?", "answer": p.split(".")[0] + ".",
             "passages": [p, PASSAGES[(i + 1) % 3]]} for i, p in enumerate(PASSAGES)]


def _loss_on(model, samples):
    from refrag_train.trainer import nll_loss

    with torch.no_grad():
        return nll_loss(model.refrag, samples).item()


def test_cpt_mixes_in_reconstruction_samples(tiny_cfg, base_ckpt):
    import dataclasses

    from refrag_train import cpt

    cfg = dataclasses.replace(tiny_cfg, cpt=dataclasses.replace(tiny_cfg.cpt, reconstruction_fraction=1.0,
                                                                  reconstruction_max_chunks=2))
    model = _model(cfg, base_ckpt)
    steps = cpt.plan(model)
    for step in range(3):
        b = steps[step]
        for sample in cpt.make_batch(model, _corpus(model), steps, step):
            n = min(b.num_chunks, 2)
            # BOS, one item of n chunks, then the n*k tokens those chunks hold
            ids = sample.prompt["prompt_token_ids"]
            assert sample.num_targets == n * b.chunk_size == len(ids) - 2
            assert sample.prompt["multi_modal_data"]["refrag_chunk"][0].num_chunks == n


def test_cpt_plain_samples_have_no_context(tiny_cfg, base_ckpt):
    import dataclasses

    from refrag_train import cpt

    o = tiny_cfg.cpt.continuation_tokens
    cfg = dataclasses.replace(tiny_cfg, cpt=dataclasses.replace(tiny_cfg.cpt, reconstruction_fraction=0.0,
                                                                  plain_fraction=0.5))
    model = _model(cfg, base_ckpt)
    steps = cpt.plan(model)
    batch = [s for step in range(3) for s in cpt.make_batch(model, _corpus(model), steps, step)]
    plain = [s for s in batch if "multi_modal_data" not in s.prompt]
    assert 0 < len(plain) < len(batch)
    for sample in plain:  # BOS, then the o tokens to predict
        assert sample.num_targets == o == len(sample.prompt["prompt_token_ids"]) - 1
    for sample in batch:
        if "multi_modal_data" in sample.prompt:  # the others keep their compressed context
            assert sample.num_targets == o < len(sample.prompt["prompt_token_ids"]) - 1


def test_reading_batch_ends_with_its_share_of_recall_samples(tiny_cfg, base_ckpt):
    import dataclasses

    from refrag_train import reading

    recall = dataclasses.replace(tiny_cfg.reading, recall_fraction=0.5, recall_num_chunks=[3], recall_cue_tokens=1)
    model = _model(dataclasses.replace(tiny_cfg, reading=recall), base_ckpt)
    batch = reading.make_batch(model, _corpus(model), 0)
    num_recall = round(0.5 * recall.batch_size)
    assert len(batch) == recall.batch_size and num_recall > 0
    k = tiny_cfg.run.default_chunk_size
    assert all(s.num_targets == k for s in batch[:-num_recall])  # 1 x k reconstruction first
    # then recall samples: three chunks compressed, one of them recalled after its cue
    for s in batch[-num_recall:]:
        assert s.prompt["multi_modal_data"]["refrag_chunk"][0].num_chunks == 3
        assert s.num_targets == k - 1


def test_sequence_reading_reads_windows_of_several_chunks(tiny_cfg, base_ckpt, tmp_path):
    """``sequence_reading``: the reading stage again, from its own table: n x k windows to
    reconstruct, drawn from its own seed, into its own folder."""
    import dataclasses

    from refrag_train import reading
    from refrag_vllm.delta import read_delta_meta

    sequence = dataclasses.replace(tiny_cfg.reading, num_chunks=2, batch_size=2, steps=2)
    model = _model(dataclasses.replace(tiny_cfg, sequence_reading=sequence), base_ckpt)
    corpus = _corpus(model)
    batch = reading.make_batch(model, corpus, 0, reading.SEQUENCE_NAME)
    k = tiny_cfg.run.default_chunk_size
    assert len(batch) == 2 and all(s.num_targets == 2 * k for s in batch)
    assert all(s.prompt["multi_modal_data"]["refrag_chunk"][0].num_chunks == 2 for s in batch)
    single = reading.make_batch(model, corpus, 0)
    assert all(s.num_targets == k for s in single)  # ``reading`` keeps its own table
    final = reading.train_reading(model, corpus, tmp_path, name=reading.SEQUENCE_NAME)
    assert final == tmp_path / "sequence_reading" / "final" and read_delta_meta(final)["stage"] == "sequence_reading"
    assert len((tmp_path / "sequence_reading" / "metrics.jsonl").read_text().splitlines()) == 2


@pytest.mark.parametrize("stage", ["reconstruction", "reading", "cpt", "sft"])
def test_stage_runs_and_loss_goes_down_on_a_fixed_batch(stage, tiny_cfg, base_ckpt, tmp_path):
    from refrag_train import cpt, reading, reconstruction, sft

    model = _model(tiny_cfg, base_ckpt)
    corpus = _corpus(model)
    if stage == "reconstruction":
        fixed = reconstruction.make_batch(model, corpus, reconstruction.plan(model), 0)
        train = lambda: reconstruction.train_reconstruction(model, corpus, tmp_path)  # noqa: E731
    elif stage == "reading":
        fixed = reading.make_batch(model, corpus, 0)
        assert len(fixed) == tiny_cfg.reading.batch_size
        assert all(s.num_targets == tiny_cfg.run.default_chunk_size for s in fixed)  # 1 x k reconstruction
        decoder_lora = [p.detach().clone() for _, p in model.named_groups()["decoder"]]
        train = lambda: reading.train_reading(model, corpus, tmp_path)  # noqa: E731
    elif stage == "cpt":
        fixed = cpt.make_batch(model, corpus, cpt.plan(model), 0)
        train = lambda: cpt.train_cpt(model, corpus, tmp_path)  # noqa: E731
    else:
        # tiny.toml's SFT replays CPT samples: every step holds both kinds, each loss logged.
        batch = sft.make_batch(model, _qa_examples(), 0, corpus)
        assert sorted(batch) == ["qa", "replay"] and len(batch["replay"]) == tiny_cfg.sft.replay_batch_size
        assert all(s.prompt["multi_modal_data"] for s in batch["replay"])
        fixed = batch["qa"] + batch["replay"]
        train = lambda: sft.train_sft(model, _qa_examples(), tmp_path, corpus)  # noqa: E731
    before = _loss_on(model, fixed)
    final = train()
    after = _loss_on(model, fixed)
    assert after < before, (before, after)
    assert (final / "refrag_delta.json").exists()
    log = [json.loads(line) for line in (tmp_path / stage / "metrics.jsonl").read_text().splitlines()]
    # tiny.toml logs every step: one finite row per step, in order.
    assert [r["step"] for r in log] == list(range(1, len(log) + 1)) and all(math.isfinite(r["loss"]) for r in log)
    if stage == "sft":
        assert all(math.isclose(r["loss"], r["loss_qa"] + r["loss_replay"], rel_tol=1e-5) for r in log)
    if stage == "reading":  # the decoder's LoRA learns here, unlike in reconstruction
        assert len(log) == tiny_cfg.reading.steps
        after_lora = [p.detach() for _, p in model.named_groups()["decoder"]]
        assert any(not torch.equal(a, b) for a, b in zip(decoder_lora, after_lora))


def test_reconstruction_measures_the_standardizing_projectors_statistics(tiny_cfg, tmp_path):
    """A fresh reconstruction stage sets ``input_mean``/``input_inv_std`` from training
    chunks; they are saved with the delta, and the exported checkpoint standardizes."""
    from safetensors.torch import load_file

    from refrag_train import reconstruction
    from refrag_train.model import export_checkpoint
    from refrag_vllm.config import load_refrag_config
    from tiny_models import make_tiny_checkpoint

    ckpt = make_tiny_checkpoint(tmp_path / "std-base", k=4, max_positions=4096, standardize_projector_inputs=True)
    model = _model(tiny_cfg, ckpt)
    corpus = _corpus(model)
    random_mean = model.refrag.projector.input_mean.clone()
    final = reconstruction.train_reconstruction(model, corpus, tmp_path / "run")
    projector = model.refrag.projector
    mean, inv_std = projector.input_mean.clone(), projector.input_inv_std.clone()
    assert not torch.equal(mean, random_mean)
    texts = [model.tokenizer.decode(corpus.window(4, __import__("random").Random(i))) for i in range(64)]
    with torch.no_grad():
        vectors = model.refrag.encode_texts(texts).float()
    # Standardized, a sample of the same chunks has about zero mean and unit std per dimension.
    z = (vectors - mean) * inv_std
    assert z.mean(0).abs().mean() < 0.5 and 0.5 < z.std(0).mean() < 1.5
    heads = load_file(str(final / "refrag_heads.safetensors"))
    assert torch.equal(heads["projector.input_mean"], mean)  # measured at the start, not trained
    out = export_checkpoint(tiny_cfg, final, tmp_path / "ckpt", base_checkpoint=ckpt)
    assert load_refrag_config(out)[1].projector.standardize_inputs
    # The delta names its projector, so it applies to a base whose projector does not
    # standardize (what `refrag-vllm build --delta` assembles), statistics included.
    from refrag_vllm.delta import apply_delta, read_delta_meta
    from refrag_vllm.reference import RefragReferenceModel

    assert read_delta_meta(final)["projector"]["standardize_inputs"]
    plain = RefragReferenceModel.load(make_tiny_checkpoint(tmp_path / "plain-base", k=4, max_positions=4096))
    assert not plain.refrag_config.projector.standardize_inputs
    merged = apply_delta(plain, final)
    assert merged.refrag_config.projector.standardize_inputs
    assert torch.allclose(merged.projector.input_mean.float(), mean)


def test_cpt_readout_teacher_reads_the_chunks_back_from_their_vectors(tiny_cfg, base_ckpt, tmp_path):
    """distill_teacher = "readout": the teacher's context is each compressed chunk as the model
    reads it back from its vector (its raw chunks kept); "raw" keeps the context's own tokens,
    from the same draws; any other teacher is refused."""
    import dataclasses

    from refrag_train import cpt
    from refrag_train.samples import split_chunks
    from refrag_train.trainer import read_out

    def batch(teacher: str):
        cfg = dataclasses.replace(tiny_cfg, cpt=dataclasses.replace(
            tiny_cfg.cpt, distill_weight=1.0, distill_teacher=teacher, reconstruction_fraction=0.0,
            plain_fraction=0.0, mixed_fraction=1.0, expand_fraction=0.5))
        model = _model(cfg, base_ckpt)
        steps = cpt.plan(model)
        step = max(range(len(steps)), key=lambda i: steps[i].num_chunks)
        return model, steps[step], cpt.make_batch(model, _corpus(model), steps, step)

    model, b, readout = batch("readout")
    _, _, raw = batch("raw")
    assert not readout["reconstruction"] and len(readout["paragraph"]) == len(raw["paragraph"]) > 0
    k, s = b.chunk_size, b.num_chunks * b.chunk_size
    assert b.num_chunks >= 2
    drawn = []  # (the raw context's chunks, which are compressed) per sample, in the batch's order
    for ours, theirs in zip(readout["paragraph"], raw["paragraph"]):
        # the student's sample is the same draw
        assert ours.prompt["prompt_token_ids"] == theirs.prompt["prompt_token_ids"]
        assert [item.texts for item in ours.prompt["multi_modal_data"]["refrag_chunk"]] == \
            [item.texts for item in theirs.prompt["multi_modal_data"]["refrag_chunk"]]
        chunks = split_chunks(theirs.teacher_prompt["prompt_token_ids"][1 : 1 + s], k)
        student, i, compressed = ours.prompt["prompt_token_ids"], 1, []
        for j in range(len(chunks)):  # after BOS: a placeholder per compressed chunk, k tokens per raw one
            if student[i] == model.placeholder_id:
                compressed.append(j)
                i += 1
            else:
                assert student[i : i + k] == chunks[j]
                i += k
        assert sum(item.num_chunks for item in ours.prompt["multi_modal_data"]["refrag_chunk"]) == len(compressed) > 0
        drawn.append((chunks, compressed))
    # one read-out of every compressed chunk, batched as training batches it
    back = iter(read_out(model.refrag, model.tokenizer, [chunks[j] for chunks, compressed in drawn for j in compressed]))
    for (chunks, compressed), ours, theirs in zip(drawn, readout["paragraph"], raw["paragraph"]):
        expected = [t for j, c in enumerate(chunks) for t in (next(back) if j in compressed else c)]
        ids, taught = theirs.teacher_prompt["prompt_token_ids"], ours.teacher_prompt["prompt_token_ids"]
        assert taught[0] == ids[0] and taught[1 : 1 + s] == expected and taught[1 + s :] == ids[1 + s :]
        assert not ours.teacher_prompt.get("multi_modal_data")
    with pytest.raises(ValueError, match="distill_teacher"):
        cfg = dataclasses.replace(tiny_cfg, cpt=dataclasses.replace(tiny_cfg.cpt, distill_weight=1.0,
                                                                      distill_teacher="vectors"))
        cpt.train_cpt(_model(cfg, base_ckpt), None, tmp_path)


def test_sft_replay_distillation_starts_at_zero_and_needs_a_teacher(tiny_cfg, base_ckpt, tmp_path):
    """replay_distill scores the replay samples by KL to the weights SFT started from:
    zero before the first update, positive once the model has moved."""
    import dataclasses

    from refrag_train import sft
    from refrag_train.trainer import distill_loss

    cfg = dataclasses.replace(tiny_cfg, sft=dataclasses.replace(tiny_cfg.sft, replay_distill=2.0))
    model = _model(cfg, base_ckpt)
    corpus = _corpus(model)
    with pytest.raises(ValueError, match="previous stage"):
        sft.train_sft(model, _qa_examples(), tmp_path, corpus)
    start = model.save_delta(tmp_path / "start")
    replay = sft.make_batch(model, _qa_examples(), 0, corpus)["replay"]
    with torch.no_grad():
        teacher = model.frozen_copy(start).refrag
        assert distill_loss(model.refrag, teacher, replay).item() == pytest.approx(0.0, abs=1e-6)
    sft.train_sft(model, _qa_examples(), tmp_path, corpus, teacher_delta=start)
    log = [json.loads(line) for line in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert log[0]["loss_replay_kl"] == pytest.approx(0.0, abs=1e-6)
    assert all(r["loss_replay_kl"] > 0 for r in log[1:])
    assert all(math.isclose(r["loss"], r["loss_qa"] + r["loss_replay_kl"], rel_tol=1e-5) for r in log)
    with torch.no_grad():
        assert distill_loss(model.refrag, teacher, replay).item() > 0


def test_sft_raw_distillation_teaches_the_answers_what_raw_passages_give(tiny_cfg, base_ckpt, tmp_path):
    """raw_distill: each QA sample's teacher reads the same passages as raw tokens and scores
    the same answer tokens; the KL is logged beside the answers' NLL.  The teacher is the model
    being trained (``current``) or the one SFT started from (``start``, which needs its weights)."""
    import dataclasses

    from refrag_train import sft
    from refrag_train.trainer import distill_loss

    def config(teacher):
        return dataclasses.replace(tiny_cfg, sft=dataclasses.replace(
            tiny_cfg.sft, raw_distill=1.0, raw_distill_teacher=teacher, replay_batch_size=0))

    model = _model(config("start"), base_ckpt)
    with pytest.raises(ValueError, match="previous stage"):
        sft.train_sft(model, _qa_examples(), tmp_path, None)
    with pytest.raises(ValueError, match="'current' or 'start'"):
        sft.train_sft(_model(config("teacher"), base_ckpt), _qa_examples(), tmp_path, None)
    qa = sft.make_batch(model, _qa_examples(), 0, None)
    for sample in qa:
        raw, n = sample.teacher_prompt, sample.num_targets
        assert not raw.get("multi_modal_data", {}).get("refrag_chunk")  # every passage as tokens
        assert sample.prompt["multi_modal_data"]["refrag_chunk"]
        assert raw["prompt_token_ids"][-n:] == sample.prompt["prompt_token_ids"][-n:]
        assert len(raw["prompt_token_ids"]) > len(sample.prompt["prompt_token_ids"])
    start = model.save_delta(tmp_path / "start")
    with torch.no_grad():  # unlike replay's, this KL is not zero at the start: the teacher reads more
        assert distill_loss(model.refrag, model.frozen_copy(start).refrag, qa).item() > 0
    for teacher in ("start", "current"):
        run = tmp_path / teacher
        model = _model(config(teacher), base_ckpt)
        sft.train_sft(model, _qa_examples(), run, None, teacher_delta=start if teacher == "start" else None)
        log = [json.loads(line) for line in (run / "sft" / "metrics.jsonl").read_text().splitlines()]
        assert all(r["loss_qa_raw_kl"] > 0 for r in log)
        assert all(math.isclose(r["loss"], r["loss_qa"] + r["loss_qa_raw_kl"], rel_tol=1e-5) for r in log)


def test_cpt_distills_the_base_decoder_reading_the_context_raw(tiny_cfg, base_ckpt, tmp_path):
    """distill_weight: each next-paragraph sample's teacher reads the same context as raw
    tokens and predicts the same targets; the stage learns the KL, which goes down."""
    import dataclasses

    from refrag_train import cpt
    from refrag_train.trainer import distill_loss

    cfg = dataclasses.replace(tiny_cfg, cpt=dataclasses.replace(tiny_cfg.cpt, distill_weight=1.0,
                                                                  reconstruction_fraction=0.5))
    model = _model(cfg, base_ckpt)
    corpus = _corpus(model)
    steps = cpt.plan(model)
    batches = [cpt.make_batch(model, corpus, steps, step) for step in range(len(steps))]
    assert all(sorted(b) == ["paragraph", "reconstruction"] for b in batches)
    assert any(b["reconstruction"] for b in batches) and any(b["paragraph"] for b in batches)
    paragraphs = [s for b in batches for s in b["paragraph"]]
    for sample in paragraphs:
        raw, n = sample.teacher_prompt, sample.num_targets
        assert not raw.get("multi_modal_data", {}).get("refrag_chunk")  # no compressed chunk left
        assert raw["prompt_token_ids"][-n:] == sample.prompt["prompt_token_ids"][-n:]
        assert len(raw["prompt_token_ids"]) > len(sample.prompt["prompt_token_ids"])
    assert all(s.teacher_prompt is None for b in batches for s in b["reconstruction"])
    fixed = paragraphs[:4]
    teacher = model.frozen_copy(None).refrag
    with torch.no_grad():
        before = distill_loss(model.refrag, teacher, fixed).item()
    cpt.train_cpt(model, corpus, tmp_path)
    with torch.no_grad():
        after = distill_loss(model.refrag, teacher, fixed).item()
    assert after < before, (before, after)
    log = [json.loads(line) for line in (tmp_path / "cpt" / "metrics.jsonl").read_text().splitlines()]
    assert any("loss_paragraph_kl" in r for r in log)
    assert all(math.isclose(r["loss"], r.get("loss_reconstruction", 0.0) + r.get("loss_paragraph_kl", 0.0),
                            rel_tol=1e-5) for r in log)
    # Without reconstruction samples every step is distillation alone.
    only = dataclasses.replace(cfg, cpt=dataclasses.replace(cfg.cpt, reconstruction_fraction=0.0))
    model = _model(only, base_ckpt)
    assert not any(cpt.make_batch(model, corpus, steps, step)["reconstruction"] for step in range(len(steps)))
    cpt.train_cpt(model, corpus, tmp_path / "only")
    log = [json.loads(line) for line in (tmp_path / "only" / "cpt" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["loss"] == pytest.approx(r["loss_paragraph_kl"]) for r in log)


def test_policy_stage_runs_and_its_loss_goes_down_on_a_fixed_batch(tiny_cfg, base_ckpt, tmp_path):
    from refrag_train import policy_rl

    model = _model(tiny_cfg, base_ckpt)
    corpus = _corpus(model)
    before = {k: v.clone() for k, v in model.policy.state_dict().items()}
    policy_rl.train_policy(model, corpus, tmp_path)
    log = [json.loads(line) for line in (tmp_path / "policy" / "metrics.jsonl").read_text().splitlines()]
    assert len(log) == tiny_cfg.policy_rl.steps and all(math.isfinite(r["reward"]) for r in log)
    assert any(not torch.equal(before[k], v) for k, v in model.policy.state_dict().items())
    # On one fixed batch of sampled actions and advantages, PPO steps lower the GRPO loss.
    pc = tiny_cfg.policy_rl
    contexts, continuations = policy_rl.make_inputs(model, corpus, 0)
    k = tiny_cfg.run.default_chunk_size
    embeds = policy_rl.chunk_embeddings(model, contexts, k)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        logits = model.policy(embeds).repeat_interleave(pc.group_size, 0)
        actions, old = sample_expansions(logits, 2, generator=g)
    rewards = policy_rl.rewards_for(model, [c for c in contexts for _ in range(pc.group_size)],
                                    [c for c in continuations for _ in range(pc.group_size)], actions, k)
    adv = grpo_advantages(rewards.view(-1, pc.group_size)).view(-1)
    params = model.trainable(["policy"])
    opt = torch.optim.AdamW(params, lr=1e-3)

    def loss_now():
        return grpo_loss(sequence_logprob(model.policy(embeds).repeat_interleave(pc.group_size, 0), actions),
                         old, adv, 10.0)

    first = loss_now()
    for _ in range(5):
        opt.zero_grad()
        loss_now().backward()
        opt.step()
    assert loss_now().item() < first.item()


def test_resume_continues_from_the_saved_step(tiny_cfg, base_ckpt, tmp_path, capsys, monkeypatch):
    from refrag_train import reconstruction

    straight = _model(tiny_cfg, base_ckpt)
    reconstruction.train_reconstruction(straight, _corpus(straight), tmp_path / "a")

    model = _model(tiny_cfg, base_ckpt)
    corpus = _corpus(model)
    real = reconstruction.make_batch

    def interrupted(m, c, steps, step):
        if step == 5:
            raise KeyboardInterrupt
        return real(m, c, steps, step)

    with monkeypatch.context() as patch:
        patch.setattr(reconstruction, "make_batch", interrupted)
        with pytest.raises(KeyboardInterrupt):
            reconstruction.train_reconstruction(model, corpus, tmp_path / "b")
    state = json.loads((tmp_path / "b" / "reconstruction" / "last" / "state.json").read_text())
    assert state["step"] == 4  # save_every = 2
    assert state["elapsed_s"] > 0
    resumed = _model(tiny_cfg, base_ckpt)  # a fresh process: weights come from disk
    capsys.readouterr()
    reconstruction.train_reconstruction(resumed, corpus, tmp_path / "b")
    assert "resuming at step 4" in capsys.readouterr().out
    # The stage's clock carries on from the saved step's time.
    final_state = json.loads((tmp_path / "b" / "reconstruction" / "final" / "state.json").read_text())
    assert final_state["elapsed_s"] >= state["elapsed_s"]
    # The log holds each step once: the interrupted run's row for step 5 was never written,
    # and rows past the saved step are dropped before the resumed run redoes them.
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "reconstruction" / "metrics.jsonl").open()]
    assert steps == sorted(set(steps)) == list(range(1, final_state["step"] + 1))
    for (name, a), (_, b) in zip(straight.refrag.projector.named_parameters(),
                                 resumed.refrag.projector.named_parameters()):
        assert torch.allclose(a, b, atol=1e-6), name
    lora = lambda m: {k: v for k, v in m.peft_model.state_dict().items() if "lora_" in k}  # noqa: E731
    for k, v in lora(straight).items():
        assert torch.allclose(v, lora(resumed)[k], atol=1e-6), k


# --------------------------------------------------- export, serve, evaluate


@pytest.fixture(scope="module")
def trained(tiny_cfg, base_ckpt, tmp_path_factory):
    """All four stages on the tiny model, exported as a checkpoint (the recipe's path)."""
    from refrag_train.cli import STAGES, copy_delta, train_stages
    from refrag_train.data import write_jsonl
    from refrag_train.model import export_checkpoint

    root = tmp_path_factory.mktemp("recipe")
    data, extra = root / "data", root / "extra"
    docs = [{"id": str(i), "text": t} for i, t in enumerate(_corpus_texts())]
    write_jsonl(data / "train.jsonl", docs[::2])
    write_jsonl(extra / "train.jsonl", docs[1::2])  # a second domain's folder (data.extra_train)
    write_jsonl(data / "qa_train.jsonl", _qa_examples())
    cfg = copy.deepcopy(tiny_cfg)
    cfg.data.extra_train = [str(extra)]
    cfg.data.extra_train_stages = ["cpt", "policy", "sft"]  # as configs/cpu.toml
    run = root / "run"
    final = train_stages(cfg, run, data, STAGES, base_checkpoint=base_ckpt)
    delta = copy_delta(final, run / "delta")
    ckpt = export_checkpoint(cfg, delta, root / "ckpt", base_checkpoint=base_ckpt)
    return ckpt, delta


def test_the_delta_carries_its_rag_layout(trained, base_ckpt, tmp_path):
    """``run.question_first`` is saved with the delta and becomes the checkpoint's layout."""
    from refrag_vllm.delta import META, apply_delta, read_delta_meta
    from refrag_vllm.reference import RefragReferenceModel

    delta = tmp_path / "delta"
    shutil.copytree(trained[1], delta)
    assert read_delta_meta(delta)["question_first"] is False
    assert not apply_delta(RefragReferenceModel.load(base_ckpt), delta).refrag_config.question_first
    meta = read_delta_meta(delta) | {"question_first": True}
    (delta / META).write_text(json.dumps(meta))
    assert apply_delta(RefragReferenceModel.load(base_ckpt), delta).refrag_config.question_first


def test_extra_training_data_joins_only_its_stages(trained):
    run = trained[1].parent
    with np.load(run / "train_tokens.npz", allow_pickle=False) as z:  # reconstruction, reading
        assert int(z["num_docs"]) == len(_corpus_texts()[::2])
    with np.load(run / "train_tokens_extra.npz", allow_pickle=False) as z:  # CPT, policy, SFT's replay
        assert int(z["num_docs"]) == len(_corpus_texts())


def test_init_continues_a_finished_stage_in_a_new_run(trained, tiny_cfg, base_ckpt, tmp_path):
    """``refrag-train train --init STAGE_FINAL``: the first stage starts from another run's
    weights; with ``reading.seed`` it draws windows the first run's reading did not."""
    from refrag_train import reading
    from refrag_train.cli import train_stages
    from refrag_train.data import read_jsonl
    from refrag_train.samples import TokenCorpus

    run = trained[1].parent
    data, init = run.parent / "data", run / "reading" / "final"
    cfg = copy.deepcopy(tiny_cfg)
    cfg.reading.seed = 1
    with pytest.raises(SystemExit, match="not a stage's weights"):
        train_stages(cfg, tmp_path / "bad", data, ["reading"], base_checkpoint=base_ckpt, init=run)
    assert not (tmp_path / "bad").exists()  # refused before the run folder or the model
    # A finished stage in the new run's folder that is not named does not replace --init.
    shutil.copytree(run / "reconstruction", tmp_path / "more" / "reconstruction")
    final = train_stages(cfg, tmp_path / "more", data, ["reading"], base_checkpoint=base_ckpt, init=init)
    assert final == tmp_path / "more" / "reading" / "final"
    # Its first step's loss is the loss of the init weights on that step's batch.
    model = _model(cfg, base_ckpt)
    model.load_delta_weights(init)
    corpus = TokenCorpus.from_texts([d["text"] for d in read_jsonl(data / "train.jsonl")], model.tokenizer)
    logged = json.loads((tmp_path / "more" / "reading" / "metrics.jsonl").open().readline())["loss"]
    assert _loss_on(model, reading.make_batch(model, corpus, 0)) == pytest.approx(logged, rel=1e-4)
    batch_ids = lambda: [s.prompt["prompt_token_ids"] for s in reading.make_batch(model, corpus, 0)]  # noqa: E731
    seed_one = batch_ids()
    model.cfg.reading.seed = 0
    assert seed_one != batch_ids()


def test_a_larger_decoder_rank_starts_from_a_smaller_ranks_weights(trained, tiny_cfg, base_ckpt):
    """``--set lora.decoder_rank=R --init STAGE_FINAL`` with R above the saved rank: the grown
    adapter computes what the saved one did, and its new directions learn; a smaller R is refused."""
    from refrag_train import reading
    from refrag_train.data import read_jsonl
    from refrag_train.samples import TokenCorpus
    from refrag_train.trainer import nll_loss

    run = trained[1].parent
    init = run / "reading" / "final"
    saved = _model(tiny_cfg, base_ckpt)
    saved.load_delta_weights(init)
    corpus = TokenCorpus.from_texts([d["text"] for d in read_jsonl(run.parent / "data" / "train.jsonl")],
                                    saved.tokenizer)
    batch = reading.make_batch(saved, corpus, 0)
    r = tiny_cfg.lora.decoder_rank
    for alpha in (tiny_cfg.lora.decoder_alpha, 4 * tiny_cfg.lora.decoder_alpha):  # any scale alpha / r
        cfg = copy.deepcopy(tiny_cfg)
        cfg.lora.decoder_rank, cfg.lora.decoder_alpha = 4 * r, alpha
        grown = _model(cfg, base_ckpt)
        grown.load_delta_weights(init)
        assert _loss_on(grown, batch) == pytest.approx(_loss_on(saved, batch), rel=1e-5)
        b = next(p for n, p in grown.peft_model.named_parameters() if "lora_B" in n and ".chunk_encoder." not in n)
        assert b.shape[1] == 4 * r and b[:, r:].abs().max() == 0  # the new directions start at zero
    grown.trainable(["decoder"])
    nll_loss(grown.refrag, batch).backward()
    b = next(p for n, p in grown.peft_model.named_parameters() if "lora_B" in n and ".chunk_encoder." not in n)
    assert b.grad[:, r:].abs().max() > 0  # and the new directions learn
    smaller = copy.deepcopy(tiny_cfg)
    smaller.lora.decoder_rank = max(1, r // 2)
    with pytest.raises(ValueError, match="only a larger decoder rank"):
        _model(smaller, base_ckpt).load_delta_weights(init)


def test_bf16_training_on_a_cpu_without_native_bf16_says_so(tiny_cfg, base_ckpt, monkeypatch):
    import warnings

    from refrag_train import model as training_model

    cfg = copy.deepcopy(tiny_cfg)
    cfg.run.dtype = "bfloat16"
    monkeypatch.setattr(training_model, "cpu_has_native_bf16", lambda: False)
    with pytest.warns(UserWarning, match="run.dtype=float32 trains faster"):
        _model(cfg, base_ckpt)
    monkeypatch.setattr(training_model, "cpu_has_native_bf16", lambda: True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _model(cfg, base_ckpt)
    assert not [w for w in caught if "AVX-512 BF16" in str(w.message)]


def test_extra_train_stages_must_name_stages(tiny_cfg, tmp_path):
    from refrag_train.cli import train_stages

    cfg = copy.deepcopy(tiny_cfg)
    cfg.data.extra_train_stages = ["pretraining"]
    with pytest.raises(SystemExit, match="extra_train_stages: unknown stage"):
        train_stages(cfg, tmp_path / "run", tmp_path, ["reconstruction"])


def test_missing_extra_data_folder_says_how_to_prepare_it(tiny_cfg, tmp_path):
    from refrag_train.cli import train_stages

    cfg = copy.deepcopy(tiny_cfg)
    cfg.data.extra_train = [str(tmp_path / "linux-doc")]
    with pytest.raises(SystemExit, match="refrag-train prepare --domain DOMAIN --out"):
        train_stages(cfg, tmp_path / "run", tmp_path, ["reconstruction"])
    assert not (tmp_path / "run").exists()


def test_export_writes_a_checkpoint_with_trained_heads(trained):
    from refrag_vllm.config import load_refrag_config

    ckpt, delta = trained
    raw, cfg = load_refrag_config(ckpt)
    assert raw["architectures"] == ["RefragLlamaForCausalLM"]
    assert cfg.projector_initialised == "trained" and cfg.expansion_policy is not None
    assert cfg.chunk_size == 4
    assert not (delta / "optimizer.pt").exists()
    assert sum(f.stat().st_size for f in delta.iterdir()) < 1_000_000


def test_export_serves_at_another_chunk_size(trained, tiny_cfg, base_ckpt, tmp_path):
    """``refrag-train export --chunk-size K``: the same weights, served at k = K."""
    from safetensors.torch import load_file

    from refrag_vllm.config import load_refrag_config
    from refrag_train.model import export_checkpoint

    ckpt, delta = trained
    out = export_checkpoint(tiny_cfg, delta, tmp_path / "k2", base_checkpoint=base_ckpt, chunk_size=2)
    assert load_refrag_config(out)[1].chunk_size == 2
    ours, theirs = load_file(str(out / "model.safetensors")), load_file(str(ckpt / "model.safetensors"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.parametrize("k", [0, -4, 2.5])
def test_a_chunk_size_below_one_token_is_refused(trained, tiny_cfg, base_ckpt, tmp_path, k):
    """k = 0 is refused where the weights are merged, not read as "the delta's k"; and by
    ``refrag-vllm build --k`` and ``refrag-train export --chunk-size`` before any model is loaded."""
    from refrag_train.cli import main as train_main
    from refrag_train.model import export_checkpoint
    from refrag_vllm.cli import main

    _, delta = trained
    with pytest.raises(ValueError, match="positive number of tokens"):
        export_checkpoint(tiny_cfg, delta, tmp_path / "bad", base_checkpoint=base_ckpt, chunk_size=k)
    with pytest.raises(SystemExit) as refused:
        main(["build", "--out", str(tmp_path / "built"), "--k", str(k)])
    assert refused.value.code == 2
    with pytest.raises(SystemExit) as refused:
        train_main(["export", "--config", "tiny", "--run-dir", str(tmp_path / "run"),
                    "--out", str(tmp_path / "exported"), "--chunk-size", str(k)])
    assert refused.value.code == 2
    assert not (tmp_path / "built").exists() and not (tmp_path / "exported").exists()


def test_export_delta_serves_an_earlier_stage(trained, base_ckpt, tmp_path):
    """``refrag-train export --delta`` exports the stage it is given, not the run's latest; a folder
    that is not a stage's weights is refused before anything is written."""
    from safetensors.torch import load_file

    from refrag_train.cli import main as train_main
    from refrag_vllm.delta import DELTA_DTYPE

    _, delta = trained
    run, stage = delta.parent, delta.parent / "reconstruction" / "final"
    with pytest.raises(SystemExit, match="not a stage's weights"):
        train_main(["export", "--config", "tiny", "--run-dir", str(tmp_path / "run"), "--out", str(tmp_path / "bad"),
                    "--delta", str(run)])
    assert not (tmp_path / "bad").exists() and not (tmp_path / "run").exists()
    out = tmp_path / "reconstruction"
    train_main(["export", "--config", "tiny", "--base-checkpoint", str(base_ckpt), "--run-dir", str(tmp_path / "run"),
                "--out", str(out), "--delta", str(stage)])
    exported = load_file(str(out / "model.safetensors"))["projector.fc1.weight"]
    for weights, same in ((stage, True), (delta, False)):  # delta: the run's latest (SFT) weights
        fc1 = load_file(str(weights / "refrag_heads.safetensors"))["projector.fc1.weight"]
        assert torch.equal(exported, fc1.to(DELTA_DTYPE).to(exported.dtype)) is same


@pytest.mark.engine
def test_vllm_and_reference_score_a_trained_checkpoint_identically(trained):
    from helpers import LOGPROB_ATOL, make_llm, shutdown_llm
    from vllm import SamplingParams

    from refrag_vllm import RefragPromptBuilder
    from refrag_vllm.reference import RefragReferenceModel

    ckpt, _ = trained
    builder = RefragPromptBuilder.from_pretrained(ckpt)
    reference = RefragReferenceModel.load(ckpt)
    prompts = [
        builder.build("What is the capital of France?", PASSAGES),
        builder.build("Which sequences are immutable?", PASSAGES, expand=[[0], [], [1, 2]]),
    ]
    llm = make_llm(ckpt, max_model_len=4096)
    try:
        outs = llm.generate(prompts, SamplingParams(max_tokens=8, temperature=0.0, logprobs=0), use_tqdm=False)
    finally:
        shutdown_llm(llm)
    for prompt, out in zip(prompts, outs):
        gen = list(out.outputs[0].token_ids)
        vllm_lp = [lp[t].logprob for t, lp in zip(gen, out.outputs[0].logprobs)]
        # The evaluation's scoring function on the same tokens.
        scored = dict(prompt, prompt_token_ids=list(prompt["prompt_token_ids"]) + gen)
        with torch.no_grad():
            ref_lp = reference.target_logprobs([scored], [len(gen)])[0].tolist()
        assert ref_lp == pytest.approx(vllm_lp, abs=LOGPROB_ATOL)
        # And greedy decoding agrees token for token.
        assert reference.greedy_generate(prompt, 8).token_ids == gen


def test_evaluation_writes_the_table(trained, tiny_cfg, tmp_path):
    from refrag_train.evaluate import evaluate

    ckpt, _ = trained
    result = evaluate(ckpt, _corpus_texts(), tiny_cfg.eval, tmp_path, qa_examples=_qa_examples())
    names = [r["condition"] for r in result["rows"]]
    assert names[:4] == ["No context", "Full context", "REFRAG4", "REFRAG8"]
    assert any("RL policy" in n for n in names) and any("random expansion" in n for n in names)
    by = {r["condition"]: r for r in result["rows"]}
    assert by["REFRAG8"]["positions"] < by["REFRAG4"]["positions"] < by["Full context"]["positions"]
    # Both controls feed another window's context: compressed (as REFRAG4) and raw (as Full context).
    assert by["REFRAG4, another window's chunks (control)"]["positions"] == by["REFRAG4"]["positions"]
    raw_control = by["Full context, another window's tokens (control)"]
    assert raw_control["positions"] == by["Full context"]["positions"]
    assert raw_control["per_window"] != by["Full context"]["per_window"]
    # The control's chunks but the window's own last one: the same positions, other scores.
    own_last = by["REFRAG4, another window's chunks but its own last"]
    assert own_last["positions"] == by["REFRAG4"]["positions"]
    assert own_last["per_window"] != by["REFRAG4, another window's chunks (control)"]["per_window"]
    assert all(math.isfinite(r["log_ppl"]) for r in result["rows"])
    # Each row's mean NLL at each continuation token over the windows; its mean is the row's log-PPL.
    for r in result["rows"]:
        assert len(r["per_position"]) == result["scored_tokens"]
        assert sum(r["per_position"]) / len(r["per_position"]) == pytest.approx(r["log_ppl"])
    assert (tmp_path / "content_by_position.png").stat().st_size > 0
    qa = {q["condition"]: q for q in result["qa"]}
    assert list(qa) == ["No passages", "Compressed passages", "Raw passages",
                        "Compressed, another question's passages (control)"]
    # The control: the same layout and positions as its treatment, another question's content.
    control, compressed = qa["Compressed, another question's passages (control)"], qa["Compressed passages"]
    assert control["per_example"] != compressed["per_example"]
    assert qa["No passages"]["gap_recovered"] == 0 and qa["Raw passages"]["gap_recovered"] == pytest.approx(1)
    assert qa["No passages"]["gain_over_none"] == 0
    assert compressed["gain_over_none"] == pytest.approx(
        qa["No passages"]["answer_log_ppl"] - compressed["answer_log_ppl"])
    # The content probe of the same text: every shape, every condition, finite.
    probe = result["probe"]
    assert [(r["n"], r["k"]) for r in probe["shapes"]] == [(1, 4), (2, 4)]
    assert all(math.isfinite(r[c]) for r in probe["shapes"] for c in ("own", "other", "mean", "none"))
    assert -1.0 <= probe["geometry"]["pairwise_cosine"] <= 1.0
    md = (tmp_path / "eval.md").read_text()
    assert "| REFRAG4 |" in md and "gap recovered" in md and "| 1x4 |" in md
    assert json.loads((tmp_path / "eval.json").read_text())["num_windows"] == tiny_cfg.eval.num_windows


def test_readout_reads_each_chunk_back_and_scores_table1s_windows(trained, tiny_cfg, tmp_path):
    """The read-out: each chunk decoded greedily from its vector alone (batched, as one-by-one
    decoding gives it), then continued from as raw tokens, on Table 1's own windows and rows."""
    from transformers import AutoTokenizer

    from refrag_train.diagnose import READOUT, READOUT_CONTROL, read_out, readout_content, readout_markdown
    from refrag_train.evaluate import RAW_CONTROL, evaluate
    from refrag_train.samples import TokenCorpus, context_sample, split_chunks
    from refrag_vllm.reference import RefragReferenceModel

    ckpt, _ = trained
    model = RefragReferenceModel.load(ckpt)
    tokenizer = AutoTokenizer.from_pretrained(str(ckpt))
    e, k = tiny_cfg.eval, model.refrag_config.chunk_size
    pid = model.refrag_config.placeholder_token_id
    chunks = split_chunks(TokenCorpus.from_texts(_corpus_texts()[:1], tokenizer).docs[0][:3 * k].tolist(), k)
    one_by_one = [model.greedy_generate(context_sample(tokenizer, pid, c, [], k, num_targets=0).prompt, k).token_ids
                  for c in chunks]
    assert read_out(model, tokenizer, chunks, batch_size=2) == one_by_one

    result = readout_content(model, tokenizer, _corpus_texts(), context_tokens=e.context_tokens,
                             continuation_tokens=e.continuation_tokens, num_windows=e.num_windows)
    table1 = evaluate(ckpt, _corpus_texts(), dataclasses.replace(e, probe_windows=0), tmp_path)
    rows = {r["condition"]: r for r in result["rows"]}
    for name in ("No context", "Full context", RAW_CONTROL, f"REFRAG{k}", f"REFRAG{k}, another window's chunks (control)"):
        assert rows[name]["per_window"] == pytest.approx(
            next(r for r in table1["rows"] if r["condition"] == name)["per_window"], abs=1e-5)
    content = result["content"]
    assert content["raw"]["mean"] == pytest.approx(rows[RAW_CONTROL]["log_ppl"] - rows["Full context"]["log_ppl"])
    assert content["read_out"]["mean"] == pytest.approx(rows[READOUT_CONTROL]["log_ppl"] - rows[READOUT]["log_ppl"])
    assert result["read_out_minus_compressed"]["mean"] == pytest.approx(
        content["read_out"]["mean"] - content["compressed"]["mean"])
    assert 0 <= result["token_accuracy"] <= 1 and 0 <= result["token_recall"] <= 1
    assert "| Read-out context |" in readout_markdown(result)


def test_shipped_delta_is_small_and_complete():
    from refrag_vllm.delta import SHIPPED_DELTA, read_delta_meta

    if not (SHIPPED_DELTA / "refrag_delta.json").exists():
        pytest.skip("no trained delta shipped yet")
    meta = read_delta_meta(SHIPPED_DELTA)
    # The policy reads encoder vectors: MiniLM's 384, or SmolLM2's own 576 (decoder-layers:N).
    encoder_width = 576 if (meta.get("encoder") or "").startswith("decoder-layers:") else 384
    assert meta["chunk_size"] == 16 and meta["expansion_policy"]["in_dim"] == encoder_width
    size = sum(f.stat().st_size for f in SHIPPED_DELTA.iterdir())
    assert size < 20 * 2**20, size
    for name in ("adapter_config.json", "adapter_model.safetensors", "refrag_heads.safetensors"):
        assert (SHIPPED_DELTA / name).exists()
    assert json.loads((SHIPPED_DELTA / "adapter_config.json").read_text())["base_model_name_or_path"] is None
    _assert_no_machine_paths(SHIPPED_DELTA.parent)


def _assert_no_machine_paths(folder) -> None:
    """No file below ``folder`` names a machine's absolute path."""
    absolute = re.compile(rb"(?<![\w.:/])/(?:work|root|home|tmp|usr|opt|mnt|Users|var)/")
    for path in folder.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            if path.suffix == ".safetensors":  # its JSON header is the only text in it
                data = data[8 : 8 + int.from_bytes(data[:8], "little")]
            assert not absolute.search(data), f"{path} holds an absolute path: {absolute.search(data)}"


@pytest.mark.slow
def test_stage_weights_resume_the_cpu_recipe():
    """refrag_train/stage_weights/*: run folders whose last stage is finished, whose weights load
    into the CPU recipe's model as they are, and which name no machine's path."""
    from pathlib import Path

    from refrag_train.cli import STAGES, latest_delta
    from refrag_train.model import TrainingModel
    from refrag_vllm.delta import read_delta_meta

    root = Path(__file__).resolve().parents[1] / "refrag_train" / "stage_weights"
    runs = sorted(p for p in root.iterdir() if p.is_dir())
    assert [p.name for p in runs] == ["cpu-contrastive-reading", "cpu-mix-reading", "cpu-policy", "cpu-prose-reading",
                                      "cpu-reading", "cpu-sequence_reading"]
    model = TrainingModel(load_config("cpu"))
    for run in runs:
        final = latest_delta(run)
        stage = final.parent.name
        assert read_delta_meta(final)["stage"] == stage and run.name.endswith(f"-{stage}")
        # cpu-policy is the recipe before its sequence-reading stage (the SFT arms' start, ABLATIONS.md);
        # cpu-contrastive-reading the recipe with reconstruction.contrastive_weight = 3, to its reading;
        # cpu-prose-reading that reading continued on the fortunes, cpu-mix-reading on them and the Python docs
        recipe = [s for s in STAGES if s != "sequence_reading" or run.name != "cpu-policy"]
        assert all((run / s / "metrics.jsonl").exists() for s in recipe[: recipe.index(stage) + 1])
        model.load_delta_weights(final)
        assert json.loads((final / "adapter_config.json").read_text())["base_model_name_or_path"] is None
    _assert_no_machine_paths(root)


def test_default_checkpoint_rebuilt_when_shipped_weights_change(tmp_path):
    """A checkpoint built from the shipped delta is stale once that delta changes; others are left alone."""
    from refrag_vllm.engine import BUILT_FROM, stale_default_checkpoint
    from refrag_vllm.delta import SHIPPED_DELTA, delta_fingerprint

    if not (SHIPPED_DELTA / "refrag_delta.json").exists():
        pytest.skip("no trained delta shipped yet")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")

    def built_from(delta, shipped, sha):
        (ckpt / BUILT_FROM).write_text(json.dumps({"delta": delta, "shipped": shipped, "delta_sha256": sha}))

    built_from(str(SHIPPED_DELTA), True, delta_fingerprint(SHIPPED_DELTA))
    assert stale_default_checkpoint(ckpt) is None
    built_from(str(SHIPPED_DELTA), True, "0" * 64)
    assert "changed" in stale_default_checkpoint(ckpt)
    built_from(str(tmp_path / "my-delta"), False, "0" * 64)  # the user's own weights
    assert stale_default_checkpoint(ckpt) is None
    built_from(None, False, None)  # --no-delta
    assert stale_default_checkpoint(ckpt) is None
    (ckpt / BUILT_FROM).unlink()  # no record, not at the default path
    assert stale_default_checkpoint(ckpt) is None
    # The fingerprint follows the bytes of the delta's files.
    copy = tmp_path / "delta"
    shutil.copytree(SHIPPED_DELTA, copy)
    assert delta_fingerprint(copy) == delta_fingerprint(SHIPPED_DELTA)
    meta = json.loads((copy / "refrag_delta.json").read_text())
    (copy / "refrag_delta.json").write_text(json.dumps({**meta, "step": meta["step"] + 1}))
    assert delta_fingerprint(copy) != delta_fingerprint(SHIPPED_DELTA)


def test_builder_expands_the_chunks_the_policy_picks(trained):
    from refrag_vllm import RefragPromptBuilder
    from refrag_vllm.expansion_policy import num_expanded
    from refrag_vllm.reference import RefragReferenceModel

    ckpt, _ = trained
    builder = RefragPromptBuilder.from_pretrained(ckpt, load_policy=True)
    num_chunks = [len(builder.chunk_passage(p)) for p in PASSAGES]
    expand = builder.policy_expansions(PASSAGES, 0.25)
    assert sum(map(len, expand)) == num_expanded(sum(num_chunks), 0.25)
    assert all(0 <= j < n for e, n in zip(expand, num_chunks) for j in e)
    # The same choice as the policy inside the reference model, over the same chunk vectors.
    reference = RefragReferenceModel.load(ckpt)
    from refrag_vllm.prompt import chunk_text

    texts = [chunk_text(builder.tokenizer, c) for p in PASSAGES for c in builder.chunk_passage(p)]
    with torch.no_grad():
        picks = choose_expansions(reference.expansion_policy, reference.encode_texts(texts).float(), 0.25)
    flat = [sum(num_chunks[:i]) + j for i, e in enumerate(expand) for j in e]
    assert sorted(flat) == picks
    by_policy = builder.build("Q?", PASSAGES, expand_fraction=0.25)
    by_hand = builder.build("Q?", PASSAGES, expand=expand)
    assert by_policy["prompt_token_ids"] == by_hand["prompt_token_ids"]
    # The policy's encoder vectors stand in for the compressed chunks' texts: same scores.
    assert {i.kind for i in by_policy["multi_modal_data"]["refrag_chunk"]} == {"encoder"}
    with torch.no_grad():
        lp_policy, lp_hand = reference.target_logprobs([by_policy, by_hand], [4, 4])
    torch.testing.assert_close(lp_policy, lp_hand, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="load_policy"):
        RefragPromptBuilder.from_pretrained(ckpt).build("Q?", PASSAGES, expand_fraction=0.25)


def test_training_curves_plot(trained, tmp_path):
    from refrag_train.plots import plot_training

    ckpt, _ = trained
    png = plot_training(ckpt.parent / "run", tmp_path / "curves.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_training_curves_plot_a_group_missing_at_some_steps(tmp_path):
    """CPT with distillation logs its reconstruction group only at steps that drew one."""
    from refrag_train.plots import plot_training

    rows = [{"step": 1, "loss": 3.0, "loss_paragraph_kl": 0.5},
            {"step": 2, "loss": 5.0, "loss_reconstruction": 4.0, "loss_paragraph_kl": 1.0}]
    (tmp_path / "run" / "cpt").mkdir(parents=True)
    (tmp_path / "run" / "cpt" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    png = plot_training(tmp_path / "run", tmp_path / "curves.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_command_on_a_domain_without_questions(trained, tmp_path):
    """``refrag-train eval --data DIR`` where ``prepare`` wrote an empty ``qa_heldout.jsonl`` (a
    domain with no QA set): Table 1 alone, not an error."""
    from refrag_train.cli import main
    from refrag_train.data import write_jsonl

    data = tmp_path / "data"
    write_jsonl(data / "heldout.jsonl", [{"id": str(i), "text": t} for i, t in enumerate(_corpus_texts())])
    (data / "qa_heldout.jsonl").write_text("")
    main(["eval", "--config", "tiny", "--data", str(data), "--checkpoint", str(trained[0]),
          "--out", str(tmp_path / "eval"), "--set", "eval.probe_windows=0"])
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert result["rows"] and "qa" not in result


def test_content_summary_by_hand():
    """Compressed content (REFRAG-k over its another-window control) beside raw content (full
    context over another window's tokens), and the share of the raw one the vectors carry."""
    from refrag_train.evaluate import content_summary, markdown_table

    def row(name, recovered, per_window):
        return {"condition": name, "gap_recovered": recovered, "per_window": per_window, "positions": 1,
                "log_ppl": sum(per_window) / len(per_window)}

    rows = [row("No context", 0.0, [4.0, 4.0]), row("Full context", 1.0, [3.0, 3.0]),
            row("REFRAG16", 0.3, [3.6, 3.8]), row("REFRAG16, another window's chunks (control)", 0.1, [3.8, 3.9]),
            row("Full context, another window's tokens (control)", 0.6, [3.4, 3.4])]
    c = content_summary(rows)
    assert c["treatment"] == "REFRAG16"
    assert c["compressed"] == pytest.approx(0.2) and c["raw"] == pytest.approx(0.4)
    assert c["share"] == pytest.approx(0.5)
    assert c["compressed_nats"] == pytest.approx(0.15) and c["compressed_nats_se"] == pytest.approx(0.05)
    assert content_summary(rows[:4]) is None  # no raw control: nothing to read the content against
    md = markdown_table({"rows": rows, "context_tokens": 256, "continuation_tokens": 64, "scored_tokens": 63,
                         "num_windows": 2, "num_heldout_docs": 2})
    assert "compressed (REFRAG16) 20 points (+0.150 ± 0.050 nats" in md
    assert "raw tokens 40 points; the vectors carry 50% of it" in md


def test_content_by_position_by_hand():
    """The content line by where the scored token sits: each span's mean over its tokens."""
    from refrag_train.evaluate import content_by_position, markdown_table

    curves = {"No context": [6.0, 4.0, 3.0, 3.0], "Full context": [2.0, 2.0, 2.0, 2.0],
              "REFRAG16": [4.0, 3.0, 2.8, 2.8], "REFRAG16, another window's chunks (control)": [5.0, 3.5, 2.9, 2.9],
              "Full context, another window's tokens (control)": [6.0, 3.0, 2.5, 2.5]}
    rows = [{"condition": n, "per_position": c, "per_window": [sum(c) / 4], "log_ppl": sum(c) / 4,
             "positions": 1, "gap_recovered": (4.0 - sum(c) / 4) / 2.0} for n, c in curves.items()]
    first, rest = content_by_position(rows, spans=((1, 1), (2, None)))
    assert first["tokens"] == "1–1" and first["gap"] == pytest.approx(4.0)
    assert first["compressed"] == pytest.approx(1.0) and first["raw"] == pytest.approx(4.0)
    assert first["share"] == pytest.approx(0.25)
    assert rest["tokens"] == "2–4" and rest["compressed"] == pytest.approx((0.5 + 0.1 + 0.1) / 3)
    assert rest["raw"] == pytest.approx((1.0 + 0.5 + 0.5) / 3)
    assert content_by_position(rows[:4]) == []  # no raw control
    md = markdown_table({"rows": rows, "context_tokens": 256, "continuation_tokens": 5, "scored_tokens": 4,
                         "num_windows": 1, "num_heldout_docs": 1})
    assert "| 1–4 | 2.000 | +0.425 | +1.500 | 28% |" in md  # the default spans, cut at the last token


def test_compare_arms_pairs_two_runs_question_by_question(tmp_path):
    """``python -m refrag_train.compare_arms RUN CONTROL``: each condition's RUN − CONTROL over the
    same questions, "better" meaning a lower log-PPL and a higher content recall."""
    from refrag_train.compare_arms import compare, main, markdown

    def arm(name, log_ppl, answers):
        run = tmp_path / name
        (run / "eval-qa518").mkdir(parents=True)
        (run / "qa-python").mkdir()
        qa = [{"condition": c, "per_example": v} for c, v in log_ppl.items()]
        (run / "eval-qa518" / "eval.json").write_text(json.dumps({"qa": qa}))
        rows = [{"id": i, "question": f"q{i}", "reference": "Paris is the capital of France.", "Compressed": a}
                for i, a in enumerate(answers)]
        (run / "qa-python" / "answers.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return run

    run = arm("run", {"No passages": [3.0, 3.0, 3.0], "Compressed": [2.0, 2.5, 3.5]}, ["Paris, France", "Paris", "no"])
    control = arm("control", {"No passages": [3.0, 3.0, 3.0], "Compressed": [2.5, 2.5, 3.0]}, ["Paris", "Paris", "no"])
    result = compare(run, control)
    log_ppl = {r["condition"]: r for r in result["answer_log_ppl"]}
    assert log_ppl["Compressed"]["mean"] == pytest.approx(0.0)
    assert (log_ppl["Compressed"]["better"], log_ppl["Compressed"]["worse"]) == (1, 1)
    assert log_ppl["No passages"]["mean"] == 0.0 and log_ppl["No passages"]["better"] == 0
    (recall,) = result["greedy_recall"]
    assert recall["condition"] == "Compressed" and recall["mean"] == pytest.approx(1 / 3 / 3)
    assert (recall["better"], recall["worse"]) == (1, 0)
    assert "| Compressed | +0.000 ± 0.289 | 1 / 1 |" in markdown(result)
    # Arms that answered different questions are refused, not paired.
    other = arm("other", {"No passages": [3.0, 3.0], "Compressed": [2.0, 2.0]}, ["Paris", "Paris"])
    with pytest.raises(ValueError, match="different numbers of questions"):
        compare(run, other)
    with pytest.raises(SystemExit, match="share no"):
        main([str(run), str(tmp_path / "missing")])
    # Table 1, paired window by window, with the content (control − REFRAG-k) higher being better.
    def table1(name, refrag, control):
        run = tmp_path / name
        (run / "eval-gcide").mkdir(parents=True)
        rows = [{"condition": "REFRAG16", "per_window": refrag},
                {"condition": "REFRAG16, another window's chunks (control)", "per_window": control}]
        (run / "eval-gcide" / "eval.json").write_text(json.dumps({"rows": rows}))
        return run

    result = compare(table1("t-run", [3.0, 3.2], [3.5, 3.5]), table1("t-control", [3.2, 3.2], [3.4, 3.6]),
                     eval_name="eval-gcide")
    assert "answer_log_ppl" not in result  # that eval has no QA table
    windows = {r["condition"]: r for r in result["window_log_ppl"]}
    assert windows["REFRAG16"]["mean"] == pytest.approx(-0.1) and windows["REFRAG16"]["better"] == 1
    content = windows["content (control − REFRAG16)"]  # (0.5, 0.3) against (0.2, 0.4)
    assert content["mean"] == pytest.approx(0.1) and (content["better"], content["worse"]) == (1, 1)
    # The QA table's content: another question's compressed passages minus the question's own.
    qa = {"Compressed passages": [2.0, 2.5], "Compressed, another question's passages (control)": [3.0, 2.6]}
    qa_control = {"Compressed passages": [2.0, 2.0], "Compressed, another question's passages (control)": [2.5, 2.5]}
    result = compare(arm("q-run", qa, ["Paris", "Paris"]), arm("q-control", qa_control, ["Paris", "Paris"]))
    answers = {r["condition"]: r for r in result["answer_log_ppl"]}
    content = answers["content (control − compressed)"]  # (1.0, 0.1) against (0.5, 0.5)
    assert content["mean"] == pytest.approx(0.05) and (content["better"], content["worse"]) == (1, 1)


@pytest.mark.parametrize("change, frozen, learning", [
    ({"decoder_lr_scale": 0.0}, "decoder", "projector"),  # the decoder's LoRA at no share of the lr
    ({"train_projector": False}, "projector", "decoder"),  # the vectors stay as reading left them
])
def test_cpt_trains_the_groups_it_is_told_to(tiny_cfg, base_ckpt, tmp_path, change, frozen, learning):
    """``cpt.decoder_lr_scale = 0`` freezes the decoder's LoRA, ``cpt.train_projector = false`` the
    projector; the other one learns."""
    import dataclasses

    from refrag_train import cpt

    cfg = dataclasses.replace(tiny_cfg, cpt=dataclasses.replace(tiny_cfg.cpt, train_decoder=True, **change))
    model = _model(cfg, base_ckpt)
    _assert_stage_trains(model, lambda: cpt.train_cpt(model, _corpus(model), tmp_path), frozen, learning)


def _assert_stage_trains(model, train, frozen: str, learning: str) -> None:
    """After ``train()``, every weight of group ``frozen`` is as it was, and some of ``learning``'s moved."""
    groups = model.named_groups()
    before = {g: [p.detach().clone() for _, p in groups[g]] for g in (frozen, learning)}
    train()
    groups = model.named_groups()
    assert before[frozen] and all(torch.equal(a, p) for a, (_, p) in zip(before[frozen], groups[frozen]))
    assert any(not torch.equal(a, p) for a, (_, p) in zip(before[learning], groups[learning]))


def test_reading_with_the_decoder_frozen_trains_only_the_vectors(tiny_cfg, base_ckpt, tmp_path):
    """``reading.train_decoder = false``: the decoder stays as reconstruction left it, and the
    projector (the chunk vectors) goes on learning to be read."""
    import dataclasses

    from refrag_train import reading

    cfg = dataclasses.replace(tiny_cfg, reading=dataclasses.replace(tiny_cfg.reading, train_decoder=False, steps=2))
    model = _model(cfg, base_ckpt)
    _assert_stage_trains(model, lambda: reading.train_reading(model, _corpus(model), tmp_path), "decoder", "projector")


def test_chunk_contrastive_loss_by_hand(tiny_cfg, base_ckpt):
    """Vectors that are their own chunks' mean token embeddings score near 0 at a low
    temperature; the same vectors one chunk off score high; and the value is the cross-entropy
    of centred cosines, computed here by hand."""
    from refrag_train.trainer import chunk_contrastive_loss
    from refrag_vllm.chunks import CompressedChunks

    model = _model(tiny_cfg, base_ckpt)
    texts = [" ".join(p.split()[i:i + 4]) for p in PASSAGES for i in (0, 8)]  # six distinct chunks
    items = [CompressedChunks.from_texts(texts[:2]), CompressedChunks.from_texts(texts[2:])]
    embed = model.refrag.get_input_embeddings()
    with torch.no_grad():
        means = torch.stack([embed(torch.tensor(model.tokenizer(t, add_special_tokens=False)["input_ids"])).mean(0)
                             for t in texts])
    own = chunk_contrastive_loss(model, items, [means[:2], means[2:]], temperature=0.01)
    shifted = means.roll(1, 0)
    off = chunk_contrastive_loss(model, items, [shifted[:2], shifted[2:]], temperature=0.01)
    assert own.item() < 0.05 and off.item() > 10 * max(own.item(), 0.1)
    vectors = torch.randn(len(texts), means.shape[1])
    v = torch.nn.functional.normalize(vectors - vectors.mean(0), dim=-1)
    t = torch.nn.functional.normalize(means - means.mean(0), dim=-1)
    by_hand = -torch.log_softmax(v @ t.T / 0.1, -1).diagonal().mean()
    got = chunk_contrastive_loss(model, items, [vectors[:2], vectors[2:]], temperature=0.1)
    assert got.item() == pytest.approx(by_hand.item(), rel=1e-5)
    with pytest.raises(ValueError, match="5 projected vectors for 6 text chunks"):
        chunk_contrastive_loss(model, items, [vectors[:2], vectors[2:5]], temperature=0.1)


@pytest.mark.parametrize("stage", ["reconstruction", "reading"])
def test_a_contrastive_term_is_logged_in_both_parts_and_lowered(stage, tiny_cfg, base_ckpt, tmp_path):
    """``reconstruction.contrastive_weight`` (and ``reading.``'s): each logged loss is the NLL
    plus the weighted contrastive term, the NLL is the plain stage's loss on the same batch, and
    training lowers the contrastive term on a fixed batch."""
    import dataclasses

    from refrag_train import reading, reconstruction
    from refrag_train.trainer import chunk_contrastive_loss, project_sample_items, sample_items

    term = {"contrastive_weight": 0.5, "contrastive_temperature": 0.1}
    cfg = dataclasses.replace(tiny_cfg, **{stage: dataclasses.replace(getattr(tiny_cfg, stage), **term)})
    model = _model(cfg, base_ckpt)
    corpus = _corpus(model)
    if stage == "reconstruction":
        fixed = reconstruction.make_batch(model, corpus, reconstruction.plan(model), 0)
        train = lambda: reconstruction.train_reconstruction(model, corpus, tmp_path)  # noqa: E731
    else:
        fixed = reading.make_batch(model, corpus, 0)
        train = lambda: reading.train_reading(model, corpus, tmp_path)  # noqa: E731

    def contrastive() -> float:
        with torch.no_grad():
            return chunk_contrastive_loss(model, sample_items(fixed), project_sample_items(model.refrag, fixed),
                                          0.1).item()

    before, first_nll = contrastive(), _loss_on(model, fixed)
    train()
    log = [json.loads(line) for line in (tmp_path / stage / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isclose(r["loss"], r["nll"] + 0.5 * r["contrastive"], rel_tol=1e-5) for r in log)
    assert log[0]["nll"] == pytest.approx(first_nll, rel=1e-5)
    assert contrastive() < before
