"""kat_jax: a JAX/Flax reproduction of the KAT training system (KAT-V1 and KAT-Dev/KAT-Coder)."""

__version__ = "0.1.0"
