"""Background-model training targets, built from a corpus delegation by the data pipeline.

When the interaction model emits DELEGATE, the background model (tml_jax.model.background)
writes `TOOL name:args SEP  RESULT tool output SEP  answer EOT`; the `RESULT ... SEP` span is
inserted by the tool runner, so it is fed as input but never a target.

`heard_sequence` builds the training-only "heard" targets: prompted with HEARD, the
background model writes the words the user said inside the delegating chunk's window. Every
row has some, so they teach the background model to read its context, and (the context is
not stop-gradiented) the interaction model to keep the user's words in its hidden states,
which a delegation's call needs and a few dozen delegations per run cannot teach.
"""

from __future__ import annotations

import numpy as np

from tml_jax.text import tokenizer as tok


def tool_call(tool: str, question: str, result_text: str,
              args: str | None = None) -> tuple[str, str]:
  """(name, args) of the call that answers a corpus delegation (tml_jax.data.scenarios).
  Corpora from 1.2.0 on record the call's args; older ones are read by the rules below."""
  if args is not None:
    return tool, args
  if tool in ("calculator", "clock"):
    return tool, result_text.split(" = ")[0].strip()
  return tool, question


def target_sequence(tool: str, question: str, result_text: str, max_len: int,
                    args: str | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(inputs, targets, loss mask) [max_len] of one delegation.

  Sequence: TOOL name:args SEP RESULT result SEP answer EOT, answer = the result text (what
  the corpus feeds back as TEXT_IN). The RESULT ... SEP span is the tool runner's, so it is
  input only. Truncated to max_len; padding is PAD with mask False.
  """
  enc = tok.ByteTokenizer().encode
  name, args = tool_call(tool, question, result_text, args)
  call = [tok.TOOL] + enc(f"{name}:{args}") + [tok.SEP]
  result = [tok.RESULT] + enc(result_text) + [tok.SEP]
  answer = enc(result_text) + [tok.EOT]
  seq = call + result + answer
  learn = [True] * len(call) + [False] * len(result) + [True] * len(answer)
  seq, learn = seq[:max_len], learn[:max_len]
  target = np.full((max_len,), tok.PAD, np.int32)
  target[:len(seq)] = seq
  mask = np.zeros((max_len,), bool)
  mask[:len(seq)] = learn
  inputs = np.concatenate([[tok.BOS], target[:-1]]).astype(np.int32)
  return inputs, target, mask


def heard_sequence(text: str, max_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(inputs, targets, loss mask) [max_len] of one "heard" target: HEARD text EOT, HEARD
  the prompt (input only). A text longer than max_len - 2 bytes keeps its end (the words
  said last), cut at a word boundary."""
  enc = tok.ByteTokenizer().encode
  ids = enc(text)
  if len(ids) > max_len - 2:
    ids = ids[len(ids) - (max_len - 2):]
    cut = ids.index(ord(" ")) + 1 if ord(" ") in ids else 0
    ids = ids[cut:]
  seq = [tok.HEARD] + ids + [tok.EOT]
  target = np.full((max_len,), tok.PAD, np.int32)
  target[:len(seq)] = seq
  mask = np.zeros((max_len,), bool)
  mask[1:len(seq)] = True
  inputs = np.concatenate([[tok.BOS], target[:-1]]).astype(np.int32)
  return inputs, target, mask
