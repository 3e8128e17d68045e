"""Tokenising the policy's text so that it never becomes the reward model's control tokens: a copy of the
reward model's tokenizer that reads control tokens as ordinary text (:class:`_TextOnlyTokenizer`)."""

from __future__ import annotations

import bisect
import json
import threading
import weakref


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

    _cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
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
        copy.add_tokens(
            [
                AddedToken(
                    char,
                    single_word=token.single_word,
                    lstrip=token.lstrip,
                    rstrip=token.rstrip,
                    normalized=token.normalized,
                    special=False,
                )
                for (_, token), char in zip(controls.values(), stand_ins)
            ]
        )
        for token_id, token in backend.get_added_tokens_decoder().items():  # ids the copy gave other added tokens
            copy_id = copy.token_to_id(token.content)
            if copy_id is not None and copy_id != token_id:
                self.original[copy_id] = token_id
        for (token_id, _token), char in zip(controls.values(), stand_ins):
            self.stand_in[token_id] = char
            self.original[copy.token_to_id(char)] = token_id
        self.copy = copy
        self.lock = threading.Lock()  # truncation is a setting of the copy

    @classmethod
    def of(cls, rm_tokenizer, backend, controls, texts: list[str]) -> _TextOnlyTokenizer:
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

    def encode(
        self,
        text: str,
        frame: list[tuple[int, int, int]],
        add_special_tokens: bool,
        *,
        max_length: int | None = None,
        side: str = "right",
    ) -> dict:
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
