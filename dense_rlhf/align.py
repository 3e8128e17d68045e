"""ABC across tokenizers: credit from a reward model with its own tokenizer and chat template, on the policy's tokens.

The policy generates token ids; a reward model with another tokenizer (and often a chat template) reads the
decoded text. Its attention row is indexed by *its* tokens, while PPO needs rewards on the *policy's* tokens.
Both token sequences cover the same text, so this module works in UTF-8 bytes of that text:

- :func:`token_byte_spans`: the ``[start, end)`` bytes of every policy token in its decoded text, derived from
  the tokens' own pieces (byte-level BPE bytes, SentencePiece ``▁`` pieces, WordPiece ``##`` continuations)
  by replaying the tokenizer's decoder with provenance, and checked against ``tokenizer.decode``.
- :func:`project_credit`: moves credit from one set of spans to another in proportion to byte overlap,
  conserving the total whenever the destination covers the source.
- :func:`score_and_densify_text`: decode, render, tokenise for the reward model (its fast tokenizer's offsets
  give its tokens' spans), capture its attention row, project the row onto the policy's response tokens, and
  hand the ``[B, R]`` rows to :func:`dense_rlhf.dense_rewards`, the single implementation of the formula.

Nothing here imports transformers or tokenizers at import time.
"""

from __future__ import annotations

import inspect
import itertools
import json
import re
from collections.abc import Mapping

import torch

__all__ = ["token_byte_spans", "project_credit", "score_and_densify_text"]

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
        raise ValueError(
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
    return mask


def _render_chat(rm_tokenizer, messages, response: str) -> tuple[str, int, int, int]:
    """The chat rendering of ``messages`` + the response as the assistant turn, and where the response lies in it:
    (text, char start, char end, char offset of the rendered part within ``response``). The template may trim
    whitespace around the response; any other change to it is an error."""
    if getattr(rm_tokenizer, "chat_template", None) is None:
        raise ValueError("prompts are chat messages but rm_tokenizer has no chat_template; set one or pass plain-text "
                         "prompts")

    def render(content):
        conversation = [dict(m) for m in messages] + [{"role": "assistant", "content": content}]
        return rm_tokenizer.apply_chat_template(conversation, tokenize=False)

    frame = render(_PLACEHOLDER)
    if frame.count(_PLACEHOLDER) != 1:
        raise ValueError("rm_tokenizer's chat template does not render the assistant message's content verbatim "
                         f"exactly once (found it {frame.count(_PLACEHOLDER)} times); cannot locate the response")
    head, tail = frame.split(_PLACEHOLDER)
    text = render(response)
    if not (text.startswith(head) and text.endswith(tail) and len(text) >= len(head) + len(tail)):
        raise ValueError("rm_tokenizer's chat template renders the conversation differently depending on the "
                         "response's content; cannot locate the response in the reward model's input")
    middle = text[len(head):len(text) - len(tail)]
    offset = response.find(middle) if middle else len(response) - len(response.lstrip())
    if offset < 0 or response[:offset].strip() or response[offset + len(middle):].strip():
        raise ValueError("rm_tokenizer's chat template changes the response beyond trimming whitespace "
                         f"({response[:40]!r} rendered as {middle[:40]!r}); cannot map its bytes")
    return text, len(head), len(head) + len(middle), offset


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


def _encode(rm_tokenizer, texts: list[str], add_special_tokens: bool, max_length, regions):
    """Tokenise without padding; rows longer than ``max_length`` are truncated by the tokenizer (its
    ``truncation_side``) only if that leaves the response and everything after it intact."""
    options = dict(add_special_tokens=add_special_tokens, return_offsets_mapping=True,
                   return_special_tokens_mask=True, return_attention_mask=False)
    try:
        encoded = rm_tokenizer(texts, **options)
    except NotImplementedError as error:
        raise TypeError(f"rm_tokenizer gives no offsets: {_SLOW_TOKENIZER_FIX}") from error
    rows = [dict(input_ids=encoded["input_ids"][b], offsets=encoded["offset_mapping"][b],
                 special=encoded["special_tokens_mask"][b]) for b in range(len(texts))]
    if max_length is None:
        return rows
    long = [b for b, row in enumerate(rows) if len(row["input_ids"]) > max_length]
    if not long:
        return rows
    cut = rm_tokenizer([texts[b] for b in long], truncation=True, max_length=max_length, **options)
    damaged = []
    for k, b in enumerate(long):
        new = dict(input_ids=cut["input_ids"][k], offsets=cut["offset_mapping"][k],
                   special=cut["special_tokens_mask"][k])
        if _from_response(rows[b], regions[b][0]) != _from_response(new, regions[b][0]):
            damaged.append((b, len(rows[b]["input_ids"])))
            continue
        rows[b] = new
    if damaged:
        raise ValueError(
            f"max_length={max_length} would cut the response, or the tokens after it, of rows "
            f"{[b for b, _ in damaged][:10]} (they need {max(n for _, n in damaged)} tokens), and the reward model "
            "would score a different text. Raise max_length, shorten the prompts, or set "
            "rm_tokenizer.truncation_side = 'left' so that the prompt is cut instead")
    return rows


def _from_response(row, char_start: int):
    """The tokens from the first one that reaches into or past the response's start, to the end: what truncation
    must keep."""
    offsets = row["offsets"]
    first = next((i for i, (s, e) in enumerate(offsets) if s < e and e > char_start), None)
    if first is None:  # nothing reaches the response (it is empty): keep what follows the last text token
        first = 1 + max((i for i, (s, e) in enumerate(offsets) if s < e), default=-1)
    return row["input_ids"][first:], offsets[first:]


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


def _check_offsets(row, b: int) -> None:
    """Detect offsets that are zero-width for every ordinary token (tokenizers < 0.20.1 did this for Llama-3
    tokenizer files)."""
    widths = [e - s for (s, e), special in zip(row["offsets"], row["special"]) if not special]
    if widths and not any(widths):
        raise ValueError(
            f"rm_tokenizer returned zero-width offsets for every token of row {b}, so its tokens cannot be located "
            "in the text. This is a known tokenizers bug with Llama-3 tokenizer files (BPE with ignore_merges; "
            "huggingface/tokenizers#1553, fixed in tokenizers 0.20.1): upgrade tokenizers")


def score_and_densify_text(reward_model, rm_tokenizer, prompts, response_ids, *, policy_tokenizer,
                           response_mask=None, beta: float = 0.8, layer: int = -1, max_length: int | None = None):
    """ABC from a reward model with its own tokenizer and chat template, as rewards on the policy's response tokens.

    For each row: the policy's response tokens (``response_mask``) are decoded with
    ``policy_tokenizer.decode(..., skip_special_tokens=True)``, as verl and OpenRLHF do; the reward model's
    input is ``prompt + response`` for a plain-text prompt (tokenised with the tokenizer's special tokens) or,
    for a chat prompt, ``rm_tokenizer.apply_chat_template(messages + [{"role": "assistant", "content":
    response}], tokenize=False)`` (tokenised without adding special tokens, as transformers does for chat
    text). The reward model runs once on the batch inside :func:`dense_rlhf.capture_reward_attention`; its
    head-averaged attention row from the reward position is restricted to its tokens that overlap the
    response's bytes and projected onto the policy's tokens by :func:`project_credit` (byte spans from the
    fast tokenizers' offsets and :func:`token_byte_spans`), and :func:`dense_rlhf.dense_rewards` turns those
    ``[B, R]`` rows into the rewards.

    Args:
        reward_model: a transformers sequence-classification model (one logit, or two: ``logit[1] - logit[0]``)
            whose attention can be captured (see :func:`dense_rlhf.capture_reward_attention`).
        rm_tokenizer: its fast tokenizer (offsets are needed); ``padding_side`` and ``truncation_side`` are
            honoured; a pad token is needed when the rows differ in length.
        prompts: B plain strings, or B lists of chat messages (dicts with "role" and "content"), one kind.
        response_ids: [B, R] policy token ids of the responses (right-padded, or any layout with a mask).
        policy_tokenizer: the policy's fast tokenizer.
        response_mask: [B, R] bool or 0/1, True on response tokens; default ``response_ids != pad_token_id``
            (pass it when the pad id is also the EOS id and EOS is part of the response).
        beta, layer: as in :func:`dense_rlhf.score_and_densify`.
        max_length: cap on the reward model's input tokens. A longer input is truncated by ``rm_tokenizer``
            (its ``truncation_side``) only if the response and every token after it survive (left truncation
            drops the start of the prompt); otherwise ValueError. None: no truncation.

    Returns:
        ``(scores, rewards)``: float32 [B] reward-model scores and float32 [B, R] rewards aligned with
        ``response_ids``, on its device: zero off the mask, each row summing to its score, ``(1 - beta) * score``
        on the last response token plus ``beta * score`` spread by the projected attention.

    What the credit of a token means here: a reward-model token's attention is split over the policy tokens
    whose bytes it overlaps, in proportion to the overlap. Policy tokens with no text (special tokens such as
    EOS, skipped in the decode) and whitespace that the chat template trims get no attention credit; a
    reward-model token that straddles the start of the response (plain-text prompts can merge across it)
    contributes only its response bytes' share. ``dense_rewards`` normalises what reaches the response tokens,
    so no reward mass is lost either way; if none reaches them the dense part falls on the last token.

    Raises:
        TypeError: slow tokenizers (no offsets), bad argument types.
        ValueError: shape or mask problems, a chat template that changes the response beyond trimming
            whitespace, truncation that would cut the response, zero-width offsets from ``rm_tokenizer`` (a
            known tokenizers bug), a score read at a padding position (mismatched pad ids), and everything
            :func:`dense_rlhf.dense_rewards` rejects.
    """
    from dense_rlhf.capture import _pooled_scores, capture_reward_attention
    from dense_rlhf.ops import dense_rewards

    mask = _check_responses(response_ids, response_mask, policy_tokenizer)
    batch = response_ids.shape[0]
    chat = _check_prompts(prompts, batch)
    rm_backend = _backend(rm_tokenizer, "rm_tokenizer")
    ids_cpu, mask_cpu = response_ids.cpu(), mask.cpu()

    texts, policy_spans, regions, kept = [], [], [], []
    for b in range(batch):
        spans, response = _decode_with_spans(policy_tokenizer, ids_cpu[b][mask_cpu[b]].tolist(), True,
                                             "policy_tokenizer")
        policy_spans.append(spans)
        if chat:
            text, start, end, offset = _render_chat(rm_tokenizer, prompts[b], response)
        else:
            text, start, end, offset = prompts[b] + response, len(prompts[b]), len(prompts[b]) + len(response), 0
        texts.append(text)
        regions.append((start, end))
        kept.append(len(response[:offset].encode()))

    rows = _encode(rm_tokenizer, texts, not chat, max_length, regions)
    for b, row in enumerate(rows):
        _check_offsets(row, b)
    device = next(reward_model.parameters()).device
    input_ids, attention_mask, starts = _pad(rows, rm_tokenizer, device)

    with torch.no_grad():
        inputs = dict(input_ids=input_ids, attention_mask=attention_mask)
        if any(starts) and "position_ids" in inspect.signature(reward_model.forward).parameters:
            # left padding: count positions from each row's first token, as an unpadded row would (absolute
            # position embeddings, e.g. GPT-2, would otherwise see shifted positions)
            inputs["position_ids"] = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        with capture_reward_attention(reward_model, layer=layer) as cap:
            out = reward_model(**inputs)
        scores = _pooled_scores(out.logits if hasattr(out, "logits") else out[0], "score_and_densify_text")
        attention = cap.rows.mean(1).cpu()  # [B, L]: heads averaged
        index = cap.reward_index.cpu()
    at_pad = [b for b in range(batch) if not bool(attention_mask[b, index[b]])]
    if at_pad:
        raise ValueError(
            f"the reward model read its score at a padding position in rows {at_pad[:10]}: its config.pad_token_id "
            f"({getattr(reward_model.config, 'pad_token_id', None)}) differs from rm_tokenizer.pad_token_id "
            f"({getattr(rm_tokenizer, 'pad_token_id', None)}), or the model pools its first position (BERT-style) and "
            "rm_tokenizer pads on the left")

    projected = torch.zeros(response_ids.shape, dtype=torch.float32)
    for b, row in enumerate(rows):
        table = _char_to_byte(texts[b])
        spans = _rm_byte_spans(rm_backend, texts[b], table, row["input_ids"], row["offsets"])
        first, last = int(table[regions[b][0]]), int(table[regions[b][1]])
        overlap = (spans[:, 0] < spans[:, 1]) & (spans[:, 0] < last) & (spans[:, 1] > first)
        positions = overlap.nonzero().flatten()
        credit = attention[b, starts[b] + positions]
        destination = (policy_spans[b] - kept[b] + first).clamp(first, last)  # in the reward model's text
        projected[b, mask_cpu[b]] = project_credit(credit, spans[positions], destination)
    projected = projected.to(response_ids.device)
    rewards = dense_rewards(projected, scores.to(response_ids.device), mask, beta=beta)
    return scores.to(response_ids.device), rewards
