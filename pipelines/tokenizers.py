"""Tokenizers built entirely offline, without the Hugging Face hub.

Tests and the benchmark must never download anything, yet the diffusers
pipelines need real tokenizers to be callable with text prompts. The CLIP BPE
merges ship inside the ``open_clip`` package, so a genuine CLIP tokenizer (the
full 49408-token one, or a truncated one for tiny test models) can be rebuilt
from them. T5's SentencePiece model is not shipped anywhere locally, so a small
in-code Unigram vocabulary stands in for it.
"""

from __future__ import annotations

import gzip
from functools import lru_cache
from importlib import resources

from transformers import CLIPTokenizer, T5Tokenizer

__all__ = [
    "CLIP_BOS",
    "CLIP_EOS",
    "CLIP_FULL_VOCAB_SIZE",
    "bytes_to_unicode",
    "clip_merges",
    "clip_tokenizer",
    "t5_tokenizer",
    "t5_vocab",
]

CLIP_BOS = "<|startoftext|>"
CLIP_EOS = "<|endoftext|>"
#: 256 byte tokens + 256 byte tokens with ``</w>`` + 48894 merges + 2 specials.
CLIP_FULL_VOCAB_SIZE = 49408
#: CLIP keeps merge lines [1 : 49152 - 256 - 2 + 1] of the BPE file (line 0 is a header).
_CLIP_NUM_MERGES = 49152 - 256 - 2


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """Byte -> printable unicode char table used by GPT-2/CLIP byte-level BPE.

    Printable latin-1 bytes map to themselves; the remaining 68 bytes (control
    chars, space, ...) are shifted to code points from 256 upwards so that every
    byte has a visible, whitespace-free symbol.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table: dict[int, str] = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    # Insertion order (printable bytes first, then the rest) defines the first 256 vocab ids.
    return table


@lru_cache(maxsize=1)
def _all_clip_merges() -> tuple[tuple[str, str], ...]:
    path = resources.files("open_clip").joinpath("bpe_simple_vocab_16e6.txt.gz")
    with path.open("rb") as fh:
        lines = gzip.decompress(fh.read()).decode("utf-8").split("\n")
    merges = lines[1 : _CLIP_NUM_MERGES + 1]
    return tuple(tuple(line.split()) for line in merges)  # type: ignore[misc]


def clip_merges(num_merges: int | None = None) -> list[tuple[str, str]]:
    """The first ``num_merges`` BPE merges of CLIP (all 48894 when ``None``)."""
    merges = _all_clip_merges()
    if num_merges is None:
        return list(merges)
    if not 0 <= num_merges <= len(merges):
        raise ValueError(f"num_merges must be in [0, {len(merges)}], got {num_merges}")
    return list(merges[:num_merges])


def _clip_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    byte_tokens = list(bytes_to_unicode().values())
    tokens = [*byte_tokens, *(t + "</w>" for t in byte_tokens), *("".join(m) for m in merges), CLIP_BOS, CLIP_EOS]
    return {tok: i for i, tok in enumerate(tokens)}


def clip_tokenizer(num_merges: int | None = None, model_max_length: int = 77) -> CLIPTokenizer:
    """A real CLIP BPE tokenizer rebuilt from open_clip's bundled merges file.

    ``num_merges=None`` gives the exact 49408-token tokenizer of OpenAI CLIP /
    SD1.x (ids identical to ``open_clip.tokenizer.SimpleTokenizer``). A small
    ``num_merges`` (e.g. 500) keeps the same algorithm with a vocabulary of
    ``512 + num_merges + 2`` tokens, which is what tiny test text encoders want:
    ``<|startoftext|>`` is then ``len - 2`` and ``<|endoftext|>`` (also the pad
    token, as in SD1.x) is ``len - 1``.

    Save with ``tok.save_pretrained(dir)``; reload with
    ``CLIPTokenizer.from_pretrained(dir)``.
    """
    merges = clip_merges(num_merges)
    vocab = _clip_vocab(merges)
    return CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=CLIP_EOS,
        bos_token=CLIP_BOS,
        eos_token=CLIP_EOS,
        pad_token=CLIP_EOS,
        model_max_length=model_max_length,
    )


# --- T5 -------------------------------------------------------------------------------------

_T5_SPECIALS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2 as in every T5 checkpoint
_T5_CHARS = (
    "abcdefghijklmnopqrstuvwxyz"
    "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    "0123456789"
    ".,!?;:'\"-_()[]{}/\\&%$#@*+=<>~`|^"
)
# Roughly frequency-ordered; enough for prompts used in tests/demos to tokenize mostly into words.
_T5_WORDS = """
the of and to a in is it you that he was for on are with as his they be at one have this from or
had by not word but what some we can out other were all there when up use your how said an each
she which do their time if will way about many then them write would like so these her long make
thing see him two has look more day could go come did number sound no most people my over know
water than call first who may down side been now find any new work part take get place made live
where after back little only round man year came show every good me give our under name very
through just form sentence great think say help low line differ turn cause much mean before move
right boy old too same tell does set three want air well also play small end put home read hand
port large spell add even land here must big high such follow act why ask men change went light
kind off need house picture try us again animal point mother world near build self earth father
head stand own page should country found answer school grow study still learn plant cover food
sun four between state keep eye never last let thought city tree cross farm hard start might story
saw far sea draw left late run while press close night real life few north open seem together
next white children begin got walk example ease paper group always music those both mark often
letter until mile river car feet care second book carry took science eat room friend began idea
fish mountain stop once base hear horse cut sure watch color face wood main enough plain girl
usual young ready above ever red list though feel talk bird soon body dog family direct pose
leave song measure door product black short numeral class wind question happen complete ship
area half rock order fire south problem piece told knew pass since top whole king space heard
best hour better during hundred five remember step early hold west ground interest reach fast
verb sing listen six table travel less morning ten simple several toward war lay against pattern
slow center love person money serve appear road map rain rule govern pull cold notice voice
unit power town fine certain fly fall lead cry dark machine note wait plan figure star box noun
field rest correct able pound done beauty drive stood contain front teach week final gave green
quick develop ocean warm free minute strong special mind behind clear tail produce fact street
inch multiply nothing course stay wheel full force blue object decide surface deep moon island
foot system busy test record boat common gold possible plane dry wonder laugh thousand ago ran
check game shape yes hot miss brought heat snow tire bring distant fill east paint language
among cat photo image painting portrait photograph style detailed beautiful cinematic lighting
art digital realistic landscape sky cloud flower garden forest street city sunset sunrise
standing sitting wearing holding lying running flying blurry background foreground closeup
astronaut robot dragon castle cake apple banana orange yellow purple pink brown gray grey
make turn into add remove change replace
""".split()


@lru_cache(maxsize=1)
def t5_vocab() -> tuple[tuple[str, float], ...]:
    """The in-code Unigram vocabulary: ``(piece, log-prob score)`` pairs.

    Scores decrease with the id so that whole words beat their spelled-out
    characters, while every letter, digit and common punctuation mark exists
    both with and without the ``▁`` word-start prefix (so no English prompt maps
    letters to ``<unk>``).
    """
    pieces: list[str] = ["▁"]
    words = list(dict.fromkeys(w for w in _T5_WORDS if w))
    pieces += [f"▁{w}" for w in words]
    pieces += [f"▁{c}" for c in _T5_CHARS]
    pieces += list(_T5_CHARS)
    seen: set[str] = set()
    unique = [p for p in pieces if not (p in seen or seen.add(p))]
    vocab: list[tuple[str, float]] = [(s, 0.0) for s in _T5_SPECIALS]
    # Words: around -5..-9, single characters: -10 and lower, so a word is one token.
    vocab.append(("▁", -2.0))
    for i, piece in enumerate(unique[1:]):
        base = -5.0 if len(piece.lstrip("▁")) > 1 else -10.0
        vocab.append((piece, base - i * 1e-3))
    return tuple(vocab)


def t5_tokenizer(model_max_length: int = 512) -> T5Tokenizer:
    """A tiny T5-style Unigram tokenizer (``<pad>``=0, ``</s>``=1, ``<unk>``=2).

    A stand-in for the 32k-piece T5 SentencePiece model, which is not available
    offline; ids are stable across runs, so tiny T5 encoders can be saved and
    reloaded. Sentinel ``<extra_id_*>`` tokens are omitted (diffusion pipelines
    never use them).
    """
    return T5Tokenizer(vocab=list(t5_vocab()), extra_ids=0, model_max_length=model_max_length)
