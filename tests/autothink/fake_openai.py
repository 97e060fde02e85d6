"""The chat-completions fake used by the tagging tests, on kat_jax.testing.LocalJsonServer."""

from __future__ import annotations

from kat_jax.testing import LocalJsonServer


def FakeServer(answers, status=200, raw_body=None) -> LocalJsonServer:  # pylint: disable=invalid-name
  """`POST /v1/chat/completions`: answers the last message from a prompt -> answer table."""
  def respond(path, body):
    del path
    if raw_body is not None:
      return status, raw_body
    prompt = body["messages"][-1]["content"]
    return status, {"choices": [{"message": {"role": "assistant",
                                             "content": answers.get(prompt, "?")}}]}
  return LocalJsonServer(respond)
