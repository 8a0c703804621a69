from setuptools import find_packages, setup

setup(
    name="jdistill",
    version="0.1.0",
    description="Task-specific LLM compression (structured pruning + distillation) in JAX/Flax "
                "NNX, with fitted scaling laws",
    python_requires=">=3.10",
    packages=find_packages(include=["jdistill", "jdistill.*", "experiments"]),
    install_requires=[
        "jax>=0.7",
        "flax>=0.12",
        "optax",
        "orbax-checkpoint",
        "chex",
        "absl-py",
        "numpy",
        "scipy",
        "matplotlib",
        "safetensors",
        "tokenizers",
        "transformers>=4.45",
        "jinja2",  # transformers' apply_chat_template (the teacher's CoT prompts) needs it
        "datasets",
        "gguf",
    ],
    extras_require={
        # torch is only the reference implementation the tests compare against.
        "test": ["torch==2.13.0", "accelerate", "tensorboardX", "pytest", "pytest-xdist"],
    },
)
