from setuptools import find_packages, setup

setup(
    name="jdistill",
    version="0.1.0",
    description="Task-specific LLM compression (structured pruning + distillation) in JAX/Flax "
                "NNX, with fitted scaling laws",
    python_requires=">=3.10",
    packages=find_packages(include=["jdistill", "jdistill.*", "experiments"]),
    # the data sets the mains, demo and tests read (jdistill/shipped_data/MANIFEST.md)
    package_data={"jdistill": ["shipped_data/*.md", "shipped_data/**/*"]},
    entry_points={"console_scripts": ["jdistill = experiments.cli:console"]},
    install_requires=[
        "jax>=0.7",
        "flax>=0.12",
        "optax",
        "orbax-checkpoint",
        "absl-py",
        "numpy",
        "ml_dtypes",  # bfloat16 tensors in safetensors / GGUF files
        "scipy",
        "matplotlib",
        "safetensors",
        "tokenizers",
        "transformers>=4.45",
        "jinja2",  # transformers' apply_chat_template (the teacher's CoT prompts) needs it
        "datasets",  # tasks given as hub names or save_to_disk folders
        "pyarrow",  # parquet task files
        "gguf",
    ],
    extras_require={
        # References the tests compare against (torch + accelerate: transformers' models and
        # GGUF loading; scikit-learn: macro-F1; lm-eval: the harness's HF model), the
        # optional extras' packages (tensorboardX, wandb, lm-eval), chex (tree assertions)
        # and the runner.
        "test": ["torch==2.13.0", "accelerate", "scikit-learn", "tensorboardX", "chex",
                 "lm-eval==0.4.13", "wandb", "pytest", "pytest-xdist"],
        # jdistill models inside lm-evaluation-harness (jdistill.eval.harness, evaluate
        # --harness_tasks); pinned: the tests check equality against this version's HFLM
        "harness": ["lm-eval==0.4.13"],
        # the wandb logger (--loggers=tensorboard,wandb); tensorboardX for the tensorboard one
        "loggers": ["wandb", "tensorboardX"],
    },
)
