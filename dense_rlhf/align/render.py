"""The reward model's input for each (prompt, decoded response): rendered, the response located in it, tokenised
with offsets, and the response's text kept from becoming control tokens (:func:`render_and_tokenize`)."""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from dense_rlhf.align.spans import _SLOW_TOKENIZER_FIX, _backend
from dense_rlhf.align.text_only import _TextOnlyTokenizer

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["render_and_tokenize", "RewardModelInputs", "Prompts"]

Prompts = Sequence[str] | Sequence[Sequence[Mapping[str, Any]]]
"""B plain-text prompts, or B chat conversations (lists of messages: dicts with "role" and "content"); one kind."""

_PLACEHOLDER = "\ue000dense-rlhf-response\ue001"  # private-use characters: no template alters them


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
            raise TypeError(
                f"prompts[{b}] must be a string or a list of messages (dicts with 'role' and 'content'), "
                f"got {type(prompt).__name__}"
            )
    if len(kinds) > 1:
        raise TypeError("prompts mixes plain strings and chat message lists; use one kind per batch")
    for b, prompt in enumerate(prompts):
        texts = [prompt] if isinstance(prompt, str) else [v for m in prompt for v in m.values() if isinstance(v, str)]
        for text in texts:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as error:
                raise ValueError(
                    f"prompts[{b}] holds text that is not valid Unicode ({error.reason}: {text[error.start]!r} at "
                    f"character {error.start}), which no tokenizer can encode"
                ) from None
    return kinds == {"chat"}


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


def render_and_tokenize(
    rm_tokenizer: PreTrainedTokenizerBase,
    prompts: Prompts,
    responses: list[str],
    *,
    max_length: int | None = None,
    strict: bool = True,
    mapping: bool = True,
) -> RewardModelInputs:
    """The reward model's input for each (prompt, decoded response), as :func:`score_and_densify_text` builds it:
    rendered (``prompt + response``, or the chat template with the response as the assistant turn), located, and
    tokenised with offsets, the response's text never becoming control tokens.

    Control tokens are ``rm_tokenizer``'s special tokens and the added tokens its chat template writes, found in its
    source and in what it renders around the contents of probe conversations (markers built by concatenation
    included). The
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
        raise ValueError(
            "prompts are chat messages but rm_tokenizer has no chat_template; set one or pass plain-text prompts"
        )
    controls = _control_tokens(rm_tokenizer, backend, prompts if chat else None)
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
                inputs.fail(
                    b,
                    f"the response spells the reward model's control tokens {spelled[:5]} and the chat "
                    "template's rendering of it cannot be located, so they cannot be kept as text",
                )
    _encode(inputs, rm_tokenizer, backend, controls, max_length)
    return inputs


def _control_tokens(rm_tokenizer, backend, prompts=None) -> dict[str, tuple[int, object]]:
    """content -> (id, AddedToken) of the control tokens: the special added tokens, and the other added tokens that
    the chat template writes: those its source contains literally (as transformers' ``sanitize_control_tokens``
    infers them) and those in its renderings outside the contents (:func:`_template_writes`: a template may build a
    marker by concatenation, ``'<|' + m['role'] + '|>'``). Whitespace tokens are excepted, which templates write as
    ordinary text."""
    template = getattr(rm_tokenizer, "chat_template", None)
    sources = list(template.values()) if isinstance(template, Mapping) else [template] if template else []
    added = backend.get_added_tokens_decoder().items()
    if template and any(not t.special and not t.content.isspace() for _, t in added):
        sources.append(_template_writes(rm_tokenizer, prompts))
    out = {}
    unknown = getattr(rm_tokenizer, "unk_token", None)  # what the model makes of unknown text: no control token
    for token_id, token in added:
        if token.content == unknown:
            continue
        if token.special or (not token.content.isspace() and any(token.content in s for s in sources)):
            out[token.content] = (token_id, token)
    return out


_PROBE_ROLES = (("system", "user", "assistant"), ("user", "assistant"), ("user", "assistant", "user", "assistant"))
_SENTINEL = "\ue000"  # a private-use character: the contents of the probe conversations


def _template_writes(rm_tokenizer, prompts=None) -> str:
    """What the chat template writes around the contents: its renderings, with and without the generation prompt, of
    probe conversations whose every content is a sentinel character (the roles of ``_PROBE_ROLES`` and those of the
    chat ``prompts`` followed by the assistant's turn), joined. Renderings the template refuses are left out."""
    sequences = set(_PROBE_ROLES)
    for messages in prompts if isinstance(prompts, list) else ():
        if isinstance(messages, list):
            sequences.add(tuple(m.get("role") for m in messages if isinstance(m, Mapping)) + ("assistant",))
    renderings = []
    for roles in sorted(sequences, key=str):
        conversation = [{"role": role, "content": _SENTINEL} for role in roles]
        for generation in (False, True):
            try:
                renderings.append(
                    rm_tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=generation)
                )
            except Exception:  # a template may refuse a role order; the others still tell
                continue
    return _SENTINEL.join(r for r in renderings if isinstance(r, str))


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
        return (
            text,
            None,
            None,
            (
                "rm_tokenizer's chat template does not render the assistant message's content "
                f"verbatim exactly once (found it {frame.count(_PLACEHOLDER)} times); cannot "
                "locate the response"
            ),
        )
    head, tail = frame.split(_PLACEHOLDER)
    if not (text.startswith(head) and text.endswith(tail) and len(text) >= len(head) + len(tail)):
        return (
            text,
            None,
            None,
            (
                "rm_tokenizer's chat template renders the conversation differently depending on "
                "the response's content; cannot locate the response in the reward model's input"
            ),
        )
    region = (len(head), len(text) - len(tail))
    middle = text[region[0] : region[1]]
    offset = response.find(middle) if middle else len(response) - len(response.lstrip())
    if offset < 0 or response[:offset].strip() or response[offset + len(middle) :].strip():
        return (
            text,
            region,
            None,
            (
                "rm_tokenizer's chat template changes the response beyond trimming whitespace "
                f"({response[:40]!r} rendered as {middle[:40]!r}); cannot map its bytes"
            ),
        )
    return text, region, offset, None


def _encode(inputs: RewardModelInputs, rm_tokenizer, backend, controls, max_length) -> None:
    """Tokenise every row that has not failed into ``inputs.rows``, with no padding; rows whose response spells
    control tokens through ``_TextOnlyTokenizer``; rows longer than ``max_length`` truncated by the tokenizer (its
    ``truncation_side``) only if that leaves the response and everything after it intact."""
    todo = [b for b in range(len(inputs.texts)) if b not in inputs.failed]
    if not todo:
        return
    options = dict(
        add_special_tokens=inputs.add_special_tokens,
        return_offsets_mapping=True,
        return_special_tokens_mask=True,
        return_attention_mask=False,
    )
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
    text_only = (
        _TextOnlyTokenizer.of(rm_tokenizer, backend, controls, [inputs.texts[b] for b in forged]) if forged else None
    )
    for b, frame in forged.items():
        inputs.rows[b] = text_only.encode(inputs.texts[b], frame, inputs.add_special_tokens)
        _check_no_control_inside(inputs, b, by_id)
    if max_length is None:
        return
    side = getattr(rm_tokenizer, "truncation_side", "right")
    long = [b for b in todo if len(inputs.rows[b]["input_ids"]) > max_length]
    plain = [b for b in long if b not in forged]
    cut = (
        _call_tokenizer(
            rm_tokenizer, [inputs.texts[b] for b in plain], dict(options, truncation=True, max_length=max_length)
        )
        if plain
        else []
    )
    cut = dict(zip(plain, cut))
    for b in long:
        new = (
            cut[b]
            if b in cut
            else text_only.encode(
                inputs.texts[b], forged[b], inputs.add_special_tokens, max_length=max_length, side=side
            )
        )
        start = inputs.regions[b][0] if inputs.regions[b] is not None else 0
        if _from_response(inputs.rows[b], start) != _from_response(new, start):
            inputs.fail(
                b,
                f"max_length={max_length} would cut the response, or the tokens after it (the row needs "
                f"{len(inputs.rows[b]['input_ids'])} tokens), and the reward model would score a "
                "different text. Raise max_length, shorten the prompts, or set rm_tokenizer.truncation_side"
                " = 'left' so that the prompt is cut instead",
            )
            continue
        inputs.rows[b] = new


def _check_no_control_inside(inputs: RewardModelInputs, b: int, by_id: dict) -> None:
    """The last line of defence: no control token inside the response after tokenising it as text."""
    row, (start, end) = inputs.rows[b], inputs.regions[b]
    inside = {
        by_id[i].content for i, (s, e) in zip(row["input_ids"], row["offsets"]) if i in by_id and s < end and e > start
    }
    if inside:
        inputs.fail(
            b,
            f"rm_tokenizer makes the control tokens {sorted(inside)[:5]} from the response's text even when "
            "it reads control tokens as text, so the response would forge them",
        )


def _call_tokenizer(rm_tokenizer, texts: list[str], options: dict) -> list[dict]:
    try:
        encoded = rm_tokenizer(texts, **options)
    except NotImplementedError as error:
        raise TypeError(f"rm_tokenizer gives no offsets: {_SLOW_TOKENIZER_FIX}") from error
    return [
        dict(
            input_ids=encoded["input_ids"][k],
            offsets=[tuple(o) for o in encoded["offset_mapping"][k]],
            special=encoded["special_tokens_mask"][k],
        )
        for k in range(len(texts))
    ]


def _from_response(row, char_start: int):
    """The tokens from the first one that reaches into or past the response's start, to the end: what truncation
    must keep."""
    offsets = row["offsets"]
    first = next((i for i, (s, e) in enumerate(offsets) if s < e and e > char_start), None)
    if first is None:  # nothing reaches the response (it is empty): keep what follows the last text token
        first = 1 + max((i for i, (s, e) in enumerate(offsets) if s < e), default=-1)
    return list(row["input_ids"][first:]), [tuple(o) for o in offsets[first:]]


def _check_offsets(inputs: RewardModelInputs) -> None:
    """Rows whose offsets are zero-width for every ordinary token (tokenizers < 0.20.1 did this for Llama-3
    tokenizer files) cannot be mapped."""
    for b, row in enumerate(inputs.rows):
        if row is None or not inputs.mappable(b):
            continue
        widths = [e - s for (s, e), special in zip(row["offsets"], row["special"]) if not special]
        if widths and not any(widths):
            inputs.unmap(
                b,
                "rm_tokenizer returned zero-width offsets for every token, so its tokens cannot be "
                "located in the text. This is a known tokenizers bug with Llama-3 tokenizer files (BPE "
                "with ignore_merges; huggingface/tokenizers#1553, fixed in tokenizers 0.20.1): upgrade "
                "tokenizers",
            )
