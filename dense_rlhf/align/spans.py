"""Byte spans of tokens: where each token of a sequence lies in the UTF-8 bytes of its decoded text
(:func:`token_byte_spans`), by replaying the tokenizer's decoder (:mod:`dense_rlhf.align.decoders`)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from dense_rlhf.align.decoders import _HF_CLEANUP, _apply_decoder, _backend_steps, _join, _Unit

if TYPE_CHECKING:
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerBase

__all__ = ["token_byte_spans"]

_SLOW_TOKENIZER_FIX = (
    "a fast (tokenizers-backed) tokenizer is needed for byte offsets; load it with AutoTokenizer.from_pretrained(...) "
    "without use_fast=False, or convert it with transformers.convert_slow_tokenizer.convert_slow_tokenizer(tok) and "
    "wrap the result in PreTrainedTokenizerFast(tokenizer_object=...)"
)


class _Unmappable(ValueError):
    """The credit of one row cannot be mapped (its text can still be scored): a decode the byte spans cannot
    follow, a chat template that rewrites the response, offsets that locate nothing."""


def _backend(tokenizer, argument: str):
    """The ``tokenizers.Tokenizer`` behind a transformers fast tokenizer (or the object itself)."""
    try:
        from tokenizers import Tokenizer
    except ImportError as error:  # pragma: no cover - tokenizers ships with transformers
        raise ImportError(f"{argument}: the tokenizers package is needed") from error
    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    if tokenizer is None:
        raise TypeError(f"{argument} is None; pass a fast (tokenizers-backed) transformers tokenizer")
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if isinstance(backend, Tokenizer):
        return backend
    raise TypeError(f"{argument} is a slow (Python) tokenizer ({type(tokenizer).__name__}): {_SLOW_TOKENIZER_FIX}")


def _transformers_cleanup(tokenizer, backend) -> bool:
    """Whether ``tokenizer.decode`` applies transformers' clean_up_tokenization (it skips it for BPE models)."""
    if not getattr(tokenizer, "clean_up_tokenization_spaces", False) or tokenizer is backend:
        return False
    force = getattr(tokenizer, "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", False)
    return type(backend.model).__name__ != "BPE" or force


def _decode_with_spans(tokenizer, ids: list[int], skip_special_tokens: bool, argument: str):
    """(spans [n, 2] long, text) where text is ``tokenizer.decode(ids, skip_special_tokens=...)``."""
    backend = _backend(tokenizer, argument)
    special = {t.content for t in backend.get_added_tokens_decoder().values() if t.special}
    units = []
    for i, token_id in enumerate(ids):
        token = backend.id_to_token(token_id)
        if token is None or (skip_special_tokens and token in special):
            continue  # dropped by the decode: an empty span
        units.append(_Unit.of(token, i))
    steps = _backend_steps(backend)
    try:
        if not steps:  # no decoder: tokenizers joins the tokens with spaces
            units = [u.edit([(0, 0, b" ")]) if i else u for i, u in enumerate(units)]
        fused = False
        for step in steps:
            units, fused = _apply_decoder(step, units, fused)
    except NotImplementedError as error:
        raise ValueError(
            f"token_byte_spans: {argument}'s decoder is not supported ({error}); supported decoders: "
            "ByteLevel, Metaspace, WordPiece, BPEDecoder, ByteFallback, Replace, Strip, Fuse and "
            "sequences of them"
        ) from None
    unit = _join(units)
    if _transformers_cleanup(tokenizer, backend):
        for old, new in _HF_CLEANUP:
            unit = unit.replace(old, new)

    if tokenizer is backend:
        expected = backend.decode(ids, skip_special_tokens=skip_special_tokens)
    else:
        expected = tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
    if unit.data != expected.encode():
        raise _Unmappable(
            f"token_byte_spans: replaying {argument}'s decoder gave {unit.data.decode(errors='replace')!r} but "
            f"{type(tokenizer).__name__}.decode gives {expected!r}; this tokenizer decodes in a way the byte spans "
            "cannot follow (a custom decode method?)"
        )
    counts = [0] * (len(ids) + 1)
    previous = 0
    for owner in unit.owners:
        if owner < previous:  # cannot happen with the edits above
            raise RuntimeError("token_byte_spans: bytes out of token order; this is a bug in dense_rlhf.align")
        counts[owner + 1] += 1
        previous = owner
    bounds = list(itertools.accumulate(counts))  # bounds[i]: bytes of tokens before i
    spans = torch.tensor([bounds[:-1], bounds[1:]], dtype=torch.long).T.contiguous()
    return spans.reshape(len(ids), 2), expected


def _as_id_list(ids, argument: str) -> list[int]:
    if isinstance(ids, torch.Tensor):
        if ids.dim() != 1 or ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise TypeError(
                f"{argument} must be a 1-D integer tensor or a list of ints, got {ids.dtype} {tuple(ids.shape)}"
            )
        return ids.tolist()
    ids = list(ids)
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise TypeError(f"{argument} must be a 1-D integer tensor or a list of ints")
    return ids


def token_byte_spans(
    tokenizer: PreTrainedTokenizerBase | Tokenizer,
    ids: Sequence[int] | torch.Tensor,
    *,
    skip_special_tokens: bool = False,
) -> torch.Tensor:
    """Byte offsets of each token of one sequence in the UTF-8 bytes of ``tokenizer.decode(ids)``.

    Args:
        tokenizer: a transformers fast tokenizer (``PreTrainedTokenizerFast`` / ``TokenizersBackend``) or a
            ``tokenizers.Tokenizer``.
        ids: one sequence of token ids (a list of ints or a 1-D integer tensor).
        skip_special_tokens: passed to the decode; special tokens then produce no text.

    Returns:
        long [n, 2]: ``[start, end)`` of token i in ``tokenizer.decode(ids, skip_special_tokens=...).encode()``.
        The spans tile those bytes in order; a token that produces no text (a skipped special token, an id the
        tokenizer does not know) has an empty span at its position.

    The spans come from the tokens' own bytes, never from decoding tokens one at a time (a byte-level token
    holding part of a multi-byte character decodes alone to U+FFFD): the tokenizer's decoder (ByteLevel,
    Metaspace, WordPiece, BPEDecoder, ByteFallback, Replace, Strip, Fuse and sequences of them) is replayed on
    the token strings while recording which token produced each byte, and the result is checked against
    ``tokenizer.decode`` (transformers' ``clean_up_tokenization_spaces`` included). Where bytes are rewritten
    (a leading ``▁`` dropped, a space inserted before a WordPiece word, U+FFFD for an invalid byte sequence),
    they belong to the token they came from, or for an insertion to the token it precedes.

    Raises:
        TypeError: a slow (Python) tokenizer, which has no token pieces to follow (the message names the
            conversion to a fast one), or ids that are not integers.
        ValueError: an unsupported decoder, or a decode that the replay does not reproduce.
    """
    spans, _ = _decode_with_spans(tokenizer, _as_id_list(ids, "ids"), skip_special_tokens, "tokenizer")
    return spans
