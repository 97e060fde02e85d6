"""Tasks and their verifiers: the floor every stage may use.

  dual_regime.py  generated AutoThink tasks (easy/hard, several domains) and user task records
  verifiers.py    is this answer right for this task (exact, choice, math, code)
  rewards/        verifiable rewards: sandboxed code, SymPy math in a worker, a reward pool
"""
