"""``refrag-vllm demo`` prints its positions and answers, not the engine's start-up logs."""

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.engine

ENGINE_LOG_LINES = ("Triton", "NUMA", "Loading safetensors", "INFO ", "WARNING ")


def run_demo(model):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("VLLM_", "TQDM_", "TRANSFORMERS_VERBOSITY"))}
    out = subprocess.run([sys.executable, "-m", "refrag_vllm.cli", "demo", "--model", str(model)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout + out.stderr


def test_demo_prints_answers_only(tiny_ckpt):
    text = run_demo(tiny_ckpt)
    lines = [line for line in text.splitlines() if line.strip()]
    assert sum(line.startswith("A:") for line in lines) == 3  # compressed, raw, no passages (no policy here)
    assert any(line.startswith("decoder positions compressed:") for line in lines)
    noise = [line for line in lines if any(s in line for s in ENGINE_LOG_LINES)]
    assert not noise, noise
