"""The peer of `benchmarks/rl_step.py`: one GRPO step of TRL's `GRPOTrainer` on the same workload.

  python benchmarks/rl_step_trl.py --preset qwen2.5-1.5b --out $OUT/rl_step_trl_1.5b.json
  python benchmarks/rl_step_trl.py --tiny                       # CPU smoke run, seconds

Model: a randomly initialised `transformers` Qwen2 model at the shapes of a kat_jax preset
(`kat_jax.model.presets`), bf16 on GPU, built in memory (no download). Tokenizer: a word-level
`tokenizers` vocabulary built in memory ("<eos>" = id 0, the pad and end id; "t<i>" = id i), so
a prompt of random token ids is the text "t17 t3 ..." and tokenizes back to exactly those ids.

Workload: the draw of `benchmarks/rollout.py` (`workload`, same flags and seed): `--prompts`
prompts × `--samples` samples, prompt lengths uniform in [prompt_min, prompt_max], response
lengths drawn in advance from a lognormal (mean `--mean_new`, clipped to [1, max_new]). Every
sample stops exactly at its drawn length: a logits processor (`ForceLengths`) bans the end id
before the drawn length and forces it at the drawn length (the end token is the last of the
drawn count, as the rollout engine counts it). TRL's own generate call is unchanged; the
processor is passed to it by wrapping the model's `generate` (`FixedLengthGRPOTrainer`), and
the script checks that every completion came back at its drawn length. The reward is
completion length / 1000: rewards do not change the work of a step, only the advantages'
values (a length reward makes them non-zero, so the update is not trivially zero).

A measured step covers `--step_prompts` prompts of the draw (default: all; from prompt
`--first_prompt` on) × `--samples`; it is
preceded by one warm-up step on the same prompts with responses cut to `--warmup_new` tokens.
`--steps N` measures N steps (step i takes the next `--step_prompts` prompts, cycling).

TRL settings (what a user sets for speed on one GPU without vLLM; the GPU machine has no vLLM
and cannot install it): bf16 weights (`--param_dtype`), `bf16=True`, gradient checkpointing on
(TRL's default), `beta=0` (no reference model), `num_iterations=1`, generation through
`model.generate` with the KV cache (TRL's default path), `generation_batch_size` =
`--generation_batch` samples per generate call (as large as memory allows: each call runs
until its longest sample, so larger is faster), `per_device_train_batch_size` ×
`gradient_accumulation_steps` = the step's samples, `max_completion_length` = max_new. TRL's
`use_transformers_continuous_batching` is not used: TRL calls transformers' `generate_batch`
with one max_new_tokens for all requests and no way to add a logits processor, so the fixed
per-sample lengths cannot be imposed through it (it would likely decode faster: a finished
sample frees its slot instead of idling until the call's longest one ends).

Reported (JSON with `--out`, a table on stdout): generated tokens / step wall time (tokens/s
per GPU; one GPU), prompt+response tokens/s, tokens/s × parameters, the step's time split
(generate = TRL's `_generate`; score = the rest of `_generate_and_score_completions`: rewards,
advantages, padding; forward/backward = `training_step` less the two; optimizer = between the
pre- and post-optimizer-step callbacks; other = the rest of the step wall), the peak GPU memory,
versions, device and the command. A model whose weights, gradients and AdamW state alone exceed
the GPU's memory is reported as `does_not_fit` without running; an out-of-memory error during
the step is reported as `out_of_memory` with the phase it happened in.

Needs `trl`, `datasets`, `accelerate` (setup.py extra `peer`; on the GPU machine their wheels
are carried: benchmarks/peer_wheels.sh). Developed against trl 1.16.0, transformers 5.25.0 and
5.17.0, accelerate 1.16.0, datasets 5.2.0, torch 2.13 (CPU).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import tempfile
import time
import warnings

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from rollout import add_workload_flags, workload  # noqa: E402  pylint: disable=g-import-not-at-top

EOS_ID = 0  # "<eos>": end and pad id; workload() draws prompt ids from [1, vocab)
PHASES = ("generate", "generate_and_score", "training_step", "optimizer")


def _parse(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--preset", default="qwen2.5-1.5b", help="kat_jax.model.presets name")
  parser.add_argument("--tiny", action="store_true", help="tiny model and workload (CPU smoke)")
  add_workload_flags(parser)
  parser.add_argument("--step_prompts", type=int, default=0,
                      help="prompts per measured step (0: all --prompts); a reduction of the "
                           "step, reported in the JSON")
  parser.add_argument("--first_prompt", type=int, default=0,
                      help="the draw's prompt the first measured step starts at")
  parser.add_argument("--steps", type=int, default=1, help="measured GRPO steps")
  parser.add_argument("--warmup_new", type=int, default=16,
                      help="response length cap of the warm-up step")
  parser.add_argument("--generation_batch", type=int, default=128,
                      help="samples per generate call (TRL generation_batch_size)")
  parser.add_argument("--micro_batch", type=int, default=2,
                      help="per_device_train_batch_size (rows per forward/backward)")
  parser.add_argument("--param_dtype", default="bfloat16", choices=("bfloat16", "float32"),
                      help="weights and AdamW state dtype (float32: bf16 autocast over float32 "
                           "master weights)")
  parser.add_argument("--no_gradient_checkpointing", action="store_true")
  parser.add_argument("--progress_every", type=int, default=512,
                      help="print a decode progress line every N decode steps")
  parser.add_argument("--out", default="")
  if parser.parse_known_args(argv)[0].tiny:  # tiny defaults; flags given still win
    parser.set_defaults(preset="tiny", prompts=2, samples=2, prompt_min=8, prompt_max=32,
                        mean_new=16, max_new=32, warmup_new=4, generation_batch=4,
                        micro_batch=2, progress_every=8, param_dtype="float32")
  args = parser.parse_args(argv)
  args.step_prompts = args.step_prompts or args.prompts
  from kat_jax.model.presets import PRESETS  # pylint: disable=g-import-not-at-top
  problems = [f"--{name} {getattr(args, name)} must be >= 1" for name in (
      "prompts", "samples", "prompt_min", "max_new", "step_prompts", "steps", "warmup_new",
      "generation_batch", "micro_batch", "progress_every") if getattr(args, name) < 1]
  if problems:
    parser.exit(2, f"error: benchmarks/rl_step_trl.py: {'; '.join(problems)}\n")
  if args.preset not in PRESETS:
    problems.append(f"--preset {args.preset!r} is not one of {sorted(PRESETS)}")
  if args.prompt_max < args.prompt_min:
    problems.append(f"--prompt_max {args.prompt_max} < --prompt_min {args.prompt_min}")
  step_samples = args.step_prompts * args.samples
  if args.step_prompts > args.prompts:
    problems.append(f"--step_prompts {args.step_prompts} > --prompts {args.prompts}")
  if (args.generation_batch % args.samples or step_samples % args.generation_batch
      or args.prompts * args.samples % args.generation_batch):
    problems.append(f"--generation_batch {args.generation_batch} must be a multiple of "
                    f"--samples {args.samples} and divide the step's {step_samples} samples "
                    f"and the draw's {args.prompts * args.samples}")
  if args.generation_batch % args.micro_batch:
    problems.append(f"--micro_batch {args.micro_batch} must divide --generation_batch "
                    f"{args.generation_batch}")
  if args.samples < 2:
    problems.append("--samples must be >= 2 (GRPO needs a group)")
  if not 0 <= args.first_prompt < args.prompts:
    problems.append(f"--first_prompt {args.first_prompt} must be in [0, --prompts "
                    f"{args.prompts})")
  if problems:
    parser.exit(2, f"error: benchmarks/rl_step_trl.py: {'; '.join(problems)}\n")
  return args


def model_config(preset: str):
  """A transformers `Qwen2Config` with the shapes of the kat_jax preset `preset`."""
  from transformers import Qwen2Config  # pylint: disable=g-import-not-at-top

  from kat_jax.model.presets import get_preset  # pylint: disable=g-import-not-at-top
  ours = get_preset(preset)
  return Qwen2Config(
      vocab_size=ours.vocab_size, hidden_size=ours.hidden_size,
      intermediate_size=ours.intermediate_size, num_hidden_layers=ours.num_layers,
      num_attention_heads=ours.num_heads, num_key_value_heads=ours.num_kv_heads,
      head_dim=ours.head_dim, rms_norm_eps=ours.rms_norm_eps, rope_theta=ours.rope_theta,
      max_position_embeddings=ours.max_position_embeddings,
      tie_word_embeddings=ours.tie_word_embeddings, use_cache=True,
      bos_token_id=None, eos_token_id=EOS_ID, pad_token_id=EOS_ID)


def word_tokenizer(vocab_size: int):
  """A fast tokenizer whose word "t<i>" is id i and "<eos>" is id 0 (end and pad)."""
  from tokenizers import Tokenizer, models, pre_tokenizers  # pylint: disable=g-import-not-at-top
  from transformers import PreTrainedTokenizerFast  # pylint: disable=g-import-not-at-top
  vocab = {"<eos>": EOS_ID, **{f"t{i}": i for i in range(1, vocab_size)}}
  core = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
  core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", pad_token="<eos>",
                                 padding_side="left")


def as_text(token_ids) -> str:
  return " ".join(f"t{int(i)}" for i in token_ids)


class ForceLengths:
  """Logits processor: row r ends with the end id exactly at its `targets[r]`-th new token.

  `start(targets)` before each generate call; the first call's input length is the (left
  padded) prompt length, so tokens made so far = input length - that.  Before the target the
  end id is banned; at the target every other id is.  Also prints decode progress.
  """

  def __init__(self, eos_id: int, progress_every: int):
    self.eos_id = eos_id
    self.progress_every = progress_every
    self.targets = None
    self.prompt_len = None
    self.started = 0.0

  def start(self, targets: list[int]) -> None:
    self.targets, self.prompt_len = list(targets), None

  def __call__(self, input_ids, scores):
    import torch  # pylint: disable=g-import-not-at-top
    if self.prompt_len is None:
      self.prompt_len, self.started = input_ids.shape[1], time.perf_counter()
      self._target = torch.tensor(self.targets, device=scores.device)
    made = input_ids.shape[1] - self.prompt_len  # the same for every row
    if made and made % self.progress_every == 0:
      longest, seconds = max(self.targets), time.perf_counter() - self.started
      print(f"  generate: {made}/{longest} decode steps, {seconds / made * 1e3:.1f} ms/step, "
            f"ETA {seconds / made * (longest - made):.0f} s", flush=True)
    end_now = (self._target == made + 1)[:, None]
    is_eos = torch.zeros_like(scores, dtype=torch.bool)
    is_eos[:, self.eos_id] = True
    keep = torch.where(end_now, is_eos, ~is_eos)
    return scores.masked_fill(~keep, float("-inf"))


class PhaseClock:
  """Seconds per phase of the current step; `sync` makes device work finish before a reading."""

  def __init__(self, sync):
    self.sync = sync
    self.seconds = dict.fromkeys(PHASES, 0.0)
    self.active = None

  def timed(self, phase, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
      self.sync()
      outer, self.active = self.active, phase
      start = time.perf_counter()
      try:
        return fn(*args, **kwargs)
      finally:
        self.sync()
        self.seconds[phase] += time.perf_counter() - start
        self.active = outer
    return wrapper

  def take(self) -> dict:
    seconds, self.seconds = self.seconds, dict.fromkeys(PHASES, 0.0)
    return seconds


def make_trainer_class():
  """`GRPOTrainer` with fixed response lengths and per-phase clocks (built after trl imports)."""
  from transformers import LogitsProcessorList, TrainerCallback  # pylint: disable=g-import-not-at-top
  from trl import GRPOTrainer  # pylint: disable=g-import-not-at-top

  class StepClock(TrainerCallback):
    """Step walls (end to end of optimizer steps) and their split; the peak-memory counters
    restart after the first (warm-up) step."""

    def __init__(self, clock: PhaseClock, reset_peak):
      self.clock, self.reset_peak = clock, reset_peak
      self.steps, self.last_end, self.opt_start = [], None, 0.0

    def on_train_begin(self, args, state, control, **kwargs):
      self.clock.sync()
      self.last_end = time.perf_counter()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
      self.clock.sync()
      self.opt_start = time.perf_counter()

    def on_optimizer_step(self, args, state, control, **kwargs):
      self.clock.sync()
      self.clock.seconds["optimizer"] += time.perf_counter() - self.opt_start

    def on_step_end(self, args, state, control, **kwargs):
      self.clock.sync()
      now = time.perf_counter()
      raw = self.clock.take()  # nested: training_step > generate_and_score > generate
      wall = now - self.last_end
      phases = {"generate": raw["generate"],
                "score": raw["generate_and_score"] - raw["generate"],
                "forward_backward": raw["training_step"] - raw["generate_and_score"],
                "optimizer": raw["optimizer"]}
      phases["other"] = wall - sum(phases.values())
      self.steps.append({"wall_s": wall, **{f"{k}_s": v for k, v in phases.items()}})
      self.last_end = now
      if len(self.steps) == 1:
        self.reset_peak()
      name = "warm-up step" if len(self.steps) == 1 else f"step {len(self.steps) - 1}"
      print(f"{name} done: {wall:.1f} s: "
            + ", ".join(f"{k} {v:.1f} s" for k, v in phases.items()), flush=True)

  class FixedLengthGRPOTrainer(GRPOTrainer):
    """Each sample's completion stops at its drawn length (dataset column `lengths`)."""

    def __init__(self, *args, forcer: ForceLengths, clock: PhaseClock, reset_peak, **kwargs):
      super().__init__(*args, **kwargs)
      self.forcer, self.clock = forcer, clock
      # TRL calls `model.generate(**inputs, generation_config=...)`: add the processor there.
      self.model.generate = functools.partial(self.model.generate,
                                              logits_processor=LogitsProcessorList([forcer]))
      self._generate = clock.timed("generate", self._generate)
      self._generate_and_score_completions = clock.timed(
          "generate_and_score", self._generate_and_score_completions)
      self.training_step = clock.timed("training_step", self.training_step)
      self.step_clock = StepClock(clock, reset_peak)
      self.add_callback(self.step_clock)
      self.pending = []  # targets of the generation batch in flight
      self.checked = 0  # completions seen to stop exactly at their drawn length

    def _generate_and_score_completions(self, inputs):
      seen: dict[int, int] = {}
      targets = []
      for row in inputs:  # a prompt's samples come together (TRL's RepeatSampler)
        k = seen.get(row["prompt_index"], 0)
        seen[row["prompt_index"]] = k + 1
        targets.append(row["lengths"][k])
      self.forcer.start(targets)
      self.pending = targets
      return super()._generate_and_score_completions(inputs)

    def _generate(self, prompts):
      result = super()._generate(prompts)
      completion_ids = result[1]
      made = [len(ids) for ids in completion_ids]
      if made != self.pending:
        raise RuntimeError(f"completions stopped at {made[:8]}..., drawn {self.pending[:8]}...")
      self.checked += len(made)
      return result

  return FixedLengthGRPOTrainer


def step_work(prompt_lens: np.ndarray, new: np.ndarray, args) -> dict:
  """The work of a step over prompts with lengths `prompt_lens` [P] and drawn responses
  `new` [P, samples], as TRL does it: each generate call (`--generation_batch` samples, whole
  groups) decodes until its longest sample; the update pads each call's rows to its longest
  prompt + longest response."""
  calls = len(prompt_lens) * args.samples // args.generation_batch
  decode_steps = padded = 0
  for lens, resp in zip(np.array_split(prompt_lens, calls), np.array_split(new, calls)):
    decode_steps += int(resp.max())
    padded += resp.size * int(lens.max() + resp.max())
  return {"generated_tokens": int(new.sum()), "prompt_tokens": int(prompt_lens.sum()) *
          args.samples, "generate_calls": calls, "decode_steps": decode_steps,
          "padded_positions": padded}


def project_full_step(step: dict, full: dict) -> dict:
  """A reduced step's times scaled to the whole draw: generate by decode steps, the update by
  padded positions, scoring by samples; the optimizer step as measured. An estimate."""
  generate = step["generate_s"] * full["decode_steps"] / step["decode_steps"]
  update = step["forward_backward_s"] * full["padded_positions"] / step["padded_positions"]
  rows = full["generated_tokens"] / step["generated_tokens"]
  wall = generate + update + step["optimizer_s"] + (step["score_s"] + step["other_s"]) * rows
  return {"note": "estimate, not measured: the measured step scaled to the whole draw",
          **full, "wall_s": wall, "generate_s": generate, "forward_backward_s": update,
          "tokens_per_s": full["generated_tokens"] / wall}


def versions() -> dict:
  from importlib.metadata import version  # pylint: disable=g-import-not-at-top
  return {name: version(name) for name in ("trl", "transformers", "torch", "accelerate",
                                           "datasets", "tokenizers")} | {
      "python": platform.python_version()}


def main(argv=None) -> dict:
  # Computes with torch only: JAX (imported by kat_jax's presets) stays off the GPU.
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  args = _parse(argv)
  # transformers 5.2x renames gradient_checkpointing; the old name works on 5.17 and 5.2x.
  warnings.filterwarnings("ignore", category=FutureWarning)
  try:
    import torch  # pylint: disable=g-import-not-at-top
    from datasets import Dataset  # pylint: disable=g-import-not-at-top
    from transformers import AutoModelForCausalLM  # pylint: disable=g-import-not-at-top
    from trl import GRPOConfig  # pylint: disable=g-import-not-at-top
  except ImportError as error:
    sys.exit(f"error: benchmarks/rl_step_trl.py: {error} (pip install -e '.[peer]'; on the GPU "
             "machine, carry benchmarks/peer_wheels.sh's wheels)")

  cuda = torch.cuda.is_available()
  device = torch.device("cuda" if cuda else "cpu")
  sync = torch.cuda.synchronize if cuda else (lambda: None)
  config = model_config(args.preset)
  prompts, lengths = workload(args, config.vocab_size)
  command = " ".join(["python"] + sys.argv) if argv is None else " ".join(
      ["python", "benchmarks/rl_step_trl.py"] + list(argv))
  # Rows: the warm-up step's prompts, then each measured step's (cycling through the draw).
  step_rows = [[(args.first_prompt + s * args.step_prompts + i) % args.prompts
                for i in range(args.step_prompts)] for s in range(args.steps)]
  rows = [(i, np.minimum(lengths[i], args.warmup_new)) for i in step_rows[0]]
  rows += [(i, lengths[i]) for step in step_rows for i in step]
  dataset = Dataset.from_dict({"prompt": [as_text(prompts[i]) for i, _ in rows],
                               "prompt_index": [i for i, _ in rows],
                               "lengths": [length.tolist() for _, length in rows]})
  step_samples = args.step_prompts * args.samples
  prompt_lens = np.asarray([len(p) for p in prompts])
  measured = [step_work(prompt_lens[step], lengths[step], args) for step in step_rows]
  full = step_work(prompt_lens, lengths, args)

  param_bytes = 2 if args.param_dtype == "bfloat16" else 4
  with torch.device("meta"):
    n_params = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
  # Weights + gradients + AdamW's two moments, all in param_dtype.
  static_bytes = n_params * param_bytes * 4
  total_memory = torch.cuda.get_device_properties(0).total_memory if cuda else None
  result = {
      "benchmark": "rl_step_trl", "command": command, "versions": versions(),
      "device": torch.cuda.get_device_name(0) if cuda else platform.processor() or "cpu",
      "device_memory_gib": total_memory / 2**30 if cuda else None,
      "preset": args.preset, "parameters": n_params,
      "model": {k: getattr(config, k) for k in (
          "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
          "num_attention_heads", "num_key_value_heads", "head_dim", "tie_word_embeddings")},
      "workload": {"prompts": args.prompts, "samples": args.samples,
                   "prompt_min": args.prompt_min, "prompt_max": args.prompt_max,
                   "mean_new": args.mean_new, "max_new": args.max_new, "sigma": args.sigma,
                   "seed": args.seed, "drawn_tokens": int(lengths.sum()),
                   "drawn_longest": int(lengths.max()),
                   "step_prompts": args.step_prompts, "step_samples": step_samples,
                   "first_prompt": args.first_prompt,
                   "reduced": args.step_prompts < args.prompts,
                   "warmup_new": args.warmup_new},
      "trl_settings": {"generation": "model.generate (KV cache), no vLLM",
                       "generation_batch_size": args.generation_batch,
                       "per_device_train_batch_size": args.micro_batch,
                       "gradient_accumulation_steps": step_samples // args.micro_batch,
                       "param_dtype": args.param_dtype, "bf16": cuda,
                       "gradient_checkpointing": not args.no_gradient_checkpointing,
                       "beta": 0.0, "num_iterations": 1, "max_completion_length": args.max_new,
                       "temperature": 1.0},
      "reward": "completion length / 1000 (rewards do not change a step's work)",
      "static_memory_gib": static_bytes / 2**30,
      "env": {k: os.environ.get(k) for k in ("PYTORCH_CUDA_ALLOC_CONF", "HF_HUB_OFFLINE")},
  }
  print(f"{args.preset}: {n_params / 1e9:.2f}B parameters; step = {args.step_prompts}/"
        f"{args.prompts} prompts x {args.samples} samples, {measured[0]['generated_tokens']} "
        f"tokens to generate in {measured[0]['decode_steps']} padded decode steps; device "
        f"{result['device']}", flush=True)
  if cuda and static_bytes > total_memory:
    result["status"] = "does_not_fit"
    result["error"] = (f"weights + gradients + AdamW state in {args.param_dtype} = "
                       f"{static_bytes / 2**30:.1f} GiB > {total_memory / 2**30:.1f} GiB on "
                       f"{result['device']}")
    return _finish(args, result)

  torch.manual_seed(args.seed)
  dtype = torch.bfloat16 if args.param_dtype == "bfloat16" else torch.float32
  with device:  # initialise on the device: seconds instead of minutes on the host for 7B
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
  model.generation_config.eos_token_id = EOS_ID
  model.generation_config.pad_token_id = EOS_ID
  tokenizer = word_tokenizer(config.vocab_size)
  forcer = ForceLengths(EOS_ID, args.progress_every)
  clock = PhaseClock(sync)
  trainer_class = make_trainer_class()

  def length_reward(completion_ids, **_):
    return [len(ids) / 1000.0 for ids in completion_ids]

  with tempfile.TemporaryDirectory() as output_dir:
    trl_args = GRPOConfig(
        output_dir=output_dir, report_to="none", save_strategy="no", logging_steps=1,
        max_steps=1 + args.steps, per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=step_samples // args.micro_batch,
        generation_batch_size=args.generation_batch, num_generations=args.samples,
        max_completion_length=args.max_new, temperature=1.0, top_p=1.0, top_k=0,
        beta=0.0, num_iterations=1, bf16=cuda, use_cpu=not cuda,
        gradient_checkpointing=not args.no_gradient_checkpointing,
        shuffle_dataset=False, seed=args.seed, dataloader_num_workers=0,
        log_completions=False, disable_tqdm=True)
    trainer = trainer_class(model=model, reward_funcs=length_reward, args=trl_args,
                            train_dataset=dataset, processing_class=tokenizer,
                            forcer=forcer, clock=clock,
                            reset_peak=torch.cuda.reset_peak_memory_stats if cuda else sync)
    result["trl_settings"]["loss_type"] = trl_args.loss_type
    result["trl_settings"]["optimizer"] = getattr(trl_args.optim, "value", trl_args.optim)
    try:
      trainer.train()
    except torch.OutOfMemoryError as error:
      result["status"] = "out_of_memory"
      result["error"] = f"out of memory in phase {clock.active}: {str(error).splitlines()[0]}"
      result["steps_done"] = trainer.step_clock.steps
      return _finish(args, result)
  steps = trainer.step_clock.steps
  result["completions_checked"] = trainer.checked
  result["warmup_step"] = steps[0]
  result["steps"] = []
  for timing, work in zip(steps[1:], measured):
    wall = timing["wall_s"]
    tokens_per_s = work["generated_tokens"] / wall
    result["steps"].append({
        **work, **timing, "tokens_per_s": tokens_per_s,
        "prompt_response_tokens_per_s": (work["generated_tokens"] + work["prompt_tokens"]) / wall,
        "param_tokens_per_s": tokens_per_s * n_params,
        "generate_share": timing["generate_s"] / wall})
  walls = sum(s["wall_s"] for s in result["steps"])
  result["tokens_per_s"] = sum(s["generated_tokens"] for s in result["steps"]) / walls
  result["prompt_response_tokens_per_s"] = sum(
      s["generated_tokens"] + s["prompt_tokens"] for s in result["steps"]) / walls
  result["param_tokens_per_s"] = result["tokens_per_s"] * n_params
  if args.step_prompts < args.prompts:
    result["projected_full_step"] = project_full_step(result["steps"][0], full)
  if cuda:
    result["peak_memory_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
    result["peak_memory_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
  result["status"] = "ok"
  return _finish(args, result)


def _finish(args, result: dict) -> dict:
  print(table(result))
  if args.out:
    with open(args.out, "w", encoding="utf-8") as f:
      json.dump(result, f, indent=2)
  return result


def table(result: dict) -> str:
  """Markdown table of the measured steps (or the reason there are none)."""
  head = f"TRL GRPOTrainer, {result['preset']} on {result['device']}: "
  if result.get("status") != "ok":
    return head + f"{result.get('status')}: {result.get('error')}"
  peak = result.get("peak_memory_allocated_gib")
  lines = [head + f"{result['parameters'] / 1e9:.2f}B parameters, peak memory "
           + (f"{peak:.1f} GiB" if peak is not None else "n/a (no GPU)"),
           "| step | samples | generated tokens | wall s | generate s | score s | fwd/bwd s | "
           "optimizer s | other s | tokens/s | prompt+response tokens/s | tokens/s x params |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
  samples = result["workload"]["step_samples"]
  for i, s in enumerate(result["steps"], 1):
    lines.append(f"| {i} | {samples} | {s['generated_tokens']:,} | {s['wall_s']:.1f} | "
                 f"{s['generate_s']:.1f} | {s['score_s']:.1f} | {s['forward_backward_s']:.1f} | "
                 f"{s['optimizer_s']:.2f} | {s['other_s']:.1f} | {s['tokens_per_s']:,.0f} | "
                 f"{s['prompt_response_tokens_per_s']:,.0f} | {s['param_tokens_per_s']:.3g} |")
  if "projected_full_step" in result:
    full = result["projected_full_step"]
    lines.append(f"reduced step ({result['workload']['step_prompts']} of "
                 f"{result['workload']['prompts']} prompts); whole draw, an estimate: "
                 f"{full['wall_s']:.0f} s, {full['tokens_per_s']:,.0f} tokens/s")
  return "\n".join(lines)


if __name__ == "__main__":
  main()
