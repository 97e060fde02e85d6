"""Chat with a checkpoint in the terminal, streaming tokens as they are sampled.

  python -m kat_jax.sampling.chat_cli --model /path/to/KAT-or-Qwen2.5 [--think_mode on]
  python -m kat_jax.sampling.chat_cli --model runs/sft           # a run workdir (or runs/sft@200)
  python -m kat_jax.sampling.chat_cli --model tiny --prompt "hi"  # random weights, one turn

`--model` is any model source of `kat_jax.checkpoint.models` (HF directory, run workdir
[@step], saved model, preset name); `--hf_dir` and `--preset` are older spellings of it. The
tokenizer defaults to the one a run trained with, else the Qwen tokenizer for a model whose
vocabulary holds it and the byte tokenizer otherwise.

Each turn re-renders the whole conversation with the chat template (KAT keeps only the final
answer of past assistant turns, so the history is not a plain continuation of the cache),
prefills it, then decodes one token per call so the text can be printed as it grows.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import jax

from kat_jax.checkpoint import models
from kat_jax.data.chat_template import TEMPLATES, tokenize_chat
from kat_jax.data.tokenizer import get_tokenizer
from kat_jax.errors import ConfigError
from kat_jax.sampling.autothink import THINK_MODES, forced_mode_prefix, think_mode_prompts
from kat_jax.sampling.forward import prepare_params
from kat_jax.sampling.logits import SamplingParams
from kat_jax.sampling.sampler import Sampler


def _parse(argv: list[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description="Streaming chat with a kat_jax checkpoint.")
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--model", help="HF directory, run workdir[@step], saved model or preset")
  source.add_argument("--hf_dir", dest="model", help="same as --model")
  source.add_argument("--preset", dest="model", help="same as --model")
  parser.add_argument("--tokenizer", default="", help="'qwen2.5' or 'bytes' (default: the "
                      "run's own, else by the model's vocabulary size)")
  parser.add_argument("--template", default="kat", choices=TEMPLATES)
  parser.add_argument("--think_mode", default="auto", choices=THINK_MODES)
  parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
  parser.add_argument("--temperature", type=float, default=0.7)
  parser.add_argument("--top_k", type=int, default=0)
  parser.add_argument("--top_p", type=float, default=1.0)
  parser.add_argument("--max_new_tokens", type=int, default=512)
  parser.add_argument("--max_length", type=int, default=4096, help="KV cache slots")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--prompt", default=None, help="answer this one message and exit")
  return parser.parse_args(argv)


def _load(args: argparse.Namespace):
  """(tokenizer, model config, params) of `--model`, checked to fit each other."""
  tokenizer = get_tokenizer(args.tokenizer or models.tokenizer_name(args.model, what="--model"))
  config = models.load_model_config(args.model, what="--model")
  config, params = models.load_model(args.model, execution=config.replace(dtype=args.dtype),
                                     seed=args.seed, tokenizer=tokenizer, what="--model")
  return tokenizer, config, params


def stream_reply(sampler: Sampler, dparams, prompt: list[int], tokenizer, rng: jax.Array, *,
                 sampling: SamplingParams, max_new_tokens: int, max_length: int,
                 emit: Callable[[str], None]) -> list[int]:
  """Prefills `prompt`, samples token by token, calls `emit` with each new piece of text."""
  state = sampler.prefill(dparams, [prompt], max_length=max_length)
  generated: list[int] = []
  shown = ""
  for _ in range(min(max_new_tokens, max_length - state.end)):
    rng, key = jax.random.split(rng)
    result, state = sampler.decode(dparams, state, key, max_new_tokens=1, sampling=sampling,
                                   stop_ids=tokenizer.stop_ids)
    token = int(result.tokens[0, 0])
    generated.append(token)
    if token in tokenizer.stop_ids:
      break
    text = tokenizer.decode(generated)
    if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
      emit(text[len(shown):])
      shown = text
  return generated


def main(argv: list[str] | None = None) -> None:
  args = _parse(argv)
  try:
    tokenizer, config, params = _load(args)
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  dparams = prepare_params(params, config)
  del params
  sampler = Sampler(config, pad_id=tokenizer.pad_id)
  sampling = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                            vocab_limit=tokenizer.vocab_size)
  prefix = forced_mode_prefix(args.think_mode) if args.template == "kat" else ""
  messages: list[dict[str, str]] = []
  rng = jax.random.key(args.seed)

  def emit(piece: str) -> None:
    sys.stdout.write(piece)
    sys.stdout.flush()

  while True:
    if args.prompt is not None:
      user = args.prompt
    else:
      try:
        user = input("\nuser> ")
      except EOFError:
        break
      if user.strip() in ("/exit", "/quit"):
        break
    messages.append({"role": "user", "content": user})
    prompt = tokenize_chat(tokenizer, messages, add_generation_prompt=True,
                           template=args.template).ids
    if prefix:
      prompt = think_mode_prompts(tokenizer, [prompt], args.think_mode)[0]
    emit("assistant> " + (("<judge>\n" if args.template == "kat" else "") + prefix))
    rng, key = jax.random.split(rng)
    reply = stream_reply(sampler, dparams, prompt, tokenizer, key, sampling=sampling,
                         max_new_tokens=args.max_new_tokens, max_length=args.max_length,
                         emit=emit)
    text = tokenizer.decode([t for t in reply if t not in tokenizer.stop_ids])
    judge = "<judge>\n" if args.template == "kat" else ""
    messages.append({"role": "assistant", "content": judge + prefix + text})
    emit("\n")
    if args.prompt is not None:
      break


if __name__ == "__main__":
  main()
