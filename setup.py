from setuptools import find_packages, setup

setup(
    name="tinyllm-jax",
    version="0.1.0",
    description="JAX/TPU-native multi-teacher reasoning distillation into T5 and decoder-only students",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["tinyllm_jax", "tinyllm_jax.*"]),
    install_requires=[
        "jax>=0.7",
        "flax>=0.11",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "transformers>=4.50",
        "datasets>=3.0",
        "sentencepiece>=0.2",
        "safetensors>=0.4",
        "tokenizers>=0.20",
        "protobuf",
        "numpy",
        "pyyaml",
        "tqdm",
        "tensorboardX",
        "matplotlib",
        "httpx2",  # teacher requests (the HTTP client transformers' own hub client uses)
        "jinja2",  # teacher prompt templates
    ],
    extras_require={
        # torch is the parity oracle (transformers' PyTorch T5) and the reference
        # benchmark: never imported by the trainer itself.
        "test": ["pytest>=8", "torch>=2.4", "transformers[serving]"],
        "tfds": ["tensorflow-datasets"],
        "tpu": ["jax[tpu]"],
        "gpu": ["jax[cuda12]"],
    },
    entry_points={"console_scripts": ["tinyllm=tinyllm_jax.cli:entry"]},
)
