"""AutoThink data: dual-regime tasks, verifiers, mode tagging, cold-start SFT (seed 001 §4.1)."""
