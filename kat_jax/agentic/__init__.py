"""Agentic RL on prefix trees: trajectory tries, depth-first packing, pruning."""
