"""Reinforcement learning: GRPO-family objectives, Step-SRPO, curricula and verifiable rewards."""
