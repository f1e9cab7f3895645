"""Rebuild CLIP's BPE vocabulary (vocab.json, merges.txt) from the BPE merge list.

The hub's tokenizer files cannot be downloaded here, but the open_clip_torch wheel (MIT licence)
carries CLIP's merge list as ``open_clip/bpe_simple_vocab_16e6.txt.gz``. CLIP derives its
49,408-token vocabulary from that list deterministically; this script repeats that derivation
so transformers' ``CLIPTokenizer`` can be built offline. The output is committed under
``src/diffmem/assets/clip_tokenizer``; run this only to regenerate it:

    pip download --no-deps open_clip_torch -d /tmp/oc
    python tools/derive_clip_tokenizer.py /tmp/oc/open_clip_torch-*.whl
"""

from __future__ import annotations

import gzip
import json
import sys
import zipfile
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "src/diffmem/assets/clip_tokenizer"
MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"


def bytes_to_unicode() -> dict[int, str]:
    # CLIP (like GPT-2) maps every byte to a printable unicode character so BPE never sees
    # whitespace or control bytes.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def derive(bpe_gz: bytes) -> tuple[dict[str, int], list[str]]:
    lines = gzip.decompress(bpe_gz).decode("utf-8").split("\n")
    # CLIP keeps merges 1 .. 49152-256-2 of the file (line 0 is a version header).
    merges = lines[1 : 49152 - 256 - 2 + 1]
    byte_tokens = list(bytes_to_unicode().values())
    tokens = byte_tokens + [t + "</w>" for t in byte_tokens]
    tokens += ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def main(wheel: str) -> None:
    with zipfile.ZipFile(wheel) as z:
        vocab, merges = derive(z.read(MEMBER))
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (OUT / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    print(f"wrote {len(vocab)} tokens and {len(merges)} merges to {OUT}")


if __name__ == "__main__":
    main(sys.argv[1])
