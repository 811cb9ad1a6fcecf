"""A tokenizer that needs no download: UTF-8 bytes plus a few control tokens.

Ids 0..255 are bytes; the specials follow. Every stream that carries text (TEXT_IN,
MODEL_TEXT, the background model) uses this one vocabulary.
"""

from __future__ import annotations

import numpy as np

PAD = 256        # empty slot; never a target
EOT = 257        # end of this chunk's text ("nothing more to say in this chunk")
BOS = 258        # input of the first MODEL_TEXT slot of every chunk (teacher forcing)
DELEGATE = 259   # the interaction model hands the current request to the background model
TOOL = 260       # background model: a tool call follows
RESULT = 261     # background model: a tool result / answer follows
SEP = 262        # separates fields inside one text stream
HEARD = 263      # background model, training only: write what the user said in the window
NUM_SPECIAL = 16  # room for more control tokens without changing the vocabulary size
VOCAB_SIZE = 256 + NUM_SPECIAL

_NAMES = {PAD: "<pad>", EOT: "<eot>", BOS: "<bos>", DELEGATE: "<delegate>", TOOL: "<tool>",
          RESULT: "<result>", SEP: "<sep>", HEARD: "<heard>"}


class ByteTokenizer:
  vocab_size = VOCAB_SIZE
  pad_id, eot_id, bos_id, delegate_id = PAD, EOT, BOS, DELEGATE

  def encode(self, text: str) -> list[int]:
    return list(text.encode("utf-8"))

  def decode(self, ids, *, show_special: bool = False) -> str:
    ids = np.asarray(ids).reshape(-1).tolist()
    out, buf = [], bytearray()
    for i in ids:
      if i < 256:
        buf.append(i)
        continue
      out.append(buf.decode("utf-8", errors="replace"))
      buf = bytearray()
      if show_special:
        out.append(_NAMES.get(i, f"<{i}>"))
    out.append(buf.decode("utf-8", errors="replace"))
    return "".join(out)
