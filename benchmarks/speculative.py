"""Self-speculative decoding accept rate of a distilled student with MTP heads.

  python benchmarks/speculative.py --model_dir runs/distill_tiny/kd_mtp/final \
      --records runs/distill_tiny/data/autothink_stage1_eval.jsonl --out $OUT

Prompts are the held-out chat records up to the assistant's first trained token (the
system + user turns and the think_on/think_off trigger); each is continued greedily by
`kat_jax.distill.speculative.self_speculative_decode` (MTP heads draft, the main head
verifies), and the output is checked against plain greedy decoding. Reports the accept rate
(accepted / drafted) and tokens per main-model forward. Prints a line; writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys

import jax
import numpy as np

from kat_jax.data import sources
from kat_jax.data.tokenizer import get_tokenizer
from kat_jax.distill.dual_regime import dual_regime_document
from kat_jax.distill.speculative import greedy_decode, self_speculative_decode
from kat_jax.checkpoint.models import load_model


def prompt_ids(record: dict, tokenizer) -> list[int]:
  """The record's tokens before the assistant's first trained token."""
  doc = dual_regime_document(record, tokenizer, add_eos=False)
  first = int(np.argmax(np.asarray(doc.loss_mask) > 0))
  return [int(t) for t in np.asarray(doc.tokens)[:first]]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model_dir", required=True, help="a distill stage `<variant>/final`")
  parser.add_argument("--records", required=True, help="held-out chat JSONL")
  parser.add_argument("--tokenizer", default="bytes")
  parser.add_argument("--prompts", type=int, default=8)
  parser.add_argument("--new_tokens", type=int, default=40)
  parser.add_argument("--out", default="")
  args = parser.parse_args()
  config, params = load_model(args.model_dir, mtp=True)
  tokenizer = get_tokenizer(args.tokenizer)
  records = sources.JsonlSource(args.records)
  drafted = accepted = forwards = produced = 0
  for i in range(min(args.prompts, len(records))):
    prompt = prompt_ids(records[i], tokenizer)
    tokens, stats = self_speculative_decode(params, config, prompt, args.new_tokens,
                                            pad_id=tokenizer.pad_id)
    if tokens != greedy_decode(params, config, prompt, args.new_tokens,
                               pad_id=tokenizer.pad_id):
      raise AssertionError(f"prompt {i}: speculative output differs from greedy decoding")
    drafted, accepted = drafted + stats.drafted, accepted + stats.accepted
    forwards, produced = forwards + stats.main_forwards, produced + len(tokens)
  result = {"model_dir": args.model_dir, "records": args.records, "prompts": args.prompts,
            "new_tokens": args.new_tokens, "accept_rate": accepted / max(drafted, 1),
            "drafted": drafted, "accepted": accepted,
            "tokens_per_main_forward": produced / max(forwards, 1),
            "device": jax.devices()[0].device_kind, "jax_version": jax.__version__,
            "python": platform.python_version(), "command": " ".join(sys.argv)}
  print(f"accept rate {result['accept_rate']:.3f} ({accepted}/{drafted} drafts), "
        f"{result['tokens_per_main_forward']:.2f} tokens per main forward, "
        f"output == greedy on {args.prompts} prompts")
  if args.out:
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "speculative.json"), "w", encoding="utf-8") as f:
      json.dump(result, f, indent=2)


if __name__ == "__main__":
  main()
