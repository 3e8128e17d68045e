"""ABC across tokenizers: credit from a reward model with its own tokenizer and chat template, on the policy's tokens.

The policy generates token ids; a reward model with another tokenizer (and often a chat template) reads the
decoded text. Its attention row is indexed by *its* tokens, while PPO needs rewards on the *policy's* tokens.
Both token sequences cover the same text, so this module works in UTF-8 bytes of that text:

- :func:`token_byte_spans`: the ``[start, end)`` bytes of every policy token in its decoded text, derived from
  the tokens' own pieces (byte-level BPE bytes, SentencePiece ``▁`` pieces, WordPiece ``##`` continuations)
  by replaying the tokenizer's decoder with provenance, and checked against ``tokenizer.decode``.
- :func:`project_credit`: moves credit from one set of spans to another in proportion to byte overlap,
  conserving the total whenever the destination covers the source.
- :func:`render_and_tokenize`: the reward model's input for each (prompt, decoded response): rendered, the
  response located in it, tokenised with offsets, and the response's text kept from becoming control tokens
  (one step, shared by every scorer that reads the same input).
- :func:`score_and_densify_text`: decode, render and tokenise, capture the reward model's attention row, project
  the row onto the policy's response tokens, and hand the ``[B, R]`` rows to :func:`dense_rlhf.dense_rewards`,
  the single implementation of the formula.

One module per step: :mod:`~dense_rlhf.align.decoders` (the tokenizers' decoders replayed with provenance),
:mod:`~dense_rlhf.align.spans`, :mod:`~dense_rlhf.align.projection`, :mod:`~dense_rlhf.align.render` (with
:mod:`~dense_rlhf.align.text_only`, the tokenizer copy that keeps policy text from becoming control tokens),
:mod:`~dense_rlhf.align.rewards` and :mod:`~dense_rlhf.align.scoring`. Nothing here imports transformers or
tokenizers at import time.
"""

from dense_rlhf.align.projection import project_credit
from dense_rlhf.align.render import RewardModelInputs, render_and_tokenize
from dense_rlhf.align.scoring import score_and_densify_text
from dense_rlhf.align.spans import token_byte_spans

__all__ = ["token_byte_spans", "project_credit", "render_and_tokenize", "RewardModelInputs", "score_and_densify_text"]
