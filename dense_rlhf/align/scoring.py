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

Nothing here imports transformers or tokenizers at import time.
"""

from __future__ import annotations

import bisect
import contextlib
import inspect
import itertools
import json
import numbers
import re
import threading
import weakref
from collections.abc import Mapping

import torch

__all__ = ["token_byte_spans", "project_credit", "render_and_tokenize", "RewardModelInputs", "score_and_densify_text"]

_REPLACEMENT = "\ufffd".encode()
_PLACEHOLDER = "\ue000dense-rlhf-response\ue001"  # private-use characters: no template alters them
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")
# transformers' clean_up_tokenization and the WordPiece decoder's cleanup, in their order
_HF_CLEANUP = [(" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
               (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")]
_WORDPIECE_CLEANUP = _HF_CLEANUP[:7] + [(" do not", " don't")] + _HF_CLEANUP[7:]
_SLOW_TOKENIZER_FIX = (
    "a fast (tokenizers-backed) tokenizer is needed for byte offsets; load it with AutoTokenizer.from_pretrained(...) "
    "without use_fast=False, or convert it with transformers.convert_slow_tokenizer.convert_slow_tokenizer(tok) and "
    "wrap the result in PreTrainedTokenizerFast(tokenizer_object=...)"
)


# ----------------------------------------------------------------------------------------- token bytes


def _byte_level_table() -> dict[str, int]:
    """The byte-level BPE alphabet (GPT-2's ``bytes_to_unicode``), as character -> byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


_BYTE_LEVEL = _byte_level_table()


class _Unmappable(ValueError):
    """The credit of one row cannot be mapped (its text can still be scored): a decode the byte spans cannot
    follow, a chat template that rewrites the response, offsets that locate nothing."""


class _Unit:
    """One token string at some stage of decoding: its UTF-8 bytes and, per byte, the index of the input token
    that produced it (``owner`` when it has no bytes)."""

    __slots__ = ("data", "owners", "owner")

    def __init__(self, data: bytes, owners: list[int], owner: int):
        self.data, self.owners, self.owner = bytes(data), owners, owner

    @classmethod
    def of(cls, text: str, owner: int) -> "_Unit":
        data = text.encode()
        return cls(data, [owner] * len(data), owner)

    def text(self) -> str:
        return self.data.decode()

    def edit(self, edits: list[tuple[int, int, bytes]]) -> "_Unit":
        """Replace the byte ranges ``[start, end)`` (sorted, disjoint) by new bytes. Bytes shared by the old and new
        text at either end keep their owners; the rest of the new bytes belong to the first replaced byte's owner
        (for an insertion: the next byte's, else the previous byte's, else the unit's)."""
        data, owners = self.data, self.owners
        out, own, pos = bytearray(), [], 0
        for start, end, new in edits:
            out += data[pos:start]
            own += owners[pos:start]
            old = data[start:end]
            limit = min(len(old), len(new))
            head = 0
            while head < limit and old[head] == new[head]:
                head += 1
            tail = 0
            while tail < limit - head and old[len(old) - 1 - tail] == new[len(new) - 1 - tail]:
                tail += 1
            if start + head < len(data):  # the first replaced byte, or for an insertion the next one
                middle = owners[start + head]
            elif start + head > 0:
                middle = owners[start + head - 1]
            else:
                middle = self.owner
            out += new
            own += owners[start:start + head] + [middle] * (len(new) - head - tail) + owners[end - tail:end]
            pos = end
        out += data[pos:]
        own += owners[pos:]
        return _Unit(bytes(out), own, self.owner)

    def replace(self, pattern: re.Pattern | str, content: str) -> "_Unit":
        """Replace every match of a regex, or occurrence of a literal string, left to right."""
        text = self.text()
        if isinstance(pattern, str):
            if pattern not in text:
                return self
            pattern = re.compile(re.escape(pattern))
        matches = [(m.start(), m.end()) for m in pattern.finditer(text)]
        if not matches:
            return self
        offsets = _char_offsets(text)
        new = content.encode()
        return self.edit([(offsets[s], offsets[e], new) for s, e in matches])


def _join(units: list[_Unit]) -> _Unit:
    if not units:
        return _Unit(b"", [], -1)
    return _Unit(b"".join(u.data for u in units), [o for u in units for o in u.owners], units[0].owner)


def _lossy(unit: _Unit) -> _Unit:
    """UTF-8 decoding with U+FFFD for each maximal invalid subpart (as Rust's ``from_utf8_lossy``), owners kept;
    the replacement character belongs to the first byte it replaces."""
    data, owners = unit.data, unit.owners
    try:
        data.decode()
        return unit
    except UnicodeDecodeError:
        pass
    out, own, pos = bytearray(), [], 0
    while pos < len(data):
        try:
            data[pos:].decode()
        except UnicodeDecodeError as error:
            start, end = pos + error.start, pos + error.end
            out += data[pos:start] + _REPLACEMENT
            own += owners[pos:start] + [owners[start]] * len(_REPLACEMENT)
            pos = end
            continue
        out += data[pos:]
        own += owners[pos:]
        break
    return _Unit(bytes(out), own, unit.owner)


def _decoder_steps(config: dict | None) -> list[dict]:
    if config is None:
        return []
    if config.get("type") == "Sequence":
        return [step for child in config["decoders"] for step in _decoder_steps(child)]
    return [config]


def _apply_decoder(step: dict, units: list[_Unit], fused: bool) -> tuple[list[_Unit], bool]:
    """One step of a tokenizers decoder (``decode_chain``) on the units, with provenance. After ``ByteLevel`` or
    ``Fuse`` there is one fused string; only edits at its ends (``Strip``) are then supported."""
    kind = step.get("type")
    if kind == "Fuse":
        return [_join(units)], True
    if kind == "Strip":
        content, start, stop = step["content"], step["start"], step["stop"]
        out = []
        for unit in units:
            chars = unit.text()
            head = 0
            while head < min(start, len(chars)) and chars[head] == content:
                head += 1
            tail = 0
            while tail < min(stop, len(chars) - head) and chars[len(chars) - 1 - tail] == content:
                tail += 1
            if head or tail:
                offsets = _char_offsets(chars)
                edits = [(0, offsets[head], b"")] if head else []
                edits += [(offsets[len(chars) - tail], len(unit.data), b"")] if tail else []
                unit = unit.edit(edits)
            out.append(unit)
        return out, fused
    if fused:
        raise NotImplementedError(f"a {kind} decoder after ByteLevel or Fuse")
    if kind == "ByteLevel":
        raw = []
        for unit in units:
            text = unit.text()
            if all(c in _BYTE_LEVEL for c in text):
                data = bytes(_BYTE_LEVEL[c] for c in text)
                if not unit.owners or unit.owners[0] == unit.owners[-1]:  # one owner (owners never decrease)
                    owners = [unit.owner if not unit.owners else unit.owners[0]] * len(data)
                else:
                    offsets = _char_offsets(text)
                    owners = [unit.owners[offsets[i]] for i in range(len(text))]
                raw.append(_Unit(data, owners, unit.owner))
            else:  # a token outside the byte alphabet (an added token) stands for its own UTF-8 bytes
                raw.append(unit)
        return [_lossy(_join(raw))], True
    if kind == "Metaspace":
        scheme = step.get("prepend_scheme") or ("always" if step.get("add_prefix_space", True) else "never")
        pattern = step.get("replacement", "▁")
        return [u.replace(pattern, "" if i == 0 and scheme != "never" else " ") for i, u in enumerate(units)], False
    if kind == "WordPiece":
        prefix, cleanup = step.get("prefix", "##"), step.get("cleanup", True)
        out = []
        for i, unit in enumerate(units):
            if i:
                if unit.text().startswith(prefix):
                    unit = unit.edit([(0, len(prefix.encode()), b"")])
                else:
                    unit = unit.edit([(0, 0, b" ")])
            if cleanup:
                for old, new in _WORDPIECE_CLEANUP:
                    unit = unit.replace(old, new)
            out.append(unit)
        return out, False
    if kind == "Replace":
        pattern = step["pattern"]
        regex = pattern["String"] if "String" in pattern else re.compile(pattern["Regex"])
        return [u.replace(regex, step["content"]) for u in units], False
    if kind == "BPEDecoder":
        suffix = step.get("suffix", "</w>")
        return [u.replace(suffix, "" if i == len(units) - 1 else " ") for i, u in enumerate(units)], False
    if kind == "ByteFallback":
        out, run = [], []

        def flush():
            data = bytes(int(_BYTE_TOKEN.fullmatch(u.text()).group(1), 16) for u in run)
            try:
                data.decode()
                out.append(_Unit(data, [u.owner for u in run], run[0].owner))
            except UnicodeDecodeError:  # one U+FFFD per byte token, as tokenizers does
                out.extend(_Unit(_REPLACEMENT, [u.owner] * len(_REPLACEMENT), u.owner) for u in run)
            run.clear()

        for unit in units:
            if _BYTE_TOKEN.fullmatch(unit.text()):
                run.append(unit)
                continue
            if run:
                flush()
            out.append(unit)
        if run:
            flush()
        return out, False
    raise NotImplementedError(f"the {kind} decoder")


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
    decoder = backend.decoder
    steps = _decoder_steps(json.loads(decoder.__getstate__()) if decoder is not None else None)
    try:
        if not steps:  # no decoder: tokenizers joins the tokens with spaces
            units = [u.edit([(0, 0, b" ")]) if i else u for i, u in enumerate(units)]
        fused = False
        for step in steps:
            units, fused = _apply_decoder(step, units, fused)
    except NotImplementedError as error:
        raise ValueError(f"token_byte_spans: {argument}'s decoder is not supported ({error}); supported decoders: "
                         "ByteLevel, Metaspace, WordPiece, BPEDecoder, ByteFallback, Replace, Strip, Fuse and "
                         "sequences of them") from None
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
            "cannot follow (a custom decode method?)")
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
            raise TypeError(f"{argument} must be a 1-D integer tensor or a list of ints, got {ids.dtype} "
                            f"{tuple(ids.shape)}")
        return ids.tolist()
    ids = list(ids)
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise TypeError(f"{argument} must be a 1-D integer tensor or a list of ints")
    return ids


def token_byte_spans(tokenizer, ids, *, skip_special_tokens: bool = False) -> torch.Tensor:
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


# ----------------------------------------------------------------------------------------- projection


def _as_spans(spans, argument: str) -> torch.Tensor:
    spans = torch.as_tensor(spans)
    if spans.numel() == 0:
        spans = spans.reshape(0, 2)
    if spans.dim() != 2 or spans.shape[1] != 2:
        raise ValueError(f"{argument} must have shape [n, 2] ([start, end) byte offsets), got {tuple(spans.shape)}")
    if spans.dtype.is_floating_point or spans.dtype.is_complex or spans.dtype == torch.bool:
        raise TypeError(f"{argument} must hold integers, got {spans.dtype}")
    spans = spans.long()
    if bool((spans[:, 0] < 0).any()) or bool((spans[:, 1] < spans[:, 0]).any()):
        bad = ((spans[:, 0] < 0) | (spans[:, 1] < spans[:, 0])).nonzero().flatten().tolist()
        raise ValueError(f"{argument} must satisfy 0 <= start <= end; rows {bad[:10]} do not")
    return spans


def project_credit(credit: torch.Tensor, src_spans, dst_spans) -> torch.Tensor:
    """Move per-token credit between two tokenisations of the same bytes, in proportion to byte overlap.

    ``dst[i] = sum_j credit[j] * |src_j ∩ dst_i| / |src_j|``: each source token spreads its credit evenly over
    its bytes, and each destination token collects the credit of its bytes. Source tokens with empty spans
    carry nothing. The total is conserved whenever every byte of every non-empty source span lies in exactly
    one destination span (destination spans that tile a range covering the sources); credit on bytes that no
    destination span covers is dropped, and bytes covered by several destination spans count for each.

    Args:
        credit: [n_src] float (leading batch dimensions are allowed: [..., n_src], sharing the spans).
        src_spans, dst_spans: [n_src, 2] and [n_dst, 2] integer ``[start, end)`` offsets into one byte string.

    Returns:
        float32 [n_dst] (or [..., n_dst]) on credit's device. Vectorised: prefix sums of the credit density
        over the sorted span boundaries, O((n_src + n_dst) log(n_src + n_dst)).
    """
    if not isinstance(credit, torch.Tensor):
        credit = torch.as_tensor(credit)
    if not (credit.dtype.is_floating_point and credit.dim() >= 1):
        raise TypeError(f"credit must be a floating tensor of shape [..., n_src], got {credit.dtype} "
                        f"{tuple(credit.shape)}")
    src = _as_spans(src_spans, "src_spans").to(credit.device)
    dst = _as_spans(dst_spans, "dst_spans").to(credit.device)
    if credit.shape[-1] != src.shape[0]:
        raise ValueError(f"credit has {credit.shape[-1]} values but src_spans has {src.shape[0]} spans")
    if not bool(torch.isfinite(credit).all()):
        raise ValueError("credit holds NaN or Inf")
    lead = credit.shape[:-1]
    if dst.shape[0] == 0:
        return torch.zeros(*lead, 0, dtype=torch.float32, device=credit.device)
    width = src[:, 1] - src[:, 0]
    keep = width > 0
    src, rate = src[keep], credit.double()[..., keep] / width[keep]
    points = torch.unique(torch.cat([src.reshape(-1), dst.reshape(-1)]))  # sorted span boundaries
    diff = torch.zeros(*lead, points.numel(), dtype=torch.float64, device=credit.device)
    diff.index_add_(-1, torch.searchsorted(points, src[:, 0].contiguous()), rate)
    diff.index_add_(-1, torch.searchsorted(points, src[:, 1].contiguous()), -rate)
    density = torch.cumsum(diff, -1)[..., :-1]  # credit per byte on [points[k], points[k + 1])
    mass = torch.cumsum(density * (points[1:] - points[:-1]).double(), -1)
    cumulative = torch.cat([torch.zeros(*lead, 1, dtype=torch.float64, device=credit.device), mass], -1)
    ends = torch.searchsorted(points, dst[:, 1].contiguous())
    out = cumulative[..., ends] - cumulative[..., torch.searchsorted(points, dst[:, 0].contiguous())]
    return out.float()


# ----------------------------------------------------------------------------------------- text path


def _char_offsets(text: str) -> list[int]:
    """The UTF-8 byte offset of every character boundary of a short string, as a list."""
    if text.isascii():
        return list(range(len(text) + 1))
    return [0] + list(itertools.accumulate(len(c.encode()) for c in text))


def _char_to_byte(text: str) -> torch.Tensor:
    """long [len(text) + 1]: the UTF-8 byte offset of every character boundary of ``text``."""
    points = torch.frombuffer(bytearray(text.encode("utf-32-le")), dtype=torch.int32) if text else \
        torch.zeros(0, dtype=torch.int32)
    lengths = 1 + (points >= 0x80).long() + (points >= 0x800).long() + (points >= 0x10000).long()
    return torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(lengths, 0)])


def _check_prompts(prompts, batch: int) -> bool:
    """True for chat message lists, False for plain strings; one kind per batch."""
    if isinstance(prompts, (str, bytes)) or not hasattr(prompts, "__len__"):
        raise TypeError("prompts must be a list of strings or a list of chat message lists")
    if len(prompts) != batch:
        raise ValueError(f"prompts has {len(prompts)} entries but response_ids has {batch} rows")
    kinds = set()
    for b, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            kinds.add("text")
        elif isinstance(prompt, (list, tuple)) and all(isinstance(m, Mapping) and "role" in m for m in prompt):
            kinds.add("chat")
        else:
            raise TypeError(f"prompts[{b}] must be a string or a list of messages (dicts with 'role' and 'content'), "
                            f"got {type(prompt).__name__}")
    if len(kinds) > 1:
        raise TypeError("prompts mixes plain strings and chat message lists; use one kind per batch")
    return kinds == {"chat"}


def _check_responses(response_ids, response_mask, policy_tokenizer):
    if not isinstance(response_ids, torch.Tensor) or response_ids.dim() != 2:
        raise TypeError(f"response_ids must be a [B, R] integer tensor, got "
                        f"{type(response_ids).__name__} {tuple(getattr(response_ids, 'shape', ()))}")
    if response_ids.dtype.is_floating_point or response_ids.dtype.is_complex or response_ids.dtype == torch.bool:
        raise TypeError(f"response_ids must hold integer token ids, got {response_ids.dtype}")
    if response_ids.shape[0] == 0:
        raise ValueError("response_ids has no rows")
    if response_mask is None:
        pad = getattr(policy_tokenizer, "pad_token_id", None)
        if pad is None:
            raise ValueError("response_mask is None and policy_tokenizer has no pad_token_id; pass response_mask")
        mask = response_ids != pad
    else:
        mask = torch.as_tensor(response_mask, device=response_ids.device)
        if mask.shape != response_ids.shape:
            raise ValueError(f"response_mask has shape {tuple(mask.shape)}, response_ids {tuple(response_ids.shape)}")
        if mask.dtype != torch.bool:
            if mask.dtype.is_floating_point or bool(((mask != 0) & (mask != 1)).any()):
                raise ValueError("response_mask must be bool or 0/1 integers")
            mask = mask.bool()
    empty = (~mask.any(1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"response_mask marks no response token in rows {empty[:10]}")
    negative = ((response_ids < 0) & mask).any(1).nonzero().flatten().tolist()
    if negative:
        raise ValueError(f"response_ids holds negative token ids on response tokens in rows {negative[:10]}")
    return mask


def _check_max_length(max_length) -> int | None:
    if max_length is None:
        return None
    if isinstance(max_length, bool) or not isinstance(max_length, numbers.Integral):
        raise TypeError(f"max_length must be None or a positive int, got {type(max_length).__name__} {max_length!r}")
    if max_length < 1:
        raise ValueError(f"max_length must be None or a positive int, got {max_length}")
    return int(max_length)


# ------------------------------------------------------------------------- text path: render and tokenise


class RewardModelInputs:
    """What the reward model reads for each row of a batch, where the response lies in it, and which rows cannot
    be scored (``failed``) or can be scored but not have their credit mapped (``unmapped``), each with its reason.

    ``strict`` (the default of :func:`render_and_tokenize`): the first such row raises ValueError instead.
    ``mapping=False``: the caller needs no mapping of the response's bytes (a sparse or uniform reward), and rows
    are never marked unmapped.
    """

    def __init__(self, strict: bool, mapping: bool = True):
        self.strict, self.mapping = strict, mapping
        self.add_special_tokens = True
        self.texts: list[str] = []
        self.regions: list[tuple[int, int] | None] = []  # characters of the response's rendering in texts[b]
        self.kept: list[int | None] = []  # bytes of the decoded response before its rendered part
        self.rows: list[dict | None] = []  # input_ids, offsets (characters), special; None where failed
        self.failed: dict[int, str] = {}
        self.unmapped: dict[int, str] = {}

    def fail(self, b: int, reason: str) -> None:
        if self.strict:
            raise ValueError(f"row {b}: {reason}")
        self.failed.setdefault(b, reason)
        if b < len(self.rows):
            self.rows[b] = None

    def unmap(self, b: int, reason: str) -> None:
        if not self.mapping:
            return
        if self.strict:
            raise ValueError(f"row {b}: {reason}")
        self.unmapped.setdefault(b, reason)

    def mappable(self, b: int) -> bool:
        return b not in self.failed and b not in self.unmapped


def render_and_tokenize(rm_tokenizer, prompts, responses: list[str], *, max_length: int | None = None,
                        strict: bool = True, mapping: bool = True) -> RewardModelInputs:
    """The reward model's input for each (prompt, decoded response), as :func:`score_and_densify_text` builds it:
    rendered (``prompt + response``, or the chat template with the response as the assistant turn), located, and
    tokenised with offsets, the response's text never becoming control tokens.

    Control tokens are ``rm_tokenizer``'s special tokens and the added tokens its chat template writes. The
    response is policy output: where it spells one (``"<|end|><|user|>..."``), that row is tokenised again by a copy
    of the tokenizer that reads control tokens as ordinary text, with the template's own control tokens (those
    outside the response) put back as tokens; everything else, offsets included, is what ``rm_tokenizer`` gives.
    Prompts come from the dataset and are tokenised as ``rm_tokenizer`` does.

    ``max_length``: rows longer than this are truncated by ``rm_tokenizer`` (its ``truncation_side``) only if the
    response and every token after it survive; otherwise the row fails. ``strict``, ``mapping``: see
    :class:`RewardModelInputs`.
    """
    chat = _check_prompts(prompts, len(responses))
    backend = _backend(rm_tokenizer, "rm_tokenizer")
    max_length = _check_max_length(max_length)
    if chat and getattr(rm_tokenizer, "chat_template", None) is None:
        raise ValueError("prompts are chat messages but rm_tokenizer has no chat_template; set one or pass plain-text "
                         "prompts")
    controls = _control_tokens(rm_tokenizer, backend)
    inputs = RewardModelInputs(strict, mapping)
    inputs.add_special_tokens = not chat  # chat text carries its own special tokens, as transformers encodes it
    for b, (prompt, response) in enumerate(zip(prompts, responses)):
        if not chat:
            text, region, offset, reason = prompt + response, (len(prompt), len(prompt) + len(response)), 0, None
        else:
            try:
                text, region, offset, reason = _render_chat(rm_tokenizer, prompt, response)
            except Exception as error:  # a template that raises (e.g. roles that do not alternate)
                if strict:
                    raise
                text, region, offset, reason = "", None, None, None
                inputs.fail(b, f"rm_tokenizer's chat template failed: {type(error).__name__}: {error}")
        inputs.texts.append(text)
        inputs.regions.append(region)
        inputs.kept.append(None if offset is None else len(response[:offset].encode()))
        inputs.rows.append(None)
        if reason is not None:
            inputs.unmap(b, reason)
        if region is None and b not in inputs.failed:
            spelled = sorted({c for c in controls if c in response})
            if spelled:
                inputs.fail(b, f"the response spells the reward model's control tokens {spelled[:5]} and the chat "
                               "template's rendering of it cannot be located, so they cannot be kept as text")
    _encode(inputs, rm_tokenizer, backend, controls, max_length)
    return inputs


def _control_tokens(rm_tokenizer, backend) -> dict[str, tuple[int, object]]:
    """content -> (id, AddedToken) of the control tokens: the special added tokens, and the other added tokens that
    the chat template's source contains (as transformers' ``sanitize_control_tokens`` infers them; whitespace
    tokens excepted, which templates write as ordinary text)."""
    template = getattr(rm_tokenizer, "chat_template", None)
    sources = list(template.values()) if isinstance(template, Mapping) else [template] if template else []
    out = {}
    unknown = getattr(rm_tokenizer, "unk_token", None)  # what the model makes of unknown text: no control token
    for token_id, token in backend.get_added_tokens_decoder().items():
        if token.content == unknown:
            continue
        if token.special or (not token.content.isspace() and any(token.content in s for s in sources)):
            out[token.content] = (token_id, token)
    return out


def _render_chat(rm_tokenizer, messages, response: str):
    """The chat rendering of ``messages`` + the response as the assistant turn: (text, region, offset, reason).
    ``region``: the characters of the response's rendering in text (None if it cannot be located); ``offset``: the
    character offset of that rendering within ``response`` (None if the credit cannot be mapped, then ``reason``
    says why). The template may trim whitespace around the response; any other change means no mapping."""

    def render(content):
        conversation = [dict(m) for m in messages] + [{"role": "assistant", "content": content}]
        return rm_tokenizer.apply_chat_template(conversation, tokenize=False)

    frame, text = render(_PLACEHOLDER), render(response)
    if frame.count(_PLACEHOLDER) != 1:
        return text, None, None, ("rm_tokenizer's chat template does not render the assistant message's content "
                                  f"verbatim exactly once (found it {frame.count(_PLACEHOLDER)} times); cannot "
                                  "locate the response")
    head, tail = frame.split(_PLACEHOLDER)
    if not (text.startswith(head) and text.endswith(tail) and len(text) >= len(head) + len(tail)):
        return text, None, None, ("rm_tokenizer's chat template renders the conversation differently depending on "
                                  "the response's content; cannot locate the response in the reward model's input")
    region = (len(head), len(text) - len(tail))
    middle = text[region[0]:region[1]]
    offset = response.find(middle) if middle else len(response) - len(response.lstrip())
    if offset < 0 or response[:offset].strip() or response[offset + len(middle):].strip():
        return text, region, None, ("rm_tokenizer's chat template changes the response beyond trimming whitespace "
                                    f"({response[:40]!r} rendered as {middle[:40]!r}); cannot map its bytes")
    return text, region, offset, None


def _encode(inputs: RewardModelInputs, rm_tokenizer, backend, controls, max_length) -> None:
    """Tokenise every row that has not failed into ``inputs.rows``, with no padding; rows whose response spells
    control tokens through ``_TextOnlyTokenizer``; rows longer than ``max_length`` truncated by the tokenizer (its
    ``truncation_side``) only if that leaves the response and everything after it intact."""
    todo = [b for b in range(len(inputs.texts)) if b not in inputs.failed]
    if not todo:
        return
    options = dict(add_special_tokens=inputs.add_special_tokens, return_offsets_mapping=True,
                   return_special_tokens_mask=True, return_attention_mask=False)
    rows = _call_tokenizer(rm_tokenizer, [inputs.texts[b] for b in todo], options)
    by_id = {token_id: token for token_id, token in controls.values()}
    forged: dict[int, list[tuple[int, int, int]]] = {}  # row -> the template's own control tokens (id, start, end)
    for b, row in zip(todo, rows):
        inputs.rows[b] = row
        region = inputs.regions[b]
        if region is None or not by_id:
            continue
        frame, spelled = [], False
        for token_id, (start, end) in zip(row["input_ids"], row["offsets"]):
            token = by_id.get(token_id)
            if token is None or start >= end:
                continue
            at = inputs.texts[b].find(token.content, start, end)
            if at < 0 and not token.normalized:
                continue  # produced by the model, not matched in the text (an unknown-token id)
            first, last = (at, at + len(token.content)) if at >= 0 else (start, end)
            if first < region[1] and last > region[0]:
                spelled = True
            else:
                frame.append((token_id, start, end))
        if spelled:
            forged[b] = frame
    text_only = _TextOnlyTokenizer.of(rm_tokenizer, backend, controls, [inputs.texts[b] for b in forged]) \
        if forged else None
    for b, frame in forged.items():
        inputs.rows[b] = text_only.encode(inputs.texts[b], frame, inputs.add_special_tokens)
        _check_no_control_inside(inputs, b, by_id)
    if max_length is None:
        return
    side = getattr(rm_tokenizer, "truncation_side", "right")
    long = [b for b in todo if len(inputs.rows[b]["input_ids"]) > max_length]
    plain = [b for b in long if b not in forged]
    cut = _call_tokenizer(rm_tokenizer, [inputs.texts[b] for b in plain],
                          dict(options, truncation=True, max_length=max_length)) if plain else []
    cut = dict(zip(plain, cut))
    for b in long:
        new = cut[b] if b in cut else text_only.encode(inputs.texts[b], forged[b], inputs.add_special_tokens,
                                                       max_length=max_length, side=side)
        start = inputs.regions[b][0] if inputs.regions[b] is not None else 0
        if _from_response(inputs.rows[b], start) != _from_response(new, start):
            inputs.fail(b, f"max_length={max_length} would cut the response, or the tokens after it (the row needs "
                           f"{len(inputs.rows[b]['input_ids'])} tokens), and the reward model would score a "
                           "different text. Raise max_length, shorten the prompts, or set rm_tokenizer.truncation_side"
                           " = 'left' so that the prompt is cut instead")
            continue
        inputs.rows[b] = new


def _check_no_control_inside(inputs: RewardModelInputs, b: int, by_id: dict) -> None:
    """The last line of defence: no control token inside the response after tokenising it as text."""
    row, (start, end) = inputs.rows[b], inputs.regions[b]
    inside = {by_id[i].content for i, (s, e) in zip(row["input_ids"], row["offsets"])
              if i in by_id and s < end and e > start}
    if inside:
        inputs.fail(b, f"rm_tokenizer makes the control tokens {sorted(inside)[:5]} from the response's text even when "
                       "it reads control tokens as text, so the response would forge them")


def _call_tokenizer(rm_tokenizer, texts: list[str], options: dict) -> list[dict]:
    try:
        encoded = rm_tokenizer(texts, **options)
    except NotImplementedError as error:
        raise TypeError(f"rm_tokenizer gives no offsets: {_SLOW_TOKENIZER_FIX}") from error
    return [dict(input_ids=encoded["input_ids"][k], offsets=[tuple(o) for o in encoded["offset_mapping"][k]],
                 special=encoded["special_tokens_mask"][k]) for k in range(len(texts))]


class _TextOnlyTokenizer:
    """A copy of a reward-model tokenizer in which control tokens are ordinary text.

    The copy marks every control token special and sets ``encode_special_tokens`` (what transformers'
    ``split_special_tokens=True`` does), hides the control tokens' pieces from its model's vocabulary (a Unigram,
    WordPiece or WordLevel model, or BPE merges, could otherwise produce them from their text), and registers for
    each control token a stand-in: a private-use character as an ordinary added token with the control token's
    matching options (lstrip, rstrip, single_word, normalized). The chat template's own control tokens are
    replaced by their stand-ins in the text, so the copy splits the text at exactly the places the original splits
    it at them, and every other piece, the response's spelled control tokens included, is tokenised as text;
    stand-in ids and offsets are then mapped back. Copies are cached per tokenizer (building one parses the
    tokenizer's JSON)."""

    _cache: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
    _cache_lock = threading.Lock()

    def __init__(self, backend, controls: dict[str, tuple[int, object]], stand_ins: list[str]):
        from tokenizers import AddedToken, Tokenizer

        state = json.loads(backend.to_str())
        for entry in state.get("added_tokens", []):
            if entry["content"] in controls:
                entry["special"] = True
        _hide_pieces(state["model"], set(controls), stand_ins[-1])
        copy = Tokenizer.from_str(json.dumps(state))
        copy.no_truncation()
        copy.no_padding()
        copy.encode_special_tokens = True
        self.stand_in: dict[int, str] = {}  # original control id -> stand-in character
        self.original: dict[int, int] = {}  # stand-in id -> original control id
        copy.add_tokens([AddedToken(char, single_word=token.single_word, lstrip=token.lstrip, rstrip=token.rstrip,
                                    normalized=token.normalized, special=False)
                         for (_, token), char in zip(controls.values(), stand_ins)])
        for token_id, token in backend.get_added_tokens_decoder().items():  # ids the copy gave other added tokens
            copy_id = copy.token_to_id(token.content)
            if copy_id is not None and copy_id != token_id:
                self.original[copy_id] = token_id
        for (token_id, token), char in zip(controls.values(), stand_ins):
            self.stand_in[token_id] = char
            self.original[copy.token_to_id(char)] = token_id
        self.copy = copy
        self.lock = threading.Lock()  # truncation is a setting of the copy

    @classmethod
    def of(cls, rm_tokenizer, backend, controls, texts: list[str]) -> "_TextOnlyTokenizer":
        used = {c for text in texts for c in text if ord(c) >= _STAND_IN_BASE}
        stand_ins, code = [], _STAND_IN_BASE
        while len(stand_ins) < len(controls) + 1:  # and one to hide the control tokens' pieces behind
            if chr(code) not in used:
                stand_ins.append(chr(code))
            code += 1
        key = (backend.get_vocab_size(with_added_tokens=True), tuple(controls), tuple(stand_ins))
        with cls._cache_lock:
            cached = cls._cache.get(rm_tokenizer)
            if cached is not None and cached[0] == key:
                return cached[1]
        made = cls(backend, controls, stand_ins)
        with cls._cache_lock:
            cls._cache[rm_tokenizer] = (key, made)
        return made

    def encode(self, text: str, frame: list[tuple[int, int, int]], add_special_tokens: bool, *,
               max_length: int | None = None, side: str = "right") -> dict:
        """The row of ``text`` with the control tokens at ``frame`` ((id, start, end) in characters) kept as
        tokens and every other control-token string read as text."""
        pieces, starts, shifts, position, shift = [], [], [], 0, 0
        for token_id, start, end in frame:
            pieces += [text[position:start], self.stand_in[token_id]]
            starts.append(start - shift)  # the stand-in's position in the new text
            shift += end - start - 1
            shifts.append(shift)
            position = end
        pieces.append(text[position:])
        with self.lock:
            if max_length is None:
                self.copy.no_truncation()
            else:
                self.copy.enable_truncation(max_length, strategy="longest_first", direction=side)
            try:
                encoding = self.copy.encode("".join(pieces), add_special_tokens=add_special_tokens)
            finally:
                self.copy.no_truncation()

        def back(q: int) -> int:  # a character boundary of the new text -> of text
            k = bisect.bisect_right(starts, q - 1)
            return q + (shifts[k - 1] if k else 0)

        # the special-tokens mask marks what the post-processor adds, as for rm_tokenizer; stand-ins are text tokens
        ids = [self.original.get(token_id, token_id) for token_id in encoding.ids]
        offsets = [(back(s), back(e)) for s, e in encoding.offsets]
        return dict(input_ids=ids, offsets=offsets, special=list(encoding.special_tokens_mask))


_STAND_IN_BASE = 0x100000  # Supplementary Private Use Area-B


def _hide_pieces(model: dict, pieces: set[str], prefix: str) -> None:
    """Make the model of a tokenizer's JSON unable to produce ``pieces`` from text (a Unigram or WordLevel model
    would, and so would BPE merges or its whole-word lookup): their vocabulary entries are renamed behind a
    character no text holds (ids unchanged; the added tokens of the same content then get new ids in the copy)
    and BPE merges that make or use them are dropped (the others keep their order). The model's unknown token is
    left alone (the model looks it up by name)."""
    pieces = pieces - {model.get("unk_token")}
    vocab = model.get("vocab")
    if isinstance(vocab, dict):
        for piece in pieces & set(vocab):
            vocab[prefix + piece] = vocab.pop(piece)
    elif isinstance(vocab, list):  # Unigram: [piece, score] by id
        for token_id, entry in enumerate(vocab):
            if entry[0] in pieces and token_id != model.get("unk_id"):
                entry[0] = prefix + entry[0]
    if isinstance(model.get("merges"), list):
        kept = []
        for merge in model["merges"]:
            left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
            if not ({left, right, left + right} & pieces):
                kept.append(merge)
        model["merges"] = kept


def _from_response(row, char_start: int):
    """The tokens from the first one that reaches into or past the response's start, to the end: what truncation
    must keep."""
    offsets = row["offsets"]
    first = next((i for i, (s, e) in enumerate(offsets) if s < e and e > char_start), None)
    if first is None:  # nothing reaches the response (it is empty): keep what follows the last text token
        first = 1 + max((i for i, (s, e) in enumerate(offsets) if s < e), default=-1)
    return list(row["input_ids"][first:]), [tuple(o) for o in offsets[first:]]


# ------------------------------------------------------------------------- text path: score and project


def _own_byte_lengths(backend, ids: list[int]) -> list[int | None]:
    """Each token's own byte count where its string says it exactly: byte-level BPE tokens (one character per
    byte) and byte-fallback tokens (``<0xE3>``); None for the others."""
    steps = _decoder_steps(json.loads(backend.decoder.__getstate__()) if backend.decoder is not None else None)
    byte_level = any(step.get("type") == "ByteLevel" for step in steps)
    fallback = any(step.get("type") == "ByteFallback" for step in steps)
    lengths: list[int | None] = []
    for token_id in ids:
        token = backend.id_to_token(token_id) or ""
        if fallback and _BYTE_TOKEN.fullmatch(token):
            lengths.append(1)
        elif byte_level and token and all(c in _BYTE_LEVEL for c in token):
            lengths.append(len(token))
        else:
            lengths.append(None)
    return lengths


def _rm_byte_spans(backend, text: str, table: torch.Tensor, ids: list[int],
                   offsets: list[tuple[int, int]]) -> torch.Tensor:
    """Byte spans of the reward model's tokens in ``text`` from its character offsets (``table``:
    ``_char_to_byte(text)``).

    Offsets are in whole characters, so a byte-level (or byte-fallback) token holding part of a multi-byte
    character gets the whole character's span, overlapping its neighbours. Such a token, whose span is wider than
    its own bytes, is narrowed to its own bytes, starting where the previous token ended (or at its span's start)."""
    spans = table[torch.tensor(offsets, dtype=torch.long).reshape(-1, 2)]
    if text.isascii():
        return spans  # no multi-byte character: no token holds part of one
    out = spans.tolist()
    cursor = 0
    for j, length in enumerate(_own_byte_lengths(backend, ids)):
        start, end = out[j]
        if length is not None and end - start > length:
            begin = max(start, cursor) if cursor <= end else start
            if begin + length <= end:
                out[j] = [begin, begin + length]
        if out[j][1] > out[j][0]:
            cursor = out[j][1]
    return torch.tensor(out, dtype=torch.long).reshape(-1, 2)


def _check_offsets(inputs: RewardModelInputs) -> None:
    """Rows whose offsets are zero-width for every ordinary token (tokenizers < 0.20.1 did this for Llama-3
    tokenizer files) cannot be mapped."""
    for b, row in enumerate(inputs.rows):
        if row is None or not inputs.mappable(b):
            continue
        widths = [e - s for (s, e), special in zip(row["offsets"], row["special"]) if not special]
        if widths and not any(widths):
            inputs.unmap(b, "rm_tokenizer returned zero-width offsets for every token, so its tokens cannot be "
                            "located in the text. This is a known tokenizers bug with Llama-3 tokenizer files (BPE "
                            "with ignore_merges; huggingface/tokenizers#1553, fixed in tokenizers 0.20.1): upgrade "
                            "tokenizers")


def _position_limit(model) -> int | None:
    """The most tokens the model takes: ``config.max_position_embeddings`` (GPT-2's ``n_positions``), less the
    offset of position embeddings that start after a padding index (RoBERTa style). None where the config has no
    limit or scales its rotary embeddings beyond it."""
    config = getattr(model, "config", None)
    limit = getattr(config, "max_position_embeddings", None)
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        return None
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    if isinstance(rope, Mapping) and rope.get("rope_type", rope.get("type", "default")) not in (None, "default"):
        return None
    for name, module in model.named_modules():
        if name.endswith("position_embeddings") and isinstance(module, torch.nn.Embedding) \
                and module.padding_idx is not None:
            limit = min(limit, module.num_embeddings - module.padding_idx - 1)
    return limit


def _check_positions(reward_model, inputs: RewardModelInputs) -> None:
    limit = _position_limit(reward_model)
    if limit is None:
        return
    for b, row in enumerate(inputs.rows):
        if row is not None and len(row["input_ids"]) > limit:
            inputs.fail(b, f"the reward model's input has {len(row['input_ids'])} tokens but the model takes at most "
                           f"{limit} positions (its config's max_position_embeddings); pass max_length={limit} (with "
                           "rm_tokenizer.truncation_side = 'left' to cut the prompt) or shorten the prompts")


def _pad(rows, rm_tokenizer, device):
    length = max(len(r["input_ids"]) for r in rows)
    side = getattr(rm_tokenizer, "padding_side", "right")
    pad = getattr(rm_tokenizer, "pad_token_id", None)
    if pad is None:
        if any(len(r["input_ids"]) != length for r in rows):
            raise ValueError("rm_tokenizer has no pad token and the reward model's inputs differ in length; set "
                             "rm_tokenizer.pad_token (and the reward model's config.pad_token_id to its id)")
        pad = 0
    ids = torch.full((len(rows), length), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    starts = []
    for b, row in enumerate(rows):
        n = len(row["input_ids"])
        start = length - n if side == "left" else 0
        ids[b, start:start + n] = torch.tensor(row["input_ids"], dtype=torch.long)
        mask[b, start:start + n] = 1
        starts.append(start)
    return ids.to(device), mask.to(device), starts


def _forward(reward_model, rm_tokenizer, inputs: RewardModelInputs, method: str, capture):
    """One reward-model forward over the rows that have not failed, inside ``capture`` (not yet entered: for "abc" a
    :func:`dense_rlhf.capture_reward_attention`, for "prefix" a :func:`dense_rlhf.capture_prefix_scores`, otherwise
    none): ``{row: (score, values over that row's tokens [n] float32 on the CPU, or None)}`` where the values are the
    head-averaged attention row ("abc") or the score at every position ("prefix")."""
    from dense_rlhf.capture import _pooled_scores

    todo = [b for b, row in enumerate(inputs.rows) if row is not None]
    if not todo:
        return {}
    device = next(reward_model.parameters()).device
    input_ids, attention_mask, starts = _pad([inputs.rows[b] for b in todo], rm_tokenizer, device)
    with torch.no_grad():
        model_inputs = dict(input_ids=input_ids, attention_mask=attention_mask)
        if any(starts) and "position_ids" in inspect.signature(reward_model.forward).parameters:
            # left padding: count positions from each row's first token, as an unpadded row would (absolute
            # position embeddings, e.g. GPT-2, would otherwise see shifted positions)
            model_inputs["position_ids"] = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        with capture or contextlib.nullcontext() as cap:
            out = reward_model(**model_inputs)
        scores = _pooled_scores(out.logits if hasattr(out, "logits") else out[0], "score_and_densify_text").float()
        values, index = None, None
        if method == "abc":
            values, index = cap.rows.mean(1).float().cpu(), cap.reward_index.cpu()  # [n, L]: heads averaged
        elif method == "prefix":
            values, index = cap.prefix_scores.float().cpu(), cap.reward_index.cpu()
    scores, mask = scores.cpu(), attention_mask.cpu()
    out = {}
    for k, b in enumerate(todo):
        if index is not None and not bool(mask[k, index[k]]):
            inputs.fail(b, "the reward model read its score at a padding position: its config.pad_token_id "
                           f"({getattr(reward_model.config, 'pad_token_id', None)}) differs from "
                           f"rm_tokenizer.pad_token_id ({getattr(rm_tokenizer, 'pad_token_id', None)}), or the model "
                           "pools its first position (BERT-style) and rm_tokenizer pads on the left")
            continue
        if not bool(torch.isfinite(scores[k])):
            inputs.fail(b, f"the reward model's score is {float(scores[k])}")
            continue
        n = len(inputs.rows[b]["input_ids"])
        out[b] = (float(scores[k]), None if values is None else values[k, starts[k]:starts[k] + n])
    return out


def _project_row(inputs: RewardModelInputs, b: int, rm_backend, values: torch.Tensor, policy_spans: torch.Tensor,
                 differences: bool = False) -> torch.Tensor:
    """Row ``b``'s per-token values [n] over the reward model's n tokens (unpadded), restricted to the tokens that
    overlap the response and projected onto the policy's response tokens (byte spans ``policy_spans`` [R_b, 2] in
    the decoded response): float32 [R_b]. ``differences``: the values are prefix scores, and what is projected is
    each response token's change of the score (the first one's own score), as :func:`dense_rlhf.prefix_rewards`
    defines it."""
    text, row = inputs.texts[b], inputs.rows[b]
    table = _char_to_byte(text)
    spans = _rm_byte_spans(rm_backend, text, table, row["input_ids"], row["offsets"])
    first, last = int(table[inputs.regions[b][0]]), int(table[inputs.regions[b][1]])
    overlap = (spans[:, 0] < spans[:, 1]) & (spans[:, 0] < last) & (spans[:, 1] > first)
    positions = overlap.nonzero().flatten()
    credit = values[positions]
    if differences:
        credit = torch.diff(credit, prepend=credit.new_zeros(1))
    destination = (policy_spans - inputs.kept[b] + first).clamp(first, last)  # in the reward model's text
    return project_credit(credit, spans[positions], destination)


def _rewards_from_credit(credit: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor, beta: float,
                        sparse_rows=(), empty_rows=()) -> torch.Tensor:
    """ABC's rewards [B, R] from the projected credit [B, R] (:func:`dense_rlhf.dense_rewards`); rows in
    ``sparse_rows`` get the score on their last response token instead, rows in ``empty_rows`` zeros."""
    from dense_rlhf.ops import dense_rewards

    special = set(sparse_rows) | set(empty_rows)
    dense = [b for b in range(credit.shape[0]) if b not in special]
    rewards = torch.zeros(credit.shape, dtype=torch.float32, device=credit.device)
    if dense:
        rewards[dense] = dense_rewards(credit[dense], scores[dense], mask[dense], beta=beta)
    last = torch.where(mask, torch.arange(mask.shape[1], device=mask.device), -1).amax(1)
    for b in sparse_rows:
        rewards[b, last[b]] = scores[b]
    return rewards


def _rewards_from_differences(projected: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor, beta: float,
                              sparse_rows=(), empty_rows=()) -> torch.Tensor:
    """Prefix-difference rewards [B, R] from the reward model's score changes projected onto the policy's tokens
    [B, R], through :func:`dense_rlhf.prefix_rewards` (the single implementation of the formula): the projected
    changes, accumulated along each row, are its prefix scores, and the score is read at one position past the end,
    so the last response token also gets what did not reach any policy token (the change after the response, and the
    share of a reward-model token that straddles the response's start). Rows in ``sparse_rows`` get the score on
    their last response token instead, rows in ``empty_rows`` zeros."""
    from dense_rlhf.ops import prefix_rewards

    batch, length = projected.shape
    special = set(sparse_rows) | set(empty_rows)
    dense = [b for b in range(batch) if b not in special]
    rewards = torch.zeros(projected.shape, dtype=torch.float32, device=projected.device)
    if dense:
        prefix = torch.cat([torch.cumsum(projected[dense] * mask[dense], 1), scores[dense, None]], 1)
        extended = torch.cat([mask[dense], mask.new_zeros(len(dense), 1)], 1)
        index = torch.full((len(dense),), length, dtype=torch.long, device=projected.device)
        rewards[dense] = prefix_rewards(prefix, extended, beta=beta, reward_index=index)[:, :length]
    last = torch.where(mask, torch.arange(length, device=mask.device), -1).amax(1)
    for b in sparse_rows:
        rewards[b, last[b]] = scores[b]
    return rewards


def _baseline_rewards(method: str, scores: torch.Tensor, mask: torch.Tensor, empty_rows=()) -> torch.Tensor:
    """The "sparse" or "uniform" rewards [B, R] of the rows not in ``empty_rows`` (zeros there)."""
    from dense_rlhf.ops import sparse_rewards, uniform_rewards

    rows = [b for b in range(mask.shape[0]) if b not in set(empty_rows)]
    rewards = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    if rows:
        rewards[rows] = (sparse_rewards if method == "sparse" else uniform_rewards)(scores[rows], mask[rows])
    return rewards


class _TextScores:
    """The result of :func:`_score_text`: scores [B] (NaN where a row failed), rewards [B, R], and the rows that
    failed or got the sparse reward because their credit could not be mapped, each with its reason."""

    def __init__(self, scores, rewards, failed: dict[int, str], unmapped: dict[int, str]):
        self.scores, self.rewards, self.failed, self.unmapped = scores, rewards, failed, unmapped


METHODS = ("abc", "prefix", "sparse", "uniform")


class _TextBatch:
    """A batch prepared for scoring (:func:`_prepare_text`): the reward model's inputs, the response mask and the
    policy tokens' byte spans; :func:`_finish_text` turns per-row scores and values into rewards."""

    def __init__(self, inputs, mask, policy_spans, rm_backend, beta, response_ids):
        self.inputs, self.mask, self.policy_spans = inputs, mask, policy_spans
        self.rm_backend, self.beta, self.response_ids = rm_backend, beta, response_ids


def _check_method(method, allowed=METHODS) -> str:
    if not isinstance(method, str) or method not in allowed:
        raise ValueError(f"method must be one of {allowed}, got {method!r}")
    return method


def _prepare_text(rm_tokenizer, prompts, response_ids, *, policy_tokenizer, response_mask, beta, max_length,
                  strict: bool, method: str) -> _TextBatch:
    """Check the arguments, decode the responses with their tokens' byte spans, render and tokenise them for the
    reward model (:func:`render_and_tokenize`): everything before the reward model's forward."""
    from dense_rlhf.ops import check_beta

    _backend(policy_tokenizer, "policy_tokenizer")
    rm_backend = _backend(rm_tokenizer, "rm_tokenizer")
    beta = check_beta(beta)
    max_length = _check_max_length(max_length)
    mask = _check_responses(response_ids, response_mask, policy_tokenizer)
    _check_prompts(prompts, response_ids.shape[0])
    ids_cpu, mask_cpu = response_ids.cpu(), mask.cpu()
    maps = method in ("abc", "prefix")  # the baselines need no mapping of the response's tokens

    policy_spans, responses, unmapped = [], [], {}
    for b in range(response_ids.shape[0]):
        ids = ids_cpu[b][mask_cpu[b]].tolist()
        try:
            spans, response = _decode_with_spans(policy_tokenizer, ids, True, "policy_tokenizer")
        except _Unmappable as error:
            if strict and maps:
                raise ValueError(f"row {b}: {error}") from None
            spans, response = None, policy_tokenizer.decode(ids, skip_special_tokens=True)
            unmapped[b] = str(error)
        policy_spans.append(spans)
        responses.append(response)

    inputs = render_and_tokenize(rm_tokenizer, prompts, responses, max_length=max_length, strict=strict,
                                 mapping=maps)
    for b, reason in unmapped.items():
        inputs.unmap(b, reason)
    if maps:
        _check_offsets(inputs)
    return _TextBatch(inputs, mask, policy_spans, rm_backend, beta, response_ids)


def _finish_text(batch: _TextBatch, results: dict, method: str) -> _TextScores:
    """The rewards of a prepared batch from ``{row: (score, values [n] or None)}`` (see :func:`_forward`)."""
    inputs, mask, response_ids = batch.inputs, batch.mask, batch.response_ids
    mask_cpu = mask.cpu()
    credit = torch.zeros(response_ids.shape, dtype=torch.float32)
    scores = torch.full((response_ids.shape[0],), float("nan"), dtype=torch.float32)
    for b, (score, values) in results.items():
        scores[b] = score
        if method in ("abc", "prefix") and inputs.mappable(b):
            credit[b, mask_cpu[b]] = _project_row(inputs, b, batch.rm_backend, values, batch.policy_spans[b],
                                                  differences=method == "prefix")
    device = response_ids.device
    failed = dict(inputs.failed)
    unmapped = {b: reason for b, reason in inputs.unmapped.items() if b not in failed}
    credit, scores = credit.to(device), scores.to(device)
    if method == "abc":
        rewards = _rewards_from_credit(credit, scores, mask, batch.beta, sparse_rows=sorted(unmapped),
                                       empty_rows=sorted(failed))
    elif method == "prefix":
        rewards = _rewards_from_differences(credit, scores, mask, batch.beta, sparse_rows=sorted(unmapped),
                                            empty_rows=sorted(failed))
    else:
        rewards = _baseline_rewards(method, scores, mask, empty_rows=sorted(failed))
    return _TextScores(scores, rewards, failed, unmapped)


def _score_text(reward_model, rm_tokenizer, prompts, response_ids, *, policy_tokenizer, response_mask, beta,
                layer, max_length, strict: bool, method: str = "abc") -> _TextScores:
    """:func:`score_and_densify_text`'s work. ``strict=False``: a row that cannot be scored is reported in
    ``failed`` (the others are still scored), and a row whose credit cannot be mapped gets the sparse reward
    (its score on its last response token) and is reported in ``unmapped``; argument errors still raise."""
    from dense_rlhf.capture import capture_prefix_scores, capture_reward_attention

    _check_method(method)
    if method == "abc":
        capture = capture_reward_attention(reward_model, layer=layer)  # checks the model and the layer
    elif method == "prefix":
        capture = capture_prefix_scores(reward_model)  # checks that its positions are prefixes
    else:
        capture = None
    batch = _prepare_text(rm_tokenizer, prompts, response_ids, policy_tokenizer=policy_tokenizer,
                          response_mask=response_mask, beta=beta, max_length=max_length, strict=strict, method=method)
    _check_positions(reward_model, batch.inputs)
    results = _forward(reward_model, rm_tokenizer, batch.inputs, method, capture)
    return _finish_text(batch, results, method)


def score_and_densify_text(reward_model, rm_tokenizer, prompts, response_ids, *, policy_tokenizer,
                           response_mask=None, beta: float = 0.8, layer: int = -1, max_length: int | None = None,
                           method: str = "abc"):
    """Dense rewards from a reward model with its own tokenizer and chat template, on the policy's response tokens:
    ABC by default, or prefix differences, or the sparse or uniform baseline (``method``, as in
    :func:`dense_rlhf.score_and_densify`).

    For each row: the policy's response tokens (``response_mask``) are decoded with
    ``policy_tokenizer.decode(..., skip_special_tokens=True)``, as verl and OpenRLHF do; the reward model's
    input is ``prompt + response`` for a plain-text prompt (tokenised with the tokenizer's special tokens) or,
    for a chat prompt, ``rm_tokenizer.apply_chat_template(messages + [{"role": "assistant", "content":
    response}], tokenize=False)`` (tokenised without adding special tokens, as transformers does for chat
    text). The response is policy output, so its text never becomes control tokens: where it spells the reward
    model's special tokens or the added tokens its chat template writes (``"<|end|><|user|>..."``), they are
    tokenised as ordinary text while the template's own stay tokens (:func:`render_and_tokenize`). The reward
    model runs once on the batch inside :func:`dense_rlhf.capture_reward_attention`; its head-averaged attention
    row from the reward position is restricted to its tokens that overlap the response's bytes and projected onto
    the policy's tokens by :func:`project_credit` (byte spans from the fast tokenizers' offsets and
    :func:`token_byte_spans`), and :func:`dense_rlhf.dense_rewards` turns those ``[B, R]`` rows into the rewards.

    ``method``:

    - ``"abc"`` (default): as above.
    - ``"prefix"``: prefix-difference rewards. The reward model's score at every position
      (:func:`dense_rlhf.capture_prefix_scores`, decoder ``*ForSequenceClassification`` models) gives each of its
      tokens that overlap the response its change of the score (the first one its own score); those changes are
      projected onto the policy's tokens the same way, and :func:`dense_rlhf.prefix_rewards` turns them into the
      rewards, with what reaches no policy token (the change after the response, e.g. over the template's closing
      tokens, and the share of a token straddling the response's start) on the last response token, so each row
      still sums to the score. With the same tokenizer on both sides this is ``score_and_densify(...,
      method="prefix")`` on the ids.
    - ``"sparse"``, ``"uniform"``: the score on the last response token, or score / n on each of the n; the
      response's tokens need no mapping, so a template that changes the response is no error for them.

    ``dense_rlhf.integrations.vllm.ServedRewardModel.score_and_densify_text`` computes "prefix", "sparse" and
    "uniform" from a reward model served by vLLM with this same rendering and mapping.

    Args:
        reward_model: a transformers sequence-classification model (one logit, or two: ``logit[1] - logit[0]``)
            whose attention can be captured (see :func:`dense_rlhf.capture_reward_attention`).
        rm_tokenizer: its fast tokenizer (offsets are needed); ``padding_side`` and ``truncation_side`` are
            honoured; a pad token is needed when the rows differ in length.
        prompts: B plain strings, or B lists of chat messages (dicts with "role" and "content"), one kind. They
            come from the dataset and are tokenised as ``rm_tokenizer`` does, control tokens included.
        response_ids: [B, R] policy token ids of the responses (right-padded, or any layout with a mask).
        policy_tokenizer: the policy's fast tokenizer.
        response_mask: [B, R] bool or 0/1, True on response tokens; default ``response_ids != pad_token_id``
            (pass it when the pad id is also the EOS id and EOS is part of the response).
        beta, layer: as in :func:`dense_rlhf.score_and_densify` (``layer``: "abc" only).
        max_length: cap on the reward model's input tokens. A longer input is truncated by ``rm_tokenizer``
            (its ``truncation_side``) only if the response and every token after it survive (left truncation
            drops the start of the prompt); otherwise ValueError. None: no truncation, and an input longer than
            the reward model's ``config.max_position_embeddings`` is a ValueError.

    Returns:
        ``(scores, rewards)``: float32 [B] reward-model scores and float32 [B, R] rewards aligned with
        ``response_ids``, on its device: zero off the mask, each row summing to its score; for "abc",
        ``(1 - beta) * score`` on the last response token plus ``beta * score`` spread by the projected attention.

    What the credit of a token means here: a reward-model token's attention (for "prefix": its change of the score)
    is split over the policy tokens whose bytes it overlaps, in proportion to the overlap. Policy tokens with no
    text (special tokens such as EOS, skipped in the decode) and whitespace that the chat template trims get no
    attention credit; a reward-model token that straddles the start of the response (plain-text prompts can merge
    across it) contributes only its response bytes' share. ``dense_rewards`` normalises what reaches the response
    tokens, so no reward mass is lost either way; if none reaches them the dense part falls on the last token. For
    "prefix", what reaches no response token is added to the last one.

    Raises (all before the reward model's forward, except the padding-position and non-finite-score checks):
        TypeError: slow tokenizers (no offsets), a tokenizer that is None, bad argument types (``max_length``
            not an int).
        ValueError: an unknown ``method``; for "prefix", a reward model whose positions are not prefixes
            (bidirectional) or that has no ``score`` head; shape or mask problems, negative token ids, ``beta``
            outside [0, 1], ``max_length`` < 1, a
            chat template that changes the response beyond trimming whitespace, truncation that would cut the
            response, an input longer than the reward model's positions, zero-width offsets from
            ``rm_tokenizer`` (a known tokenizers bug), a score read at a padding position (mismatched pad ids) or
            not finite, and everything :func:`dense_rlhf.dense_rewards` rejects. Row-level messages start with
            ``row b:``.
    """
    result = _score_text(reward_model, rm_tokenizer, prompts, response_ids, policy_tokenizer=policy_tokenizer,
                         response_mask=response_mask, beta=beta, layer=layer, max_length=max_length, strict=True,
                         method=method)
    return result.scores, result.rewards
