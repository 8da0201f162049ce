"""CLIP's byte-pair-encoding tokenizer, run by the `tokenizers` library.

The behaviour is OpenAI CLIP's ``simple_tokenizer.py`` (Radford et al. 2021), as transformers' fast
``CLIPTokenizer`` reproduces it:

1. text cleanup: Unicode NFC, every whitespace run -> one space, lower case. (OpenAI also runs ``ftfy``
   and unescapes HTML entities; we do not, so mojibake and ``&amp;`` stay as typed, as in transformers.)
2. pre-tokenisation with CLIP's regex: the two special tokens, the English contractions, runs of letters,
   single digits, runs of other non-space symbols; whitespace is dropped.
3. each piece -> UTF-8 bytes -> GPT-2's printable byte alphabet (Radford et al. 2019), ``</w>`` appended
   to its last symbol, then BPE merges by rank.
4. ``<|startoftext|>`` ids ``<|endoftext|>``, truncated so that the end token survives, padded to 77.

The real 49,408-token vocabulary ships inside the package (``bpe_simple_vocab_16e6.txt.gz``, MIT, see
``VOCAB_LICENSE.txt``): ``CLIPTokenizer.default()`` needs no network.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, trainers
from tokenizers.models import BPE

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
SUFFIX = "</w>"  # end-of-word marker on the last symbol of every pre-token
CONTEXT_LENGTH = 77  # CLIP's text context (OpenAI CLIP, SD 1.x/2.x)
DEFAULT_VOCAB = Path(__file__).with_name("bpe_simple_vocab_16e6.txt.gz")
# CLIP's pre-tokenisation pattern (simple_tokenizer.py); input is already lower-cased, so OpenAI's
# re.IGNORECASE changes nothing.
PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
N_OPENAI_MERGES = 49152 - 256 - 2  # lines 1..48894 of bpe_simple_vocab_16e6.txt (line 0 is a header)


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters (Radford et al. 2019).

    Printable Latin-1 bytes map to themselves; the other 68 (controls, space, ...) to U+0100 onwards, in
    byte order. The insertion order (printable first) is the order of CLIP's first 256 vocabulary entries.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = (b for b in range(256) if b not in table)
    table.update({b: chr(256 + n) for n, b in enumerate(extra)})
    return table


def clip_vocab(merges: Sequence[tuple[str, str]]) -> dict[str, int]:
    """CLIP's vocabulary layout: 256 byte symbols, the same with ``</w>``, one token per merge, BOS, EOS."""
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + SUFFIX for s in symbols] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab: dict[str, int] = {}
    for t in tokens:
        vocab.setdefault(t, len(vocab))  # a merge result seen before keeps its first id; ids stay dense
    return vocab


def _parse_merges(lines: Iterable[str], source: str) -> list[tuple[str, str]]:
    merges = []
    for n, line in enumerate(lines):
        if not line.strip() or (n == 0 and "#version" in line):
            continue  # header "#version: 0.2" (OpenAI's reads '"bpe_simple_vocab_16e6.txt#version: 0.2')
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"{source}, line {n + 1}: a merge is two space-separated symbols, got {line!r}")
        merges.append((parts[0], parts[1]))
    return merges


@lru_cache(maxsize=2)
def _read_openai_bpe(path: str) -> tuple[tuple[str, str], ...]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")[: N_OPENAI_MERGES + 1]  # the file lists 262k merges; CLIP uses 48,894
    return tuple(_parse_merges(lines, path))


def _build(vocab: dict[str, int], merges: list[tuple[str, str]]) -> Tokenizer:
    """A `tokenizers.Tokenizer` with CLIP's cleanup, pre-tokenisation and end-of-word BPE."""
    model = BPE(vocab=vocab, merges=merges, unk_token=EOS, continuing_subword_prefix="",
                end_of_word_suffix=SUFFIX, fuse_unk=False)
    tok = Tokenizer(model)
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tok.pre_tokenizer = _pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    # Special tokens typed in a prompt map to their ids before cleanup, as in OpenAI's and HF's tokenizers.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (BOS, EOS)])
    return tok


def _pre_tokenizer():
    # Keep the regex matches, drop what lies between them (whitespace), then map bytes to GPT-2 symbols.
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PATTERN), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])


class CLIPTokenizer:
    """CLIP BPE tokenizer: ``tok(["a photo of a cat"])`` -> LongTensor (B, 77).

    vocab: token -> id; must hold ``<|startoftext|>`` and ``<|endoftext|>``.
    merges: BPE merges in rank order, each a pair of symbols already in ``vocab``.
    context_length: rows are truncated / padded to this length (77 for CLIP).
    pad_token: the padding token: ``<|endoftext|>`` for SD 1.x (transformers' CLIPTokenizer default),
        ``"!"`` (id 0) for SD 2.x, whose open_clip tokenizer pads with zeros. Only padding uses it: a "!"
        in the text stays "!</w>" (256) as in open_clip, whereas transformers' tokenizer with
        ``pad_token="!"`` (diffusers' SD 2.x folders) also maps every typed "!" to 0.
    """

    def __init__(
        self,
        vocab: dict[str, int],
        merges: Sequence[tuple[str, str]],
        *,
        context_length: int = CONTEXT_LENGTH,
        pad_token: str = EOS,
    ):
        if context_length < 2:
            raise ValueError(f"context_length must hold the start and end tokens, got {context_length}")
        for name in (BOS, EOS):
            if name not in vocab:
                raise ValueError(f"the vocabulary has no {name!r} token; CLIP vocabularies hold {BOS}, {EOS}")
        if pad_token not in vocab:
            raise ValueError(f"pad_token {pad_token!r} is not in the vocabulary; use {EOS!r} or '!' (id 0)")
        self.vocab = dict(vocab)
        self.merges = [tuple(m) for m in merges]
        self.context_length = context_length
        self.pad_token = pad_token
        self._tok = _build(self.vocab, self.merges)
        self.bos_token_id = self.vocab[BOS]
        self.eos_token_id = self.vocab[EOS]
        self.pad_token_id = self.vocab[pad_token]

    # -- construction --------------------------------------------------------------------------------------

    @classmethod
    def default(cls, **kwargs) -> CLIPTokenizer:
        """OpenAI's 49,408-token vocabulary, shipped with sfumato (SD 1.x / 2.x, OpenAI and OpenCLIP CLIP)."""
        return cls.from_openai_bpe(DEFAULT_VOCAB, **kwargs)

    @classmethod
    def from_openai_bpe(cls, path: str | Path, **kwargs) -> CLIPTokenizer:
        """OpenAI's ``bpe_simple_vocab_16e6.txt(.gz)``: merges only; the vocabulary is derived from them."""
        merges = list(_read_openai_bpe(str(path)))
        return cls(clip_vocab(merges), merges, **kwargs)

    @classmethod
    def from_files(cls, vocab_json: str | Path, merges_txt: str | Path, **kwargs) -> CLIPTokenizer:
        """``vocab.json`` + ``merges.txt`` (the SD diffusers repositories' ``tokenizer/`` folder)."""
        vocab = json.loads(Path(vocab_json).read_text(encoding="utf-8"))
        merges = _parse_merges(Path(merges_txt).read_text(encoding="utf-8").split("\n"), str(merges_txt))
        return cls(vocab, merges, **kwargs)

    @classmethod
    def from_tokenizer_json(cls, path: str | Path, **kwargs) -> CLIPTokenizer:
        """A ``tokenizer.json`` of a CLIP-style BPE model (what transformers 5 saves)."""
        model = json.loads(Path(path).read_text(encoding="utf-8")).get("model", {})
        if model.get("type") != "BPE" or model.get("end_of_word_suffix") != SUFFIX:
            raise ValueError(
                f"{path} is not a CLIP BPE tokenizer (model type {model.get('type')!r}, end_of_word_suffix "
                f"{model.get('end_of_word_suffix')!r}; expected 'BPE' and {SUFFIX!r})"
            )
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        return cls(model["vocab"], merges, **kwargs)

    @classmethod
    def from_pretrained(cls, directory: str | Path, **kwargs) -> CLIPTokenizer:
        """A tokenizer folder: ``tokenizer.json`` or ``vocab.json`` + ``merges.txt``.

        ``model_max_length`` and ``pad_token`` are read from ``tokenizer_config.json`` /
        ``special_tokens_map.json`` when present, unless given as keyword arguments.
        """
        d = Path(directory)
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            if (d / name).is_file():
                cfg = json.loads((d / name).read_text(encoding="utf-8"))
                pad = cfg.get("pad_token")
                pad = pad.get("content") if isinstance(pad, dict) else pad
                if pad is not None:
                    kwargs.setdefault("pad_token", pad)
                if isinstance(cfg.get("model_max_length"), int) and cfg["model_max_length"] < 10**6:
                    kwargs.setdefault("context_length", cfg["model_max_length"])
        if (d / "vocab.json").is_file() and (d / "merges.txt").is_file():
            return cls.from_files(d / "vocab.json", d / "merges.txt", **kwargs)
        if (d / "tokenizer.json").is_file():
            return cls.from_tokenizer_json(d / "tokenizer.json", **kwargs)
        raise FileNotFoundError(f"{d} holds neither vocab.json + merges.txt nor tokenizer.json")

    def save(self, directory: str | Path) -> None:
        """Write ``vocab.json`` + ``merges.txt`` (+ ``tokenizer_config.json``), readable by transformers."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        (d / "vocab.json").write_text(json.dumps(self.vocab, ensure_ascii=False), encoding="utf-8")
        lines = ["#version: 0.2", *(f"{a} {b}" for a, b in self.merges)]
        (d / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": self.context_length,
                  "bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": self.pad_token}
        (d / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")

    # -- use -----------------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def tokenize(self, text: str) -> list[str]:
        """The BPE tokens of ``text`` without start/end tokens, e.g. ``['a</w>', 'photo</w>']``."""
        return self._tok.encode(text, add_special_tokens=False).tokens

    def encode(self, text: str) -> list[int]:
        """``[<|startoftext|>, ..., <|endoftext|>]`` ids of one text, neither truncated nor padded."""
        return [self.bos_token_id, *self._tok.encode(text, add_special_tokens=False).ids, self.eos_token_id]

    def __call__(
        self, texts: str | Sequence[str], *, padding: str = "max_length", context_length: int | None = None
    ) -> torch.Tensor:
        """Batch encode -> LongTensor (B, T).

        Each row is ``<|startoftext|>``, the text's tokens cut to ``T - 2``, ``<|endoftext|>``, then
        ``pad_token``. ``padding="max_length"`` gives T = context_length (what SD and CLIP expect);
        ``"longest"`` pads only to the longest row of the batch.
        """
        if padding not in ("max_length", "longest"):
            raise ValueError(f"padding must be 'max_length' or 'longest', got {padding!r}")
        if isinstance(texts, str):
            texts = [texts]
        T = context_length or self.context_length
        bodies = [e.ids[: T - 2] for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]
        rows = [[self.bos_token_id, *b, self.eos_token_id] for b in bodies]
        if padding == "longest":
            T = max((len(r) for r in rows), default=2)
        return torch.tensor([r + [self.pad_token_id] * (T - len(r)) for r in rows], dtype=torch.long)

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Ids -> text; special and padding tokens are dropped, ``</w>`` becomes a space."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        ids = [i for i in ids if i not in (self.bos_token_id, self.eos_token_id, self.pad_token_id)]
        return self._tok.decode(ids, skip_special_tokens=True).replace(SUFFIX, " ").strip()


def train_bpe(
    captions: Iterable[str],
    vocab_size: int,
    *,
    min_frequency: int = 2,
    context_length: int = CONTEXT_LENGTH,
    pad_token: str = EOS,
) -> CLIPTokenizer:
    """Learn a new CLIP-style BPE vocabulary from a caption corpus (for models trained from scratch).

    The same cleanup and pre-tokenisation as CLIP; merges are learnt by `tokenizers`' BpeTrainer
    (Sennrich et al. 2016) and laid out as CLIP's vocabulary (all 512 byte symbols first, so any text
    encodes; merges; then ``<|startoftext|>``, ``<|endoftext|>`` as the last two ids). The result may be
    smaller than ``vocab_size`` when the corpus has fewer pairs seen ``min_frequency`` times.
    """
    n_base = 2 * 256 + 2
    if vocab_size <= n_base:
        raise ValueError(
            f"vocab_size must exceed {n_base} (256 byte symbols, 256 with </w>, 2 special tokens), "
            f"got {vocab_size}"
        )
    tok = Tokenizer(BPE(continuing_subword_prefix="", end_of_word_suffix=SUFFIX))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tok.pre_tokenizer = _pre_tokenizer()
    # The trainer counts its alphabet (<= 512 symbols) inside vocab_size: ask for enough merges, cut below.
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size + n_base, min_frequency=min_frequency, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), continuing_subword_prefix="",
        end_of_word_suffix=SUFFIX,
    )
    tok.train_from_iterator(captions, trainer)
    learnt = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
              for m in json.loads(tok.to_str())["model"]["merges"]]
    merges: list[tuple[str, str]] = []
    seen = set(clip_vocab([]))
    for m in learnt:
        if len(seen) >= vocab_size:
            break
        merges.append(m)
        seen.add("".join(m))
    return CLIPTokenizer(clip_vocab(merges), merges, context_length=context_length, pad_token=pad_token)
