"""Writes the Colab notebooks of this folder from the cell sources below (run after editing).

  python notebooks/make_notebooks.py

Each notebook starts with an install cell (`INSTALL`): a no-op when kat_jax is importable (CI,
`pip install -e .`); else it installs the checkout it runs in, or `git+` the repository URL
the user sets in the cell (REPO_URL) or in $KAT_JAX_REPO_URL.
Each runs top to bottom on CPU at tiny size in well under a minute on an idle machine.
"""

from __future__ import annotations

import os
import sys

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = os.path.dirname(os.path.abspath(__file__))

# The install cell's functions, kept apart so tests can exec them without installing anything.
INSTALL_FUNCTIONS = '''\
# Make kat_jax importable: (a) already importable (CI, `pip install -e .`): nothing to do;
# (b) inside a checkout (setup.py with kat_jax/ beside it, at or above the working directory,
#     or a clone in ./kat_jax, e.g. Colab's /content/kat_jax): `pip install -e` it;
# (c) else `pip install git+<REPO_URL>`.
# In Colab without a clone: set REPO_URL below (or the KAT_JAX_REPO_URL environment variable)
# to the git URL of the kat_jax repository you use, e.g. your fork's
# "https://github.com/<you>/kat_jax", then run this cell.
REPO_URL = ""

import importlib
import importlib.util
import os
import subprocess
import sys


def find_checkout(start="."):
  """The kat_jax checkout at or above `start` (or a clone in `start`/kat_jax), else None."""
  here = os.path.abspath(start)
  candidates = [os.path.join(here, "kat_jax")]
  while True:
    candidates.append(here)
    if os.path.dirname(here) == here:
      break
    here = os.path.dirname(here)
  for path in candidates:
    if (os.path.isfile(os.path.join(path, "setup.py"))
        and os.path.isdir(os.path.join(path, "kat_jax"))):
      return path
  return None


def install_kat_jax(start="."):
  """Installs kat_jax unless importable; returns what it did. RuntimeError when it cannot."""
  if importlib.util.find_spec("kat_jax") is not None:
    return "kat_jax is already importable"
  checkout = find_checkout(start)
  repo_url = os.environ.get("KAT_JAX_REPO_URL") or REPO_URL
  how = (
      "set REPO_URL at the top of this cell (or os.environ['KAT_JAX_REPO_URL']) to the "
      "repository's git URL, or clone the repository and open the notebook from inside it")
  if checkout is None and not repo_url:
    raise RuntimeError(f"kat_jax is not installed and no checkout was found: {how}")
  target = ["-e", checkout] if checkout else [f"git+{repo_url}"]
  env = dict(os.environ, GIT_TERMINAL_PROMPT="0")  # fail, not prompt, on a bad URL
  try:
    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", *target], env=env)
  except subprocess.CalledProcessError as e:
    raise RuntimeError(f"`pip install {' '.join(target)}` failed ({e}): {how}") from e
  if checkout:  # an editable install's path hook only loads at start-up: import it now
    sys.path.insert(0, checkout)
  importlib.invalidate_caches()
  return f"installed kat_jax from {checkout or repo_url}"
'''

INSTALL = INSTALL_FUNCTIONS + """

print(install_kat_jax())
"""

COMMON_IMPORTS = '''\
%matplotlib inline
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
'''


def model_tour() -> list:
  return [
      new_markdown_cell(
          "# kat_jax model tour\n\n"
          "Load a Hugging Face checkpoint, run a forward pass, then generate with AutoThink "
          "forced on and off. Set `HF_DIR` to a Qwen2.5-style checkpoint directory "
          "(config.json + safetensors) and `TOKENIZER = \"qwen2.5\"` to tour a real model; "
          "left empty, a random tiny decoder is built, saved in Hugging Face format and loaded "
          "back (the same code path). Random weights give noise text: the point is the "
          "plumbing."),
      new_code_cell(INSTALL),
      new_code_cell(COMMON_IMPORTS + '''\
import os
import tempfile

from kat_jax.checkpoint.hf import load_pretrained, save_pretrained
from kat_jax.model import Decoder, get_preset, init_params

HF_DIR = ""  # a Hugging Face checkpoint directory; empty = a random tiny model
TOKENIZER = "bytes"  # "qwen2.5" for a real Qwen2.5 checkpoint'''),
      new_markdown_cell("## Load a Hugging Face checkpoint"),
      new_code_cell('''\
if HF_DIR:
  loaded_config, loaded = load_pretrained(HF_DIR)
else:  # save a random tiny model in Hugging Face format, then load it like any checkpoint
  config = get_preset("tiny")
  params = init_params(config, jax.random.key(0))
  hf_dir = os.path.join(tempfile.mkdtemp(), "tiny_hf")
  save_pretrained(hf_dir, config, params)
  print(sorted(os.listdir(hf_dir)))
  loaded_config, loaded = load_pretrained(hf_dir)
  max_diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in
                 zip(jax.tree.leaves(params), jax.tree.leaves(loaded)))
  print("max |param difference| after the round trip:", max_diff)
  assert max_diff == 0.0
num_params = sum(x.size for x in jax.tree.leaves(loaded))
print(f"{HF_DIR or 'tiny'}: {loaded_config.num_layers} layers, "
      f"hidden {loaded_config.hidden_size}, vocab {loaded_config.vocab_size}, "
      f"{num_params:,} parameters")'''),
      new_code_cell('''\
tokens = jnp.arange(12, dtype=jnp.int32)[None] % loaded_config.vocab_size
logits = Decoder(loaded_config).apply({"params": loaded}, tokens)
print("logits", logits.shape, logits.dtype)'''),
      new_markdown_cell(
          "## Generate with think-on / think-off\n\n"
          "The KAT template ends the prompt with `<judge>\\n`; a mode is forced by prefilling "
          "`</judge>` and `<think_on>` / `<think_off>` (see `kat_jax.sampling.autothink`)."),
      new_code_cell('''\
from kat_jax.data.tokenizer import get_tokenizer
from kat_jax.eval import model_generate_fn
from kat_jax.sampling import autothink_stats

tokenizer = get_tokenizer(TOKENIZER)
if tokenizer.vocab_size > loaded_config.vocab_size:
  raise ValueError(f"TOKENIZER={TOKENIZER!r} has {tokenizer.vocab_size} tokens but the model "
                   f"only {loaded_config.vocab_size}: pick the checkpoint's tokenizer")
prompts = ["What is 2 + 3?", "Write a function that reverses a string."]
for mode in ("on", "off"):
  generate = model_generate_fn(loaded, loaded_config, tokenizer, think_mode=mode,
                               max_new_tokens=24, temperature=1.0, seed=0)
  responses, num_tokens = generate(prompts)  # num_tokens: generated, the prefill excluded
  print(f"--- think {mode}: {responses[0][:80]!r}")
  stats = autothink_stats(responses, num_tokens)
  print({k: stats[k] for k in ("think_on_rate", "think_off_rate", "tokens_per_response")})'''),
  ]


def upscaling() -> list:
  return [
      new_markdown_cell(
          "# Depth up-scaling\n\n"
          "KAT-V1 grows a 32B model to 40B by duplicating its most *saturated* layers: those "
          "whose output barely differs from their input (cosine close to 1). Here: measure "
          "saturation on a tiny model, pick layers, duplicate them, and check that the "
          "`identity` init keeps the function unchanged."),
      new_code_cell(INSTALL),
      new_code_cell(COMMON_IMPORTS + '''\
from kat_jax.model import Decoder, get_preset, init_params
from kat_jax.upscale import (analyze_saturation, make_layer_map, select_layers, upscale)

config = get_preset("tiny", num_layers=6)
params = init_params(config, jax.random.key(0))
rng = np.random.default_rng(0)
batches = [{"tokens": rng.integers(0, 256, size=(4, 64), dtype=np.int32)} for _ in range(2)]
report = analyze_saturation(config, params, batches)
print("mean cosine per layer:", np.round(report.mean_cosine, 3))'''),
      new_code_cell('''\
chosen = select_layers("top_k", config.num_layers, 2, mean_cosine=report.mean_cosine)
layers = np.arange(report.num_layers)
plt.figure(figsize=(6, 3))
plt.errorbar(layers, report.mean_cosine, yerr=report.std_cosine, marker="o", capsize=3)
plt.scatter(chosen, np.asarray(report.mean_cosine)[chosen], s=150, facecolors="none",
            edgecolors="red", label="duplicated")
plt.xlabel("layer"); plt.ylabel("cos(input, output)"); plt.title("Layer saturation")
plt.legend(); plt.show()
print("duplicate layers", chosen)'''),
      new_markdown_cell("## Duplicate the chosen layers"),
      new_code_cell('''\
layer_map = make_layer_map(config.num_layers, chosen, "interleave")
print("new layer -> source layer:", layer_map.source)
tokens = jnp.asarray(batches[0]["tokens"])
before = Decoder(config).apply({"params": params}, tokens)
for init in ("copy", "identity"):
  new_config, new_params = upscale(config, params, layer_map, init=init)
  after = Decoder(new_config).apply({"params": new_params}, tokens)
  print(f"{init:8s}: {new_config.num_layers} layers, max |logit change| "
        f"{float(jnp.max(jnp.abs(after - before))):.2e}")
assert float(jnp.max(jnp.abs(after - before))) < 1e-4  # identity init preserves the function'''),
  ]


def prefix_trees() -> list:
  return [
      new_markdown_cell(
          "# Prefix trees and `kv_end` masks\n\n"
          "Rollouts of one prompt share prefixes. A prefix tree stores each shared token once; "
          "laid out depth-first, token j is visible exactly to its subtree, i.e. to query "
          "positions i with j <= i < kv_end[j]. One integer per token replaces a T x T mask."),
      new_code_cell(INSTALL),
      new_code_cell(COMMON_IMPORTS + '''\
from kat_jax.agentic.pruning import prune_group
from kat_jax.rl.tree import Trajectory, build_trees, pack_trees
from kat_jax.kernels.reference import visibility_mask
from kat_jax.rl.objectives import ObjectiveConfig

prompt = [1, 2, 3]  # shared by every rollout (not trained: loss_mask 0)
responses = [[10, 11, 12, 13], [10, 11, 20, 21, 22], [10, 30, 31], [40, 41]]
trajectories = [Trajectory(tokens=prompt + r, loss_mask=[0] * len(prompt) + [1] * len(r),
                           advantage=a)
                for r, a in zip(responses, [1.0, -0.5, 0.5, -1.0])]
tree, = build_trees([trajectories], ObjectiveConfig())
layout = tree.layout()
print(f"{tree.unrolled_tokens} unrolled tokens -> {tree.num_nodes} tree tokens")
for key in ("tokens", "positions", "kv_end", "pred_index", "visits"):
  print(f"{key:10s}", layout[key])'''),
      new_code_cell('''\
def show_mask(kv_end, tokens, title, ax):
  mask = np.asarray(visibility_mask(jnp.asarray(kv_end)[None]))[0]
  ax.imshow(mask, cmap="Blues")
  ax.set_xticks(range(len(tokens)), tokens, fontsize=7)
  ax.set_yticks(range(len(tokens)), tokens, fontsize=7)
  ax.set_xlabel("key token"); ax.set_ylabel("query token"); ax.set_title(title)
  return mask

fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
mask = show_mask(layout["kv_end"], layout["tokens"], "tree (kv_end)", axes[0])
packed = pack_trees([tree], seq_len=24, pad_id=0)
show_mask(packed["kv_end"][0], packed["tokens"][0], "packed row (24, padded)", axes[1])
plt.tight_layout(); plt.show()
# Each tree token sees exactly its ancestors and itself.
parent = layout["pred_index"]
for i in range(len(parent)):
  ancestors, j = {i}, i
  while parent[j] != j:
    j = parent[j]; ancestors.add(j)
  assert set(np.flatnonzero(mask[i])) == ancestors'''),
      new_markdown_cell(
          "## Entropy-based pruning\n\n"
          "Under a token budget, segments of the compressed trie are kept best-first by "
          "reach probability x mean policy entropy (`kat_jax.agentic.pruning`)."),
      new_code_cell('''\
rng = np.random.default_rng(0)
entropies = [np.where(t.loss_mask > 0, rng.uniform(0.1, 2.0, len(t.tokens)), 0.0)
             for t in trajectories]
pruned = prune_group(trajectories, entropies, budget=10)
print(pruned.report.to_dict())
print("kept prefix lengths:", pruned.keep_lengths)
kept_tree, = build_trees([pruned.kept()], ObjectiveConfig())
kept_layout = kept_tree.layout()
fig, ax = plt.subplots(figsize=(4.5, 4.5))
show_mask(kept_layout["kv_end"], kept_layout["tokens"], "pruned tree", ax)
plt.show()
assert kept_tree.num_nodes <= 10'''),
  ]


def srpo_dynamics() -> list:
  return [
      new_markdown_cell(
          "# Step-SRPO dynamics\n\n"
          "Plots reward, think-on rate on easy vs hard prompts, and response length per step "
          "from a `step_srpo` run's `rl_curves.json`. Set `RUN_DIR` to a run's workdir (e.g. "
          "`runs/srpo_tiny` after `python -m experiments.run --config "
          "experiments/configs/step_srpo.py`); left empty, a small synthetic history shaped "
          "like the KAT-V1 report's trends is used (think-on falls on easy prompts, stays high "
          "on hard ones, and responses get shorter)."),
      new_code_cell(INSTALL),
      new_code_cell('''\
%matplotlib inline
import json
import os

import matplotlib.pyplot as plt
import numpy as np

from kat_jax.eval import plot_rl_dynamics

RUN_DIR = ""  # e.g. "runs/srpo_tiny"'''),
      new_code_cell('''\
def synthetic_history(steps=30, seed=0):
  """Illustrative curves only (not results): the shapes the report describes."""
  rng = np.random.default_rng(seed)
  t = np.arange(1, steps + 1) / steps
  noise = lambda: rng.normal(0, 0.02)
  return [{"step": i + 1,
           "reward": float(-0.2 + 0.8 * x + noise()),
           "think_on_rate_easy": float(np.clip(0.6 * (1 - x) + 0.1 + noise(), 0, 1)),
           "think_on_rate_hard": float(np.clip(0.75 + 0.1 * x + noise(), 0, 1)),
           "response_tokens": float(90 - 30 * x + 50 * noise())}
          for i, x in enumerate(t)]

if RUN_DIR:
  curves_path = os.path.join(RUN_DIR, "rl_curves.json")
  if not os.path.exists(curves_path):
    raise FileNotFoundError(f"RUN_DIR={RUN_DIR!r} has no rl_curves.json (a step_srpo workdir?)")
  with open(curves_path) as f:
    history = json.load(f)["history"]
  print(f"{len(history)} steps from {curves_path}")
else:
  history = synthetic_history()
  print("no run dir given: synthetic history of", len(history), "steps")'''),
      new_markdown_cell(
          "A step logs `think_on_rate_easy` / `think_on_rate_hard` as `null` when none of its "
          "unforced rollouts came from that regime; the plot leaves a gap there, and the "
          "summary below uses the first and last steps that have a value."),
      new_code_cell('''\
fig = plot_rl_dynamics(history)
plt.show()


def first_last(key):
  """(first, last) logged values of `key` and the number of steps without one; None if never."""
  known = [h[key] for h in history if h.get(key) is not None]
  return (known[0], known[-1], len(history) - len(known)) if known else None


for key in ("reward", "think_on_rate_easy", "think_on_rate_hard", "response_tokens"):
  found = first_last(key)
  if found is None:
    print(f"{key:20s} never logged")
    continue
  first, last, missing = found
  note = f"  ({missing} of {len(history)} steps without a value)" if missing else ""
  print(f"{key:20s} {first:8.3f} -> {last:8.3f}{note}")'''),
  ]


NOTEBOOKS = {
    "01_model_tour.ipynb": model_tour,
    "02_upscaling.ipynb": upscaling,
    "03_prefix_trees.ipynb": prefix_trees,
    "04_step_srpo_dynamics.ipynb": srpo_dynamics,
}


def build(name: str) -> nbformat.NotebookNode:
  notebook = new_notebook(cells=NOTEBOOKS[name]())
  notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                     "language": "python"}
  notebook.metadata["language_info"] = {"name": "python"}
  notebook.metadata["colab"] = {"provenance": []}
  for i, cell in enumerate(notebook.cells):
    cell["id"] = f"cell-{i}"  # stable ids: regenerating gives identical files
  nbformat.validate(notebook)
  return notebook


def main(out_dir: str = HERE) -> None:
  for name in NOTEBOOKS:
    nbformat.write(build(name), os.path.join(out_dir, name))


if __name__ == "__main__":
  main(*sys.argv[1:])
