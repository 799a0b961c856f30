"""megatron_pd: pre-training distillation for LLMs on NVIDIA Megatron-Core."""

from setuptools import find_packages, setup

setup(
    name="megatron_pd",
    version="0.1.0",
    description="Pre-training distillation (online and offline) on Megatron-Core",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["megatron_pd", "megatron_pd.*"]),
    # Tested: 3.11 (megatron-core 0.16.1, the newest for 3.11) and 3.12 (megatron-core 0.19.2).
    python_requires=">=3.11,<3.13",
    install_requires=[
        # Install the CPU or CUDA torch you want first (see README); any 2.6+ works.
        "torch>=2.6",
        # The tested range: 0.16.1 on Python 3.11 (the newest release for 3.11) and 0.19.2 on
        # Python 3.12 (NVIDIA's containers); CI (.ci/run) tests both stacks.
        "megatron-core>=0.16.1,<0.20",
        "numpy",
        "packaging>=24.2",
        "pyyaml>=6",
        "sentencepiece>=0.2",
        "tensorboard>=2.14",
        # dist_checkpointing hangs on save without psutil.
        "psutil",
        "matplotlib>=3.7",
        # Compression of the offline logits store.
        "zstandard>=0.22",
        # Hugging Face tokenizers (tokenizer.json) and weights (safetensors, read by slices);
        # transformers itself is never needed to train.
        "tokenizers>=0.20",
        "safetensors>=0.4.3",
    ],
    extras_require={
        # GPU extras, imported lazily; the local layer spec and torch norms are used without them.
        "gpu": ["transformer-engine[pytorch]>=2.9,<2.12", "triton>=3.1"],
        "triton": ["triton>=3.1"],
        # Scoring: lm-evaluation-harness (the megatron_pd backend, and its hf backend for
        # exported students) and transformers.
        "eval": ["transformers>=5.0", "lm-eval>=0.4.9", "accelerate>=1.0"],
        # tools/bench_peers.py: the peers it measures the loss against (tested: 0.47.0, 0.8.5;
        # both run on CPU torch, ModelOpt's Megatron plugin with the CPU adaptation).
        "bench": ["nvidia-modelopt>=0.47", "liger-kernel>=0.8.5"],
        # Tests compare against transformers and lm-eval (tiny local models, local tasks) and
        # fuzz every file reader with hypothesis.
        "dev": [
            "pytest>=8",
            "hypothesis>=6.100",
            "ruff>=0.6",
            "triton>=3.1",
            "transformers>=5.0",
            "lm-eval>=0.4.9",
            "accelerate>=1.0",
        ],
    },
)
