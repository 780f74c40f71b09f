"""SD's own CLIP tokenizer, built offline from the vendored BPE merges file.

``vocab/bpe_simple_vocab_16e6.txt.gz`` is OpenAI CLIP's merges file as shipped in the open-clip-torch wheel (MIT,
see ``vocab/NOTICE``). The vocabulary is built the way CLIP's ``SimpleTokenizer`` builds it (Radford et al., 2021;
``open_clip/tokenizer.py``): the 256 byte symbols of ``bytes_to_unicode`` in its order, the same 256 with the
end-of-word marker ``</w>``, one token per merge of the first 48,894 merges, then ``<|startoftext|>`` and
``<|endoftext|>``: 49,408 tokens, the ids of SD v1.x's ``tokenizer/vocab.json``. No download, no hub.
"""

from __future__ import annotations

import gzip
import hashlib
from functools import lru_cache
from pathlib import Path

VOCAB_FILE = Path(__file__).parent / "vocab" / "bpe_simple_vocab_16e6.txt.gz"
VOCAB_SIZE = 49408
NUM_MERGES = VOCAB_SIZE - 256 - 256 - 2  # 48,894: CLIP reads lines 1 .. 49152 - 256 - 2 of the file
SPECIALS = ("<|startoftext|>", "<|endoftext|>")


def bytes_to_unicode() -> dict[int, str]:
    """CLIP / GPT-2's reversible byte -> printable character table, in its own order (printable bytes first)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


@lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """CLIP's vocabulary (token -> id, 49,408 entries) and its merges, read from the vendored file."""
    if not VOCAB_FILE.is_file():
        raise FileNotFoundError(f"the CLIP BPE file {VOCAB_FILE} is missing from this installation")
    with gzip.open(VOCAB_FILE, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = tuple(tuple(line.split()) for line in lines[1:NUM_MERGES + 1])
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + list(SPECIALS)
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise ValueError(f"{VOCAB_FILE} gives {len(vocab)} distinct tokens, CLIP has {VOCAB_SIZE}")
    return vocab, merges


def vocab_sha256() -> str:
    """Hash of the vendored merges file (recorded in model cards)."""
    return hashlib.sha256(VOCAB_FILE.read_bytes()).hexdigest()


def build_clip_tokenizer(max_length: int = 77):
    """A ``transformers.CLIPTokenizer`` with CLIP's 49,408-token vocabulary and merges, built in memory.

    Specials as in SD v1.x's tokenizer: ``<|startoftext|>`` (49406) begins, ``<|endoftext|>`` (49407) ends and pads.
    ``max_length`` is the text encoder's window (CLIP's is 77; the shapes model uses a shorter one)."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab_and_merges()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=max_length,
                         bos_token=SPECIALS[0], eos_token=SPECIALS[1], pad_token=SPECIALS[1], unk_token=SPECIALS[1])
