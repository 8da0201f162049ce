"""The CLIP BPE tokenizer against transformers' CLIPTokenizer on the same vocabulary files."""

import gzip
import json
import random

import pytest
import torch
import transformers

from sfumato.text.tokenizer import BOS, DEFAULT_VOCAB, EOS, CLIPTokenizer, clip_vocab, train_bpe

PROMPTS = [
    "a photo of an astronaut riding a horse",
    "",
    "   ",
    "A Photo Of A CAT, Sitting On A Mat!!!",
    "Hello,   world...   extra    spaces\tand\ttabs\nand\r\nnewlines  ",
    "it's they're we've I'm you'll he'd don't DON'T 'quoted' rock'n'roll",
    "1234567890 3.14159 1,000,000 50% $9.99 #1 4k 8K uhd 1920x1080",
    "café naïve façade Ünïcödé Å vs A\u030a (combining) ﬁ-ligature",
    "emoji 😀🎨🐱 — “curly quotes” « guillemets » …",
    "中文字符 日本語のテキスト 한국어 ॐ नमः शिवाय Ελληνικά русский",
    "e-mail: foo@bar.com, url: https://example.com/a_b?c=d&e=f",
    "&amp; &lt;html&gt; entities stay as typed",
    "<|startoftext|> special <|endoftext|> tokens typed in a prompt",
    "masterpiece, best quality, (detailed:1.2), [[brackets]], {braces}, a|b, c/d, e\\f",
    "supercalifragilisticexpialidocious antidisestablishmentarianism pneumonoultramicroscopic",
    " ".join(["a very long prompt that keeps going"] * 20),  # > 77 tokens: truncated, end token kept
    "x" * 400,
    "non\u00a0breaking\u2003em\u2009thin spaces",
]


@pytest.fixture(scope="module")
def tok():
    return CLIPTokenizer.default()


@pytest.fixture(scope="module")
def hf(tok, tmp_path_factory):
    d = tmp_path_factory.mktemp("clip_vocab")
    tok.save(d)
    return transformers.CLIPTokenizer.from_pretrained(d)  # reads vocab.json + merges.txt


def _hf_ids(hf, prompts, **kw):
    kw = {"padding": "max_length", "max_length": 77, "truncation": True, **kw}
    return hf(prompts, return_tensors="pt", **kw).input_ids


def test_golden_example(tok):
    assert tok.encode("a photo of an astronaut riding a horse") == [
        49406, 320, 1125, 539, 550, 18376, 6765, 320, 4558, 49407,
    ]  # REFERENCE-NOTES, the ids SD 1.x pipelines feed their text encoder


def test_shipped_vocabulary_layout(tok):
    assert tok.vocab_size == 49408
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (49406, 49407, 49407)
    assert tok.vocab["!"] == 0 and tok.vocab["!</w>"] == 256 and tok.vocab["a</w>"] == 320
    assert len(tok.merges) == 48894
    with gzip.open(DEFAULT_VOCAB, "rt", encoding="utf-8") as f:
        assert f.readline().startswith('"bpe_simple_vocab_16e6.txt#version')


def test_matches_transformers_on_real_vocabulary(tok, hf):
    ours, ref = tok(PROMPTS), _hf_ids(hf, PROMPTS)
    assert ours.dtype == torch.long and ours.shape == (len(PROMPTS), 77)
    assert torch.equal(ours, ref)
    for p in PROMPTS:  # untruncated too
        assert tok.encode(p) == hf(p).input_ids


def test_truncation_keeps_the_end_token(tok):
    ids = tok([PROMPTS[15], "short"])
    assert ids[0, 0] == 49406 and ids[0, 76] == 49407 and (ids[0, 1:76] != 49407).all()
    assert ids[1].tolist()[:3] == [49406, 3005, 49407] and (ids[1, 3:] == 49407).all()


def test_longest_padding_and_other_lengths_match_transformers(tok, hf):
    prompts = PROMPTS[:6]
    ref = hf(prompts, padding="longest", return_tensors="pt").input_ids
    assert torch.equal(tok(prompts, padding="longest"), ref)
    assert torch.equal(tok(PROMPTS, context_length=20), _hf_ids(hf, PROMPTS, max_length=20))


def test_sd2_pads_with_zero(tmp_path, tok):
    """SD 2.x's open_clip tokenizer pads with 0 ("!"); its diffusers tokenizer says pad_token="!"."""
    sd2 = CLIPTokenizer.default(pad_token="!")
    ids = sd2(["a cat"])
    assert ids[0].tolist()[:4] == [49406, 320, 2368, 49407] and (ids[0, 4:] == 0).all()
    # Same tokens as the SD 1.x tokenizer, only the padding differs (open_clip: zeros after the end token).
    for p, a, b in zip(PROMPTS, sd2(PROMPTS), tok(PROMPTS)):
        n = len(tok.encode(p)[:77])
        assert torch.equal(a[:n], b[:n]) and (a[n:] == 0).all()
    # transformers registers the pad token "!" as a special token, so it also turns every "!" typed in a
    # prompt into id 0 ("hello!" -> 3306, 0), unlike open_clip, which SD 2.x was trained with (3306, 256).
    # On prompts without "!" the two agree.
    tok.save(tmp_path)
    hf = transformers.CLIPTokenizer.from_pretrained(tmp_path, pad_token="!")
    assert hf("hello!").input_ids == [49406, 3306, 0, 49407]
    assert sd2.encode("hello!") == [49406, 3306, 256, 49407]
    plain = [p for p in PROMPTS if "!" not in p]
    assert torch.equal(sd2(plain), _hf_ids(hf, plain))
    sd2.save(tmp_path / "sd2")  # pad token travels in tokenizer_config.json
    assert CLIPTokenizer.from_pretrained(tmp_path / "sd2").pad_token_id == 0


def test_loads_transformers_tokenizer_json(tmp_path, tok, hf):
    hf.save_pretrained(tmp_path)  # transformers 5 writes tokenizer.json + tokenizer_config.json only
    assert (tmp_path / "tokenizer.json").is_file() and not (tmp_path / "vocab.json").exists()
    again = CLIPTokenizer.from_pretrained(tmp_path)
    assert again.vocab == tok.vocab and again.merges == tok.merges and again.context_length == 77
    assert torch.equal(again(PROMPTS), tok(PROMPTS))


def test_openai_bpe_file_and_vocab_files_agree(tmp_path, tok):
    plain = tmp_path / "bpe.txt"  # the uncompressed file works as well
    with gzip.open(DEFAULT_VOCAB, "rt", encoding="utf-8") as f:
        plain.write_text(f.read(), encoding="utf-8")
    tok.save(tmp_path / "files")
    for other in (CLIPTokenizer.from_openai_bpe(plain),
                  CLIPTokenizer.from_files(tmp_path / "files/vocab.json", tmp_path / "files/merges.txt")):
        assert other.vocab == tok.vocab and torch.equal(other(PROMPTS), tok(PROMPTS))


def test_decode(tok):
    assert tok.decode(tok(["A Photo of a CAT,  on a mat!"])[0]) == "a photo of a cat , on a mat !"
    assert tok.decode(tok.encode("café 😀")) == "café 😀"
    assert tok.tokenize("an astronaut") == ["an</w>", "astronaut</w>"]


def _corpus(n=3000, seed=0):
    rng = random.Random(seed)
    syllables = ["ka", "lo", "mi", "ne", "ru", "sha", "to", "vi", "zen", "qu", "ar", "el", "on", "ist", "ed"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(400)]
    words += "a photo of the with and in on red blue green cat dog tree house painting sunset".split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(3, 15))) + rng.choice([".", "!", ",", ""])
            for _ in range(n)]


def test_trained_vocabulary_matches_transformers(tmp_path):
    trained = train_bpe(_corpus(), vocab_size=1000)
    assert trained.vocab_size == 1000 and len(trained.merges) == 1000 - 514
    assert trained.vocab == clip_vocab(trained.merges)  # CLIP's layout: bytes, bytes</w>, merges, BOS, EOS
    assert (trained.bos_token_id, trained.eos_token_id) == (998, 999)
    trained.save(tmp_path)
    hf = transformers.CLIPTokenizer.from_pretrained(tmp_path)
    prompts = PROMPTS + _corpus(50, seed=1)  # unseen words and scripts still encode: all bytes are symbols
    assert torch.equal(trained(prompts), _hf_ids(hf, prompts))
    assert CLIPTokenizer.from_pretrained(tmp_path).vocab == trained.vocab
    assert len(trained.tokenize("kalomi shato")) < len("kalomishato")  # merges were learnt


def test_small_corpus_gives_smaller_vocabulary():
    trained = train_bpe(["a cat", "a dog"] * 10, vocab_size=5000)
    assert 514 < trained.vocab_size < 5000 and trained.eos_token_id == trained.vocab_size - 1


# ---- errors -------------------------------------------------------------------------------------------


def test_errors_speak(tmp_path):
    with pytest.raises(ValueError, match="vocab_size must exceed 514"):
        train_bpe(["a cat"], vocab_size=300)
    with pytest.raises(ValueError, match="pad_token '<pad>'"):
        CLIPTokenizer.default(pad_token="<pad>")
    with pytest.raises(ValueError, match="padding must be"):
        CLIPTokenizer.default()(["a"], padding="right")
    with pytest.raises(FileNotFoundError, match="neither vocab.json"):
        CLIPTokenizer.from_pretrained(tmp_path)
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b\nthree symbols here\n", encoding="utf-8")
    (tmp_path / "vocab.json").write_text(json.dumps({"a": 0, "b": 1, "ab": 2, BOS: 3, EOS: 4}))
    with pytest.raises(ValueError, match="line 3"):
        CLIPTokenizer.from_pretrained(tmp_path)
    (tmp_path / "vocab.json").write_text(json.dumps({"a": 0, "b": 1}))
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no '<\\|startoftext\\|>' token"):
        CLIPTokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "WordPiece"}}))
    with pytest.raises(ValueError, match="not a CLIP BPE tokenizer"):
        CLIPTokenizer.from_tokenizer_json(tmp_path / "tokenizer.json")
