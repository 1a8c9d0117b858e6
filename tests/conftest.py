import gc
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

LOGPROB_ATOL = 1e-3
"""vLLM vs reference, fp32 tiny models: CPU attention kernels vs torch SDPA differ ~1e-6."""

PASSAGES = [
    "Paris is the capital of France and Berlin is the capital of Germany. "
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Python lists are mutable sequences; tuples are immutable sequences. "
    "Numbers like 12345 and 67890 appear in tables, logs and reports.",
    "Retrieval augmented generation adds passages from an index to the prompt. "
    "The encoder embeds each chunk and a projector maps it into the decoder space.",
]
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    from tiny_models import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-refrag", k=16, max_positions=8192)


def load_reference_and_builder(ckpt):
    """The PyTorch reference and the prompt builder of one checkpoint."""
    from refrag_vllm import RefragPromptBuilder
    from refrag_vllm.reference import RefragReferenceModel

    return RefragReferenceModel.load(ckpt), RefragPromptBuilder.from_pretrained(ckpt)


@pytest.fixture(scope="session")
def tiny_reference_and_builder(tiny_ckpt):
    return load_reference_and_builder(tiny_ckpt)


@pytest.fixture(scope="session")
def reference(tiny_reference_and_builder):
    return tiny_reference_and_builder[0]


@pytest.fixture(scope="session")
def builder(tiny_reference_and_builder):
    return tiny_reference_and_builder[1]


def make_llm(model_dir, **kwargs):
    from vllm import LLM

    args = dict(model=str(model_dir), enforce_eager=True, dtype="float32", max_model_len=8192,
                max_num_seqs=8, seed=0, block_size=32)
    args.update(kwargs)
    return LLM(**args)


def shutdown_llm(llm):
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:
        pass
    del llm
    gc.collect()


def greedy(llm, prompts, max_tokens=8):
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, logprobs=0, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    result = []
    for o in outs:
        c = o.outputs[0]
        result.append((list(c.token_ids), [lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids)], o))
    return result


def assert_matches_reference(reference, prompt, vllm_result, max_tokens=8):
    tokens, logprobs, _ = vllm_result
    ref = reference.greedy_generate(prompt, max_tokens)
    assert tokens == ref.token_ids
    for a, b in zip(logprobs, ref.logprobs):
        assert abs(a - b) < LOGPROB_ATOL, (logprobs, ref.logprobs)
