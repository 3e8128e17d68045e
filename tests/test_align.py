"""Tests of dense_rlhf.align: byte spans of tokens, credit projection, and ABC through a reward model with its own
tokenizer and chat template. Every tokenizer is built here with the ``tokenizers`` library (byte-level BPE as in
GPT-2/Llama-3/Qwen, SentencePiece-style BPE with byte fallback as in Llama-2/Mistral, Metaspace Unigram as in T5,
WordPiece as in BERT, and the study's word-level one); every reward model is small and random-initialised."""

from __future__ import annotations

import json
import random

import pytest
import torch

transformers = pytest.importorskip("transformers")
hypothesis = pytest.importorskip("hypothesis")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers  # noqa: E402
from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2ForSequenceClassification,
    LlamaConfig,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
)

import dense_rlhf  # noqa: E402
from dense_rlhf import score_and_densify, score_and_densify_text  # noqa: E402
from dense_rlhf.align import project_credit, token_byte_spans  # noqa: E402

TOL = dict(atol=1e-5, rtol=0)
EXACT_TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
TRIM_TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] | trim }}<|end|>\n{% endfor %}"
PAD_TEMPLATE = "{% for m in messages %}[{{ m['role'] }}]\n\n{{ m['content'] }}\n\n{% endfor %}"
CHAT_SPECIALS = ["<|pad|>", "<|endoftext|>", "<|user|>", "<|assistant|>", "<|end|>"]
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------- tokenizers


def corpus(seed: int = 0, n: int = 400, emoji: bool = True) -> list[str]:
    """Generated text: English words, accented words, CJK, emoji, punctuation, contractions and newlines."""
    rng = random.Random(seed)
    words = (
        "the a movie plot was very good bad and but not it is don't it's i think acting really great "
        "awful story music ending"
    ).split()
    accented = "café naïve über façade jalapeño crème brûlée señor déjà vu".split()
    cjk = ["你好", "世界", "今天", "天气", "很好", "电影", "好看"]
    pictographs = ["🙂", "🚀", "👍🏽", "🎬"] if emoji else []
    pools = [words] * 6 + [accented, cjk] + ([pictographs] if emoji else [])
    out = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(3, 12)):
            parts.append(rng.choice(rng.choice(pools)))
            if rng.random() < 0.15:
                parts.append(rng.choice([",", ".", "!", "?", "\n"]))
        out.append(" ".join(parts))
    return out


def _fast(core, **special) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=core, **special)


def byte_bpe(template: str = EXACT_TEMPLATE) -> PreTrainedTokenizerFast:
    """GPT-2 / Llama-3 / Qwen style: byte-level BPE, ``Ġ`` for a leading space, a chat template."""
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(
        corpus(),
        trainers.BpeTrainer(
            vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=CHAT_SPECIALS
        ),
    )
    tok = _fast(core, pad_token="<|pad|>", eos_token="<|endoftext|>")
    tok.chat_template = template
    return tok


def sp_bpe(template: str = TRIM_TEMPLATE) -> PreTrainedTokenizerFast:
    """Llama-2 / Mistral style: ``▁`` for spaces, BPE with byte fallback (``<0xF0>`` tokens for characters outside
    the vocabulary: the emoji here), a decoder that strips the first space, and a trimming chat template."""
    base = Tokenizer(models.BPE(unk_token="<unk>"))
    base.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    base.train_from_iterator(
        corpus(1, emoji=False),
        trainers.BpeTrainer(vocab_size=500, special_tokens=["<unk>", "<s>", "</s>", "<pad>"] + CHAT_SPECIALS[2:]),
    )
    state = json.loads(base.to_str())
    vocab = state["model"]["vocab"]
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    state["model"]["byte_fallback"] = True
    state["model"]["fuse_unk"] = True
    core = Tokenizer.from_str(json.dumps(state))
    core.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    core.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", core.token_to_id("<s>"))]
    )
    tok = _fast(core, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tok.chat_template = template
    return tok


def sp_unigram() -> PreTrainedTokenizerFast:
    """T5 style: Unigram with the Metaspace pre-tokenizer and decoder, ``</s>`` appended."""
    core = Tokenizer(models.Unigram())
    core.pre_tokenizer = pre_tokenizers.Metaspace()
    core.decoder = decoders.Metaspace()
    core.train_from_iterator(
        corpus(2), trainers.UnigramTrainer(vocab_size=300, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>")
    )
    core.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", core.token_to_id("</s>"))]
    )
    return _fast(core, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def wordpiece() -> PreTrainedTokenizerFast:
    """BERT style: lower-casing and accent-stripping normaliser, WordPiece with ``##`` continuations,
    ``[CLS] ... [SEP]``, and transformers' clean_up_tokenization_spaces on."""
    core = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    core.normalizer = normalizers.BertNormalizer(lowercase=True)
    core.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    core.decoder = decoders.WordPiece()
    core.train_from_iterator(
        corpus(3), trainers.WordPieceTrainer(vocab_size=300, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]"])
    )
    core.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        special_tokens=[("[CLS]", core.token_to_id("[CLS]")), ("[SEP]", core.token_to_id("[SEP]"))],
    )
    return _fast(
        core,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        clean_up_tokenization_spaces=True,
    )


def word_level() -> PreTrainedTokenizerFast:
    """The study's word-level tokenizer with ``[BOS] $A [EOS]`` added: it cannot merge across a word boundary."""
    from dense_rlhf.study.sentiment_task import build_tokenizer

    tok = build_tokenizer()
    core = tok.backend_tokenizer
    core.post_processor = processors.TemplateProcessing(
        single="[BOS] $A [EOS]", special_tokens=[("[BOS]", tok.bos_token_id), ("[EOS]", tok.eos_token_id)]
    )
    return tok


_built: dict = {}


def tokenizer(name: str, **kwargs):
    key = (name, tuple(sorted(kwargs.items())))
    if key not in _built:
        _built[key] = {
            "byte_bpe": byte_bpe,
            "sp_bpe": sp_bpe,
            "sp_unigram": sp_unigram,
            "wordpiece": wordpiece,
            "word_level": word_level,
        }[name](**kwargs)
    return _built[key]


FAMILIES = ["byte_bpe", "sp_bpe", "sp_unigram", "wordpiece", "word_level"]

# ----------------------------------------------------------------------------------------- reference helpers


def _gpt2_bytes_to_unicode() -> dict[str, int]:
    """GPT-2's published byte <-> unicode table, written out here independently of dense_rlhf.align."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


GPT2_CHARS = _gpt2_bytes_to_unicode()


def own_bytes(tok, token_id: int) -> bytes:
    """A byte-level BPE token's bytes, from its characters (special tokens: their text)."""
    token = tok.convert_ids_to_tokens(token_id)
    if all(c in GPT2_CHARS for c in token):
        return bytes(GPT2_CHARS[c] for c in token)
    return token.encode()


def special_ids(tok) -> set[int]:
    """The ids a decode with skip_special_tokens=True drops: the backend's special added tokens."""
    return {i for i, t in tok.backend_tokenizer.get_added_tokens_decoder().items() if t.special}


def byte_level_spans(tok, ids, skip_special_tokens=False) -> list[tuple[int, int]]:
    """Reference spans for byte-level BPE: the tokens' own bytes laid end to end."""
    spans, pos, special = [], 0, special_ids(tok)
    for token_id in ids:
        data = b"" if skip_special_tokens and token_id in special else own_bytes(tok, token_id)
        spans.append((pos, pos + len(data)))
        pos += len(data)
    return spans


def prefix_spans(tok, ids, skip_special_tokens=False) -> list[tuple[int, int]]:
    """Reference spans from decodes of growing prefixes (valid where each prefix decodes to a prefix of the
    whole, e.g. no partial characters)."""
    ends = [len(tok.decode(ids[:k], skip_special_tokens=skip_special_tokens).encode()) for k in range(len(ids) + 1)]
    return list(zip(ends[:-1], ends[1:]))


def naive_projection(credit, src, dst) -> list[float]:
    """The issue's formula as a plain loop over span pairs."""
    out = []
    for ds, de in dst:
        total = 0.0
        for c, (ss, se) in zip(credit, src):
            if se > ss:
                total += c * max(0, min(se, de) - max(ss, ds)) / (se - ss)
        out.append(total)
    return out


def assert_tiles(spans: torch.Tensor, n_bytes: int) -> None:
    assert spans.dtype == torch.long and spans.dim() == 2 and spans.shape[1] == 2
    if spans.shape[0] == 0:
        assert n_bytes == 0
        return
    assert int(spans[0, 0]) == 0 and int(spans[-1, 1]) == n_bytes
    assert bool((spans[:, 1] >= spans[:, 0]).all())
    assert torch.equal(spans[1:, 0], spans[:-1, 1])


# ----------------------------------------------------------------------------------------- token_byte_spans


TEXTS = [
    "the movie was very good",
    "café naïve über, crème brûlée!",
    "你好世界 今天天气很好",
    "🙂 great 👍🏽 movie 🎬🚀",
    "  two  spaces\nand a newline \t tab",
    "don't it's i think , . ! ?",
]


@pytest.mark.parametrize("family", FAMILIES[:4])
@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("skip", [False, True])
def test_spans_tile_the_decoded_bytes(family, text, skip):
    tok = tokenizer(family)
    ids = tok(text)["input_ids"]  # with the family's special tokens around it
    spans = token_byte_spans(tok, ids, skip_special_tokens=skip)
    decoded = tok.decode(ids, skip_special_tokens=skip).encode()
    assert spans.shape == (len(ids), 2)
    assert_tiles(spans, len(decoded))
    if family == "byte_bpe":
        assert spans.tolist() == [list(s) for s in byte_level_spans(tok, ids, skip)]
    elif not (family == "sp_bpe" and "🙂" in text or family == "wordpiece" and "'" in text):
        # (byte-fallback emoji make some prefixes end mid-character; the cleanup of " ' " spans three tokens)
        assert spans.tolist() == [list(s) for s in prefix_spans(tok, ids, skip)]


def test_multibyte_characters_split_across_byte_level_tokens():
    tok = tokenizer("byte_bpe")
    text = "👍🏽 é 你"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    spans = token_byte_spans(tok, ids)
    data = text.encode()
    pieces = [data[s:e] for s, e in spans.tolist()]
    assert b"".join(pieces) == data
    assert pieces == [own_bytes(tok, i) for i in ids]
    partial = [p for p in pieces if p and not _valid_utf8(p)]
    assert partial, "expected at least one token holding part of a character"
    # decoding such a token alone gives U+FFFD: the spans never come from per-token decodes
    lone = next(i for i, p in zip(ids, pieces) if p and not _valid_utf8(p))
    assert "\ufffd" in tok.decode([lone])


def _valid_utf8(data: bytes) -> bool:
    try:
        data.decode()
        return True
    except UnicodeDecodeError:
        return False


def test_partial_character_at_the_end_decodes_to_replacement_and_still_tiles():
    tok = tokenizer("byte_bpe")
    to_char = {b: c for c, b in GPT2_CHARS.items()}
    rocket = [tok.convert_tokens_to_ids(to_char[b]) for b in "🚀".encode()]  # one token per byte
    cut = tok("ok", add_special_tokens=False)["input_ids"] + rocket[:-1]  # the last byte is missing
    decoded = tok.decode(cut)
    assert decoded.endswith("\ufffd")
    spans = token_byte_spans(tok, cut)
    assert_tiles(spans, len(decoded.encode()))


def test_byte_fallback_tokens_get_one_byte_each():
    tok = tokenizer("sp_bpe")
    ids = tok("good 🙂", add_special_tokens=False)["input_ids"]
    tokens = tok.convert_ids_to_tokens(ids)
    assert tokens[-4:] == ["<0xF0>", "<0x9F>", "<0x99>", "<0x82>"]
    spans = token_byte_spans(tok, ids)
    assert [e - s for s, e in spans.tolist()[-4:]] == [1, 1, 1, 1]
    assert tok.decode(ids).encode()[int(spans[-4, 0]) :] == "🙂".encode()


def test_leading_space_conventions():
    bpe = tokenizer("byte_bpe")
    ids = bpe(" movie was", add_special_tokens=False)["input_ids"]
    tokens = bpe.convert_ids_to_tokens(ids)
    assert tokens[0].startswith("Ġ")
    spans = token_byte_spans(bpe, ids)
    assert bpe.decode(ids).encode()[slice(*spans[0].tolist())].startswith(b" ")  # Ġ is the token's own space
    for name in ("sp_bpe", "sp_unigram"):
        tok = tokenizer(name)
        ids = tok("movie was", add_special_tokens=False)["input_ids"]
        assert tok.convert_ids_to_tokens(ids)[0].startswith("▁")
        spans = token_byte_spans(tok, ids).tolist()
        text = tok.decode(ids).encode()
        assert text == b"movie was"
        pieces = [p.replace("▁", " ") for p in tok.convert_ids_to_tokens(ids)]
        pieces[0] = pieces[0][1:]  # the first token's leading ▁ is dropped by the decoder; every other is a space
        assert [text[s:e].decode() for s, e in spans] == pieces


def test_special_tokens_skipped_get_empty_spans():
    tok = tokenizer("byte_bpe")
    ids = tok("good<|endoftext|>bad<|end|>", add_special_tokens=False)["input_ids"]
    special = [i for i, t in enumerate(ids) if t in special_ids(tok)]
    assert len(special) == 2
    kept = token_byte_spans(tok, ids)
    skipped = token_byte_spans(tok, ids, skip_special_tokens=True)
    assert_tiles(skipped, len(tok.decode(ids, skip_special_tokens=True).encode()))
    for i in special:
        assert int(kept[i, 1] - kept[i, 0]) == len(tok.convert_ids_to_tokens(ids[i]))
        assert int(skipped[i, 1]) == int(skipped[i, 0])


def test_wordpiece_continuations_and_cleanup():
    tok = tokenizer("wordpiece")
    ids = tok("unbelievably good , isn't it ?", add_special_tokens=False)["input_ids"]
    tokens = tok.convert_ids_to_tokens(ids)
    assert any(t.startswith("##") for t in tokens)
    text = tok.decode(ids)
    assert " ," not in text and " ?" not in text  # transformers' cleanup removed spaces
    spans = token_byte_spans(tok, ids)
    assert_tiles(spans, len(text.encode()))
    for t, (s, e) in zip(tokens, spans.tolist()):
        piece = text.encode()[s:e].decode()
        assert piece.strip() == t.removeprefix("##")


def test_transformers_skips_its_cleanup_for_bpe_and_so_do_the_spans():
    tok = byte_bpe()
    tok.clean_up_tokenization_spaces = True  # Llama-3's setting; transformers ignores it for BPE models
    ids = tok("good , isn't it ?", add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == "good , isn't it ?"
    assert token_byte_spans(tok, ids).tolist() == [list(s) for s in byte_level_spans(tok, ids)]


def test_regex_replace_and_bpe_suffix_decoders():
    vocab = {"[UNK]": 0, "lo": 1, "w</w>": 2, "er</w>": 3, "x__y": 4}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.decoder = decoders.Sequence([decoders.Replace(tokenizers_regex("_+"), "-"), decoders.BPEDecoder("</w>")])
    tok = _fast(core, unk_token="[UNK]")
    ids = [1, 2, 4, 1, 3]
    text = tok.decode(ids)
    assert text == "low x-yloer"
    spans = token_byte_spans(tok, ids)
    assert [text.encode()[s:e].decode() for s, e in spans.tolist()] == ["lo", "w ", "x-y", "lo", "er"]


def tokenizers_regex(pattern: str):
    from tokenizers import Regex

    return Regex(pattern)


def test_no_decoder_joins_with_spaces():
    tok = tokenizer("word_level")
    ids = tok("the plot was good", add_special_tokens=False)["input_ids"]
    spans = token_byte_spans(tok, ids)
    assert spans.tolist() == [[0, 3], [3, 8], [8, 12], [12, 17]]


def test_token_byte_spans_accepts_a_raw_tokenizers_object_and_tensors():
    tok = tokenizer("byte_bpe")
    ids = tok("naïve 🙂", add_special_tokens=False)["input_ids"]
    expected = token_byte_spans(tok, ids)
    assert torch.equal(token_byte_spans(tok.backend_tokenizer, torch.tensor(ids)), expected)


def test_unknown_ids_get_empty_spans():
    tok = tokenizer("byte_bpe")
    ids = tok("good", add_special_tokens=False)["input_ids"]
    spans = token_byte_spans(tok, ids + [10**6])
    assert spans[-1].tolist() == [len(b"good")] * 2


def test_slow_tokenizer_is_refused_with_the_fix():
    from transformers import ByT5Tokenizer

    slow = ByT5Tokenizer()
    with pytest.raises(TypeError, match="convert_slow_tokenizer"):
        token_byte_spans(slow, [5, 6, 7])


def test_unsupported_decoder_is_refused():
    core = Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    core.decoder = decoders.CTC()
    with pytest.raises(ValueError, match="CTC"):
        token_byte_spans(_fast(core, unk_token="[UNK]"), [0, 1, 1])


def test_bad_ids():
    tok = tokenizer("byte_bpe")
    with pytest.raises(TypeError, match="ids"):
        token_byte_spans(tok, torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(TypeError, match="ids"):
        token_byte_spans(tok, [1.5])


TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=40)


@pytest.mark.parametrize("family", FAMILIES[:4])
@settings(max_examples=40, **SETTINGS)
@given(text=TEXT, skip=st.booleans())
def test_property_spans_tile_random_unicode(family, text, skip):
    tok = tokenizer(family)
    ids = tok(text)["input_ids"]
    spans = token_byte_spans(tok, ids, skip_special_tokens=skip)
    assert_tiles(spans, len(tok.decode(ids, skip_special_tokens=skip).encode()))
    if family == "byte_bpe":
        assert spans.tolist() == [list(s) for s in byte_level_spans(tok, ids, skip)]


@settings(max_examples=40, **SETTINGS)
@given(ids=st.lists(st.integers(0, 599), max_size=30))
def test_property_spans_tile_any_byte_level_ids(ids):
    """Arbitrary id sequences (not what the tokenizer would produce): partial characters anywhere, U+FFFD."""
    tok = tokenizer("byte_bpe")
    spans = token_byte_spans(tok, ids)
    assert_tiles(spans, len(tok.decode(ids).encode()))


# ----------------------------------------------------------------------------------------- project_credit


def _tiling(rng: random.Random, n_bytes: int, n: int, empty: float = 0.1) -> list[tuple[int, int]]:
    cuts = sorted(rng.sample(range(1, n_bytes), min(n - 1, n_bytes - 1))) if n_bytes > 1 else []
    bounds = [0] + cuts + [n_bytes]
    spans = list(zip(bounds[:-1], bounds[1:]))
    out = []
    for s in spans:
        out.append(s)
        if rng.random() < empty:
            out.append((s[1], s[1]))  # an empty span (a token with no text)
    return out


@settings(max_examples=100, **SETTINGS)
@given(seed=st.integers(0, 10**6), n_bytes=st.integers(1, 60), n_src=st.integers(1, 20), n_dst=st.integers(1, 20))
def test_property_projection_matches_the_loop_and_conserves_mass(seed, n_bytes, n_src, n_dst):
    rng = random.Random(seed)
    src, dst = _tiling(rng, n_bytes, n_src), _tiling(rng, n_bytes, n_dst)
    credit = torch.tensor([rng.uniform(-2, 2) for _ in src], dtype=torch.float64)
    out = project_credit(credit.float(), src, dst)
    assert out.dtype == torch.float32 and out.shape == (len(dst),)
    torch.testing.assert_close(
        out.double(), torch.tensor(naive_projection(credit.tolist(), src, dst), dtype=torch.float64), **TOL
    )
    carried = sum(c for c, (a, b) in zip(credit.tolist(), src) if b > a)  # empty source spans carry nothing
    torch.testing.assert_close(out.sum().double(), torch.tensor(carried, dtype=torch.float64), **TOL)


@settings(max_examples=100, **SETTINGS)
@given(seed=st.integers(0, 10**6))
def test_property_projection_with_overlapping_and_partial_spans(seed):
    """Source spans may overlap (tokens sharing a character), destination spans may leave gaps: the loop's result."""
    rng = random.Random(seed)
    src = [(a, a + rng.randint(0, 6)) for a in (rng.randint(0, 30) for _ in range(rng.randint(1, 12)))]
    dst = [(a, a + rng.randint(0, 8)) for a in (rng.randint(0, 30) for _ in range(rng.randint(1, 12)))]
    credit = [rng.uniform(0, 1) for _ in src]
    out = project_credit(torch.tensor(credit), torch.tensor(src), torch.tensor(dst))
    torch.testing.assert_close(
        out.double(), torch.tensor(naive_projection(credit, src, dst), dtype=torch.float64), **TOL
    )


def test_projection_cases():
    # a source token split over two destination tokens in proportion to bytes; an empty source carries nothing
    out = project_credit(torch.tensor([1.0, 5.0, 2.0]), [[0, 4], [4, 4], [4, 6]], [[0, 1], [1, 5], [5, 6]])
    torch.testing.assert_close(out, torch.tensor([0.25, 0.75 + 1.0, 1.0]))
    # batched credit shares the spans
    batch = project_credit(torch.tensor([[1.0, 2.0], [3.0, 4.0]]), [[0, 2], [2, 4]], [[0, 4]])
    torch.testing.assert_close(batch, torch.tensor([[3.0], [7.0]]))
    assert project_credit(torch.tensor([1.0]), [[0, 1]], torch.zeros(0, 2, dtype=torch.long)).shape == (0,)
    assert float(project_credit(torch.zeros(0), torch.zeros(0, 2, dtype=torch.long), [[0, 3]])) == 0.0


def test_projection_bad_inputs():
    good = [[0, 1], [1, 2]]
    with pytest.raises(ValueError, match="src_spans"):
        project_credit(torch.ones(2), [[0, 1, 2]], good)
    with pytest.raises(ValueError, match="dst_spans"):
        project_credit(torch.ones(2), good, [[2, 1]])
    with pytest.raises(ValueError, match="dst_spans"):
        project_credit(torch.ones(2), good, [[-1, 1]])
    with pytest.raises(ValueError, match="credit has 3"):
        project_credit(torch.ones(3), good, good)
    with pytest.raises(TypeError, match="credit"):
        project_credit(torch.ones(2, dtype=torch.long), good, good)
    with pytest.raises(TypeError, match="src_spans"):
        project_credit(torch.ones(2), torch.tensor(good, dtype=torch.float32), good)
    with pytest.raises(ValueError, match="NaN"):
        project_credit(torch.tensor([1.0, float("nan")]), good, good)


# ----------------------------------------------------------------------------------------- reward models


def llama_rm(tok):  # grouped-query attention (4 query heads, 2 kv heads), rotary
    return LlamaForSequenceClassification(
        LlamaConfig(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            pad_token_id=tok.pad_token_id,
            num_labels=1,
            max_position_embeddings=512,
        )
    )


def gpt2_rm(tok):
    return GPT2ForSequenceClassification(
        GPT2Config(
            vocab_size=len(tok),
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=512,
            pad_token_id=tok.pad_token_id,
            num_labels=1,
        )
    )


def bert_rm(tok):  # bidirectional: the score is read at [CLS], position 0; two logits
    return BertForSequenceClassification(
        BertConfig(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=512,
            pad_token_id=tok.pad_token_id,
            num_labels=2,
        )
    )


_models: dict = {}


def reward_model(arch: str, tok_name: str):
    key = (arch, tok_name)
    if key not in _models:
        torch.manual_seed(0)
        _models[key] = {"llama": llama_rm, "gpt2": gpt2_rm, "bert": bert_rm}[arch](tokenizer(tok_name)).eval()
    return _models[key]


def policy_batch(tok, responses: list[str], *, eos: bool = False, side: str = "right"):
    """[B, R] policy ids of the responses (optionally followed by EOS), padded with the pad id, and the mask."""
    rows = [tok(r, add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if eos else []) for r in responses]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for b, row in enumerate(rows):
        start = width - len(row) if side == "left" else 0
        ids[b, start : start + len(row)] = torch.tensor(row)
        mask[b, start : start + len(row)] = True
    return ids, mask


def check_rewards(scores, rewards, mask, beta=0.8):
    assert scores.dtype == torch.float32 and rewards.dtype == torch.float32
    assert rewards.shape == mask.shape
    assert float(rewards[~mask].abs().sum()) == 0.0
    torch.testing.assert_close(rewards.sum(1), scores, **TOL)


def reference_text_path(
    rm, rm_tok, texts_and_regions, policy_tok, response_ids, mask, beta, policy_spans_fn, rm_spans_fn, method="abc"
):
    """A plain re-implementation: RM rows (or prefix scores) from a separate capture, byte spans from the reference
    helpers, the projection as a loop and each method's formula written out."""
    batch, width = response_ids.shape
    encoded = [
        rm_tok(text, add_special_tokens=add, return_offsets_mapping=True) for text, _, _, add in texts_and_regions
    ]
    out = torch.zeros(batch, width, dtype=torch.float64)
    scores = []
    for b in range(batch):
        text, start, end, _ = texts_and_regions[b]
        ids = encoded[b]["input_ids"]
        if method == "prefix":
            capture = dense_rlhf.capture_prefix_scores(rm)
        else:
            capture = dense_rlhf.capture_reward_attention(rm)
        with torch.no_grad(), capture as cap:
            logits = rm(input_ids=torch.tensor([ids])).logits
        score = float(logits[0, 0] if logits.shape[-1] == 1 else logits[0, 1] - logits[0, 0])
        scores.append(score)
        row = cap.prefix_scores[0].tolist() if method == "prefix" else cap.rows[0].mean(0).tolist()
        rm_spans = rm_spans_fn(rm_tok, text, ids, encoded[b]["offset_mapping"])
        first, last = len(text[:start].encode()), len(text[:end].encode())
        picked = [
            (row[j], (s - first, e - first)) for j, (s, e) in enumerate(rm_spans) if s < e and s < last and e > first
        ]
        if method == "prefix":  # each response token's change of the score, the first one's own score
            picked = [(c - (picked[k - 1][0] if k else 0.0), span) for k, (c, span) in enumerate(picked)]
        positions = mask[b].nonzero().flatten().tolist()
        pol = policy_spans_fn(policy_tok, response_ids[b, positions].tolist())
        projected = naive_projection([c for c, _ in picked], [s for _, s in picked], pol)
        total = sum(projected)
        last_token = positions[-1]
        if method == "sparse":
            out[b, last_token] = score
        elif method == "uniform":
            out[b, positions] = score / len(positions)
        elif method == "prefix":  # what reached no policy token goes to the last one, so the row sums to the score
            for i, p in zip(positions, projected):
                out[b, i] += beta * p
            out[b, last_token] += beta * (score - total) + (1 - beta) * score
        else:
            for i, p in zip(positions, projected):
                out[b, i] += beta * score * (p / total if total > 0 else float(i == last_token))
            out[b, last_token] += (1 - beta) * score
    return torch.tensor(scores), out.float()


def offsets_to_bytes(tok, text, ids, offsets):
    return [(len(text[:s].encode()), len(text[:e].encode())) for s, e in offsets]


def byte_level_rm_spans(tok, text, ids, offsets):
    return byte_level_spans(tok, ids)


# ----------------------------------------------------------------------------------------- equivalence


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@settings(max_examples=12, **SETTINGS)
@given(data=st.data())
def test_property_same_word_level_tokenizer_equals_score_and_densify(arch, data):
    """Same tokenizer on both sides, one that cannot merge across the prompt/response boundary: the text path is
    ``score_and_densify`` on the token ids."""
    from dense_rlhf.study.sentiment_task import VOCAB

    tok = tokenizer("word_level")
    rm = reward_model(arch, "word_level")
    words = st.sampled_from(VOCAB[4:])
    batch = data.draw(st.integers(1, 3))
    prompts = [data.draw(st.lists(words, min_size=1, max_size=4)) for _ in range(batch)]
    responses = [data.draw(st.lists(words, min_size=1, max_size=8)) for _ in range(batch)]
    beta = data.draw(st.sampled_from([0.0, 0.5, 0.8, 1.0]))
    response_ids, mask = policy_batch(tok, [" ".join(r) for r in responses])
    scores, rewards = score_and_densify_text(
        rm, tok, [" ".join(p) + " " for p in prompts], response_ids, policy_tokenizer=tok, beta=beta
    )

    rows = [tok(" ".join(p + r))["input_ids"] for p, r in zip(prompts, responses)]
    length = max(len(r) for r in rows)
    ids = torch.full((batch, length), tok.pad_token_id)
    attention = torch.zeros(batch, length, dtype=torch.long)
    completion = torch.zeros(batch, length, dtype=torch.bool)
    for b, (row, p, r) in enumerate(zip(rows, prompts, responses)):
        ids[b, : len(row)] = torch.tensor(row)
        attention[b, : len(row)] = 1
        completion[b, 1 + len(p) : 1 + len(p) + len(r)] = True
    ref_scores, ref = score_and_densify(rm, ids, attention, completion, beta=beta)
    torch.testing.assert_close(scores, ref_scores, **TOL)
    expected = torch.zeros_like(rewards)
    for b in range(batch):
        expected[b, mask[b]] = ref[b, completion[b]]
    torch.testing.assert_close(rewards, expected, **TOL)


@settings(max_examples=15, **SETTINGS)
@given(prompt=TEXT, response=TEXT.filter(lambda t: len(t) > 0), beta=st.sampled_from([0.5, 0.8, 1.0]))
def test_property_same_byte_level_tokenizer_through_a_chat_template_equals_score_and_densify(prompt, response, beta):
    """Random Unicode through byte-level BPE and a template whose special tokens fence the response: the RM's
    tokens of the response are the policy's, partial characters included, so the result is the ids path's."""
    tok = tokenizer("byte_bpe")
    rm = reward_model("llama", "byte_bpe")
    response_ids, mask = policy_batch(tok, [response])
    messages = [[{"role": "user", "content": prompt}]]
    scores, rewards = score_and_densify_text(rm, tok, messages, response_ids, policy_tokenizer=tok, beta=beta)

    head = tok.apply_chat_template(messages[0], tokenize=False) + "<|assistant|>"
    prefix = tok(head, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prefix + response_ids[0].tolist() + [tok.convert_tokens_to_ids("<|end|>")]])
    completion = torch.zeros(ids.shape, dtype=torch.bool)
    completion[0, len(prefix) : len(prefix) + response_ids.shape[1]] = True
    ref_scores, ref = score_and_densify(rm, ids, torch.ones_like(ids), completion, beta=beta)
    torch.testing.assert_close(scores, ref_scores, **TOL)
    torch.testing.assert_close(rewards[0], ref[0, completion[0]], **TOL)


# ----------------------------------------------------------------------------------------- across tokenizers


RESPONSES = ["the movie was very good 🙂", "你好 café, naïve über!", "it's not bad"]


@pytest.mark.parametrize("method", ["abc", "prefix", "sparse", "uniform"])
@pytest.mark.parametrize(
    "arch, rm_name, chat",
    [
        ("llama", "sp_bpe", True),  # Llama-style GQA reward model, ▁ + byte fallback, trimming template
        ("gpt2", "sp_unigram", False),  # GPT-2 reward model, Metaspace Unigram, plain text
        ("bert", "wordpiece", False),  # BERT reward model (two logits, [CLS]), WordPiece with cleanup
        ("llama", "byte_bpe", True),  # byte-level BPE on both sides, but an RM template that adds text around
    ],
)
def test_across_tokenizers_matches_the_plain_reference(arch, rm_name, chat, method):
    policy = tokenizer("byte_bpe")
    rm_tok = tokenizer(rm_name)
    rm = reward_model(arch, rm_name)
    prompts = ["Review:", "Say something.", "Rate it"]
    response_ids, mask = policy_batch(policy, RESPONSES, eos=True)
    inputs = [[{"role": "user", "content": p}] for p in prompts] if chat else [p + " " for p in prompts]
    if arch == "bert" and method == "prefix":  # bidirectional: its positions are not prefixes
        with pytest.raises(ValueError, match="not a causal decoder"):
            score_and_densify_text(rm, rm_tok, inputs, response_ids, policy_tokenizer=policy, method=method)
        return
    scores, rewards = score_and_densify_text(
        rm, rm_tok, inputs, response_ids, policy_tokenizer=policy, beta=0.8, method=method
    )
    check_rewards(scores, rewards, mask)

    regions = []
    for b, _p in enumerate(prompts):
        response = policy.decode(response_ids[b][mask[b]], skip_special_tokens=True)
        if chat:
            full = rm_tok.apply_chat_template(inputs[b] + [{"role": "assistant", "content": response}], tokenize=False)
            head = rm_tok.apply_chat_template(inputs[b], tokenize=False) + "<|assistant|>"
            head += "\n" if rm_name == "sp_bpe" else ""
            kept = response.strip() if rm_name == "sp_bpe" else response
            regions.append((full, len(head), len(head) + len(kept), False))
        else:
            regions.append((inputs[b] + response, len(inputs[b]), len(inputs[b] + response), True))
    rm_spans = byte_level_rm_spans if rm_name == "byte_bpe" else offsets_to_bytes
    ref_scores, ref = reference_text_path(
        rm,
        rm_tok,
        regions,
        policy,
        response_ids,
        mask,
        0.8,
        lambda t, ids: byte_level_spans(t, ids, True),
        rm_spans,
        method=method,
    )
    torch.testing.assert_close(scores, ref_scores, **TOL)
    torch.testing.assert_close(rewards, ref, **TOL)


@pytest.mark.parametrize("method", ["prefix", "sparse", "uniform"])
@settings(max_examples=10, **SETTINGS)
@given(prompt=TEXT, response=TEXT.filter(lambda t: len(t) > 0), beta=st.sampled_from([0.0, 0.5, 1.0]))
def test_property_every_method_through_a_chat_template_equals_score_and_densify(method, prompt, response, beta):
    """The other methods on the text path, as ABC above: with the same byte-level tokenizer on both sides and a
    template whose special tokens fence the response, the result is ``score_and_densify(..., method=...)`` on the
    ids (for "prefix", the change over the template's closing token lands on the last response token, as there)."""
    tok = tokenizer("byte_bpe")
    rm = reward_model("llama", "byte_bpe")
    response_ids, mask = policy_batch(tok, [response])
    messages = [[{"role": "user", "content": prompt}]]
    scores, rewards = score_and_densify_text(
        rm, tok, messages, response_ids, policy_tokenizer=tok, beta=beta, method=method
    )

    head = tok.apply_chat_template(messages[0], tokenize=False) + "<|assistant|>"
    prefix = tok(head, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prefix + response_ids[0].tolist() + [tok.convert_tokens_to_ids("<|end|>")]])
    completion = torch.zeros(ids.shape, dtype=torch.bool)
    completion[0, len(prefix) : len(prefix) + response_ids.shape[1]] = True
    ref_scores, ref = score_and_densify(rm, ids, torch.ones_like(ids), completion, beta=beta, method=method)
    torch.testing.assert_close(scores, ref_scores, **TOL)
    torch.testing.assert_close(rewards[0], ref[0, completion[0]], **TOL)


def test_the_baselines_need_no_mapping_of_the_response():
    """A template that rewrites the response cannot carry ABC's or prefix differences' credit, but the sparse and
    uniform rewards need only the score."""
    policy = tokenizer("byte_bpe")
    rm = reward_model("llama", "sp_bpe")
    rewriting = sp_bpe("{% for m in messages %}{{ m['content'] | replace('good', 'fine') }}{% endfor %}")
    ids, mask = policy_batch(policy, ["good", "it was good"])
    chat = [[{"role": "user", "content": "x"}]] * 2
    for method in ("abc", "prefix"):
        with pytest.raises(ValueError, match="beyond trimming whitespace"):
            score_and_densify_text(rm, rewriting, chat, ids, policy_tokenizer=policy, method=method)
    scores, sparse = score_and_densify_text(rm, rewriting, chat, ids, policy_tokenizer=policy, method="sparse")
    _, uniform = score_and_densify_text(rm, rewriting, chat, ids, policy_tokenizer=policy, method="uniform")
    torch.testing.assert_close(sparse, dense_rlhf.sparse_rewards(scores, mask))
    torch.testing.assert_close(uniform, dense_rlhf.uniform_rewards(scores, mask))
    with pytest.raises(ValueError, match="method must be one of"):
        score_and_densify_text(rm, rewriting, chat, ids, policy_tokenizer=policy, method="attention")


def test_credit_of_a_split_character_follows_its_bytes():
    """A 4-byte emoji is one character for the WordPiece reward model and three byte-level tokens of the policy
    (2 + 1 + 1 bytes): the RM token's credit splits 2 : 1 : 1."""
    policy = tokenizer("byte_bpe")
    ids = policy("😀", add_special_tokens=False)["input_ids"]  # not in the training text: split into pieces
    spans = token_byte_spans(policy, ids)
    widths = (spans[:, 1] - spans[:, 0]).tolist()
    assert sum(widths) == 4 and len(widths) > 1
    out = project_credit(torch.tensor([1.0]), [[0, 4]], spans)
    torch.testing.assert_close(out, torch.tensor(widths, dtype=torch.float32) / 4)


def test_metaspace_policy_response_loses_its_leading_space_as_decoded():
    """A SentencePiece-style policy decodes ``▁good ▁movie`` alone as ``good movie`` (the first ``▁`` is dropped,
    as verl's decode does): the reward model reads prompt + that text, and every token still gets its word."""
    policy = tokenizer("sp_unigram")
    rm_tok = tokenizer("byte_bpe")
    rm = reward_model("gpt2", "byte_bpe")
    response_ids, mask = policy_batch(policy, ["good movie", "bad plot"])
    scores, rewards = score_and_densify_text(
        rm, rm_tok, ["Review: ", "Review: "], response_ids, policy_tokenizer=policy, beta=1.0
    )
    check_rewards(scores, rewards, mask)
    assert policy.decode(response_ids[0][mask[0]]) == "good movie"
    for b in range(2):
        spans = token_byte_spans(policy, response_ids[b][mask[b]])
        has_text = spans[:, 1] > spans[:, 0]
        assert bool((rewards[b][mask[b]][has_text] != 0).all())  # every token with text got credit
        assert bool((rewards[b][mask[b]][:-1][~has_text[:-1]] == 0).all())
    assert policy.convert_ids_to_tokens(response_ids[0, :1].tolist()) == ["▁"]  # a lone ▁ first: no text


@pytest.mark.parametrize(
    "template, response",
    [
        (TRIM_TEMPLATE, "  very good movie \n\n"),  # the template trims: the whitespace tokens get no attention credit
        (PAD_TEMPLATE, "very good movie"),  # the template adds blank lines around the content
    ],
)
def test_chat_template_whitespace(template, response):
    policy = tokenizer("byte_bpe")
    rm_tok = tokenizer("sp_bpe", template=template)
    rm = reward_model("llama", "sp_bpe")
    response_ids, mask = policy_batch(policy, [response])
    messages = [[{"role": "user", "content": "Rate it"}]]
    scores, rewards = score_and_densify_text(rm, rm_tok, messages, response_ids, policy_tokenizer=policy, beta=1.0)
    check_rewards(scores, rewards, mask, beta=1.0)
    spans = token_byte_spans(policy, response_ids[0])
    text = policy.decode(response_ids[0]).encode()
    blank = [i for i, (s, e) in enumerate(spans.tolist()) if not text[s:e].strip()]
    words = [i for i in range(len(spans)) if i not in blank]
    assert bool((rewards[0, words] != 0).all())
    if template == TRIM_TEMPLATE:
        assert blank and bool((rewards[0, blank[:-1]] == 0).all())  # trimmed away (the last one is T: beta = 1)


def test_special_tokens_inside_the_response_get_no_attention_and_nothing_is_lost():
    policy = tokenizer("byte_bpe")
    rm_tok = tokenizer("wordpiece")
    rm = reward_model("bert", "wordpiece")
    ids = policy("good<|endoftext|> movie", add_special_tokens=False)["input_ids"]
    response_ids = torch.tensor([ids])
    inner = ids.index(policy.eos_token_id)
    scores, rewards = score_and_densify_text(rm, rm_tok, ["Review: "], response_ids, policy_tokenizer=policy, beta=0.8)
    check_rewards(scores, rewards, torch.ones_like(response_ids, dtype=torch.bool))
    assert float(rewards[0, inner]) == 0.0  # no text for the RM, not the last token


def test_eos_kept_or_stripped():
    """EOS in the mask: it has no text, gets no attention credit and carries the sparse part as the last token.
    EOS out of the mask: the last text token carries it. The dense part is the same."""
    policy = tokenizer("byte_bpe")
    rm_tok = tokenizer("sp_bpe")
    rm = reward_model("llama", "sp_bpe")
    messages = [[{"role": "user", "content": "Rate it"}]] * 2
    ids, kept_mask = policy_batch(policy, RESPONSES[:2], eos=True)
    stripped_mask = kept_mask & (ids != policy.eos_token_id)
    s1, kept = score_and_densify_text(rm, rm_tok, messages, ids, policy_tokenizer=policy, response_mask=kept_mask)
    s2, stripped = score_and_densify_text(
        rm, rm_tok, messages, ids, policy_tokenizer=policy, response_mask=stripped_mask
    )
    torch.testing.assert_close(s1, s2, **TOL)
    check_rewards(s1, kept, kept_mask)
    check_rewards(s2, stripped, stripped_mask)
    for b in range(2):
        eos = int(kept_mask[b].nonzero().max())
        last_text = int(stripped_mask[b].nonzero().max())
        torch.testing.assert_close(kept[b, eos], 0.2 * s1[b], **TOL)
        torch.testing.assert_close(stripped[b, last_text] - kept[b, last_text], 0.2 * s1[b], **TOL)
        other = torch.ones(ids.shape[1], dtype=torch.bool)
        other[[eos, last_text]] = False
        torch.testing.assert_close(kept[b, other], stripped[b, other], **TOL)
    # the default mask (not the pad id) keeps EOS when pad and EOS differ
    s3, default = score_and_densify_text(rm, rm_tok, messages, ids, policy_tokenizer=policy)
    torch.testing.assert_close(default, kept, **TOL)


@pytest.mark.parametrize("arch, rm_name", [("llama", "sp_bpe"), ("gpt2", "sp_unigram"), ("bert", "wordpiece")])
def test_padding_sides_agree(arch, rm_name, monkeypatch):
    policy = tokenizer("byte_bpe")
    rm_tok = tokenizer(rm_name)
    rm = reward_model(arch, rm_name)
    prompts = ["Short: ", "A much longer prompt, with more words in it: "]
    right_ids, right_mask = policy_batch(policy, ["good", "very very good movie 🙂"])
    left_ids, left_mask = policy_batch(policy, ["good", "very very good movie 🙂"], side="left")
    s_right, r_right = score_and_densify_text(
        rm, rm_tok, prompts, right_ids, policy_tokenizer=policy, response_mask=right_mask
    )
    s_left, r_left = score_and_densify_text(
        rm, rm_tok, prompts, left_ids, policy_tokenizer=policy, response_mask=left_mask
    )
    torch.testing.assert_close(s_left, s_right, **TOL)
    torch.testing.assert_close(r_left[left_mask], r_right[right_mask], **TOL)
    monkeypatch.setattr(rm_tok, "padding_side", "left")
    if arch == "bert":  # BERT pools position 0, which is padding in a left-padded batch: refused
        with pytest.raises(ValueError, match="padding position"):
            score_and_densify_text(rm, rm_tok, prompts, right_ids, policy_tokenizer=policy, response_mask=right_mask)
        return
    s_pad_left, r_pad_left = score_and_densify_text(
        rm, rm_tok, prompts, right_ids, policy_tokenizer=policy, response_mask=right_mask
    )
    torch.testing.assert_close(s_pad_left, s_right, **TOL)
    torch.testing.assert_close(r_pad_left, r_right, **TOL)


def test_truncation(monkeypatch):
    policy = tokenizer("byte_bpe")
    rm_tok = tokenizer("sp_bpe")
    rm = reward_model("llama", "sp_bpe")
    prompt = "a long prompt about the movie and the plot and the acting and the music " * 3
    ids, mask = policy_batch(policy, ["very good"])
    full = len(rm_tok(prompt + "very good")["input_ids"])
    s_full, r_full = score_and_densify_text(rm, rm_tok, [prompt], ids, policy_tokenizer=policy)
    s_same, r_same = score_and_densify_text(rm, rm_tok, [prompt], ids, policy_tokenizer=policy, max_length=full)
    torch.testing.assert_close(r_same, r_full, **TOL)
    with pytest.raises(ValueError, match="max_length=.*cut the response"):  # right truncation cuts the response
        score_and_densify_text(rm, rm_tok, [prompt], ids, policy_tokenizer=policy, max_length=full - 2)
    monkeypatch.setattr(rm_tok, "truncation_side", "left")  # the prompt's start is cut instead
    s_cut, r_cut = score_and_densify_text(rm, rm_tok, [prompt], ids, policy_tokenizer=policy, max_length=full - 10)
    check_rewards(s_cut, r_cut, mask)
    assert not torch.allclose(s_cut, s_full)  # the reward model read a shorter text
    with pytest.raises(ValueError, match="cut the response"):  # even from the left, the response itself must stay
        score_and_densify_text(rm, rm_tok, [prompt], ids, policy_tokenizer=policy, max_length=2)


class ZeroWidthOffsets(PreTrainedTokenizerFast):
    """Offsets as tokenizers < 0.20.1 returned them for Llama-3 files: (start, start) for every token."""

    def __call__(self, *args, **kwargs):
        out = super().__call__(*args, **kwargs)
        if "offset_mapping" in out:
            out["offset_mapping"] = [[(s, s) for s, _ in row] for row in out["offset_mapping"]]
        return out


def test_zero_width_offsets_are_detected():
    policy = tokenizer("byte_bpe")
    broken = ZeroWidthOffsets(tokenizer_object=tokenizer("sp_unigram").backend_tokenizer, pad_token="<pad>")
    rm = reward_model("gpt2", "sp_unigram")
    ids, _ = policy_batch(policy, ["good movie"])
    with pytest.raises(ValueError, match="zero-width offsets.*tokenizers"):
        score_and_densify_text(rm, broken, ["Review: "], ids, policy_tokenizer=policy)


def test_errors():
    policy = tokenizer("byte_bpe")
    rm_tok = tokenizer("sp_bpe")
    rm = reward_model("llama", "sp_bpe")
    ids, mask = policy_batch(policy, ["good", "bad"])
    chat = [[{"role": "user", "content": "x"}]] * 2
    with pytest.raises(ValueError, match="prompts has 1"):
        score_and_densify_text(rm, rm_tok, ["x"], ids, policy_tokenizer=policy)
    with pytest.raises(TypeError, match="mixes"):
        score_and_densify_text(rm, rm_tok, ["x", chat[0]], ids, policy_tokenizer=policy)
    with pytest.raises(TypeError, match=r"prompts\[1\]"):
        score_and_densify_text(rm, rm_tok, ["x", 3], ids, policy_tokenizer=policy)
    with pytest.raises(TypeError, match="response_ids"):
        score_and_densify_text(rm, rm_tok, ["x", "y"], ids.float(), policy_tokenizer=policy)
    with pytest.raises(ValueError, match="response_mask has shape"):
        score_and_densify_text(rm, rm_tok, ["x", "y"], ids, policy_tokenizer=policy, response_mask=mask[:1])
    with pytest.raises(ValueError, match="no response token in rows \\[1\\]"):
        empty = mask.clone()
        empty[1] = False
        score_and_densify_text(rm, rm_tok, ["x", "y"], ids, policy_tokenizer=policy, response_mask=empty)
    with pytest.raises(ValueError, match="beta"):
        score_and_densify_text(rm, rm_tok, ["x", "y"], ids, policy_tokenizer=policy, beta=1.5)
    with pytest.raises(TypeError, match="rm_tokenizer is a slow"):
        from transformers import ByT5Tokenizer

        score_and_densify_text(rm, ByT5Tokenizer(), ["x", "y"], ids, policy_tokenizer=policy)
    with pytest.raises(ValueError, match="no chat_template"):
        score_and_densify_text(rm, tokenizer("sp_unigram"), chat, ids, policy_tokenizer=policy)
    rewriting = sp_bpe("{% for m in messages %}{{ m['content'] | replace('good', 'fine') }}{% endfor %}")
    with pytest.raises(ValueError, match="beyond trimming whitespace"):
        score_and_densify_text(rm, rewriting, chat, ids, policy_tokenizer=policy)
    shouting = sp_bpe("{% for m in messages %}{{ m['content'] | upper }}{% endfor %}")
    with pytest.raises(ValueError, match="verbatim"):
        score_and_densify_text(rm, shouting, chat, ids, policy_tokenizer=policy)
    mismatched = llama_rm(rm_tok)
    mismatched.config.pad_token_id = rm_tok.convert_tokens_to_ids("<unk>")
    with pytest.raises(ValueError, match="padding position"):
        score_and_densify_text(mismatched.eval(), rm_tok, ["x", "a longer prompt"], ids, policy_tokenizer=policy)


def test_exported_at_the_package_top():
    assert dense_rlhf.score_and_densify_text is score_and_densify_text
    assert "score_and_densify_text" in dense_rlhf.__all__
