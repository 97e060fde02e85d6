"""AutoThink data: dual-regime tasks, verifiers, mode tagging, cold-start SFT (KAT-V1 §4.1)."""
