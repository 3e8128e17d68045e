"""The tokenizers' decoders replayed with provenance: which input token produced each byte of the decoded text.

A decoder of the ``tokenizers`` library is a chain of steps (``ByteLevel``, ``Metaspace``, ``WordPiece``, ...).
Each step is replayed here on :class:`_Unit` strings that carry, per UTF-8 byte, the index of the token it came
from; :data:`DECODERS` maps each supported step type to its replay.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Callable

_REPLACEMENT = "\ufffd".encode()
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")
# transformers' clean_up_tokenization and the WordPiece decoder's cleanup, in their order
_HF_CLEANUP = [
    (" .", "."),
    (" ?", "?"),
    (" !", "!"),
    (" ,", ","),
    (" ' ", "'"),
    (" n't", "n't"),
    (" 'm", "'m"),
    (" 's", "'s"),
    (" 've", "'ve"),
    (" 're", "'re"),
]
_WORDPIECE_CLEANUP = _HF_CLEANUP[:7] + [(" do not", " don't")] + _HF_CLEANUP[7:]


def _byte_level_table() -> dict[str, int]:
    """The byte-level BPE alphabet (GPT-2's ``bytes_to_unicode``), as character -> byte."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
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
    def of(cls, text: str, owner: int) -> _Unit:
        data = text.encode()
        return cls(data, [owner] * len(data), owner)

    def text(self) -> str:
        return self.data.decode()

    def edit(self, edits: list[tuple[int, int, bytes]]) -> _Unit:
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
            own += owners[start : start + head] + [middle] * (len(new) - head - tail) + owners[end - tail : end]
            pos = end
        out += data[pos:]
        own += owners[pos:]
        return _Unit(bytes(out), own, self.owner)

    def replace(self, pattern: re.Pattern | str, content: str) -> _Unit:
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


def _backend_steps(backend) -> list[dict]:
    """The steps of a ``tokenizers.Tokenizer``'s decoder, sequences flattened (none without a decoder)."""
    decoder = backend.decoder
    return _decoder_steps(json.loads(decoder.__getstate__()) if decoder is not None else None)


def _decoder_steps(config: dict | None) -> list[dict]:
    if config is None:
        return []
    if config.get("type") == "Sequence":
        return [step for child in config["decoders"] for step in _decoder_steps(child)]
    return [config]


def _fuse(step: dict, units: list[_Unit]) -> list[_Unit]:
    return [_join(units)]


def _strip(step: dict, units: list[_Unit]) -> list[_Unit]:
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
    return out


def _byte_level(step: dict, units: list[_Unit]) -> list[_Unit]:
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
    return [_lossy(_join(raw))]


def _metaspace(step: dict, units: list[_Unit]) -> list[_Unit]:
    scheme = step.get("prepend_scheme") or ("always" if step.get("add_prefix_space", True) else "never")
    pattern = step.get("replacement", "▁")
    return [u.replace(pattern, "" if i == 0 and scheme != "never" else " ") for i, u in enumerate(units)]


def _wordpiece(step: dict, units: list[_Unit]) -> list[_Unit]:
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
    return out


def _replace(step: dict, units: list[_Unit]) -> list[_Unit]:
    pattern = step["pattern"]
    regex = pattern["String"] if "String" in pattern else re.compile(pattern["Regex"])
    return [u.replace(regex, step["content"]) for u in units]


def _bpe_decoder(step: dict, units: list[_Unit]) -> list[_Unit]:
    suffix = step.get("suffix", "</w>")
    return [u.replace(suffix, "" if i == len(units) - 1 else " ") for i, u in enumerate(units)]


def _byte_fallback(step: dict, units: list[_Unit]) -> list[_Unit]:
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
    return out


# tokenizers' decoder type -> its replay on units with provenance
DECODERS: dict[str, Callable[[dict, list[_Unit]], list[_Unit]]] = {
    "ByteLevel": _byte_level,
    "Metaspace": _metaspace,
    "WordPiece": _wordpiece,
    "BPEDecoder": _bpe_decoder,
    "ByteFallback": _byte_fallback,
    "Replace": _replace,
    "Strip": _strip,
    "Fuse": _fuse,
}
_FUSING = ("ByteLevel", "Fuse")  # they leave one fused string
_ON_FUSED = ("Strip", "Fuse")  # the steps that can follow one: edits at its ends, or nothing to fuse


def _apply_decoder(step: dict, units: list[_Unit], fused: bool) -> tuple[list[_Unit], bool]:
    """One step of a tokenizers decoder (``decode_chain``) on the units, with provenance. After ``ByteLevel`` or
    ``Fuse`` there is one fused string; only edits at its ends (``Strip``) are then supported."""
    kind = step.get("type")
    if fused and kind not in _ON_FUSED:
        raise NotImplementedError(f"a {kind} decoder after ByteLevel or Fuse")
    decoder = DECODERS.get(kind)
    if decoder is None:
        raise NotImplementedError(f"the {kind} decoder")
    return decoder(step, units), fused or kind in _FUSING


def _char_offsets(text: str) -> list[int]:
    """The UTF-8 byte offset of every character boundary of a short string, as a list."""
    if text.isascii():
        return list(range(len(text) + 1))
    return [0] + list(itertools.accumulate(len(c.encode()) for c in text))
