"""Pack the shapes world's LLM (all-MiniLM-L6-v2) small enough to carry to a lent GPU machine beside a bundle.

A call to the GPU machine carries at most 64 MiB, and MiniLM in fp16 is 45 MB; with the wheels and a
trained base (12 MiB) it does not fit. The world's captions use a few hundred of MiniLM's 30,522
word pieces, so this writes a copy whose other rows of the word-embedding table are zero and
compresses it (tar.xz, ~20 MB). For every caption the recipe trains or evaluates on, the copy gives
bit-identical features: the rows it zeroes are never looked up. It is only for carrying: the weights
that ship and everything on this machine use the real package.

    python benchmarks/shapes_pack_llm.py            # -> .whl/minilm.tar.xz
    (the GPU job unpacks it and stands in for the package with a module whose get_model_path() points at it)

Coverage is checked, not assumed: the kept pieces are those of every word the world's language can emit
(``ella.shapes.language.VOCABULARY``: training and held-out wording, each word one word piece), digits and
punctuation, and of sample captions of every kind; then 20,000 training captions and 2,000 prompts of each
evaluation kind from another seed must need nothing more.
"""

from __future__ import annotations

import argparse
import io
import json
import lzma
import tarfile
import tempfile
from pathlib import Path

import torch
from transformers import AutoModel, AutoTokenizer

from ella.shapes.captions import KINDS, caption_for, prompt_for
from ella.shapes.evaluate import EVAL_SEED_OFFSET
from ella.shapes.language import VOCABULARY
from ella.shapes.models import minilm_path


def used_ids(tokenizer, captions: list[str]) -> set[int]:
    ids: set[int] = set(tokenizer.all_special_ids)
    for start in range(0, len(captions), 4096):
        for row in tokenizer(captions[start : start + 4096])["input_ids"]:
            ids.update(row)
    return ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=".whl/minilm.tar.xz")
    args = parser.parse_args()

    source = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModel.from_pretrained(source, torch_dtype=torch.float16)
    captions = [" ".join(sorted(VOCABULARY)), "0 1 2 3 4 5 6 7 8 9 . , ; : ( ) - ' \" ! ?"]
    captions += [caption_for(0, i) for i in range(2000)]
    captions += [prompt_for(EVAL_SEED_OFFSET, i, kind).text for kind in KINDS for i in range(500)]
    keep = used_ids(tokenizer, captions)
    check = [caption_for(7, i) for i in range(20_000)] + [
        prompt_for(7, i, kind).text for kind in KINDS for i in range(2000)
    ]
    extra = used_ids(tokenizer, check) - keep
    if extra:
        raise SystemExit(
            f"captions of another seed use {len(extra)} word pieces the packed copy would zero: "
            f"{tokenizer.convert_ids_to_tokens(sorted(extra))[:10]}"
        )
    table = model.embeddings.word_embeddings.weight
    with torch.no_grad():
        mask = torch.zeros(table.shape[0], dtype=torch.bool)
        mask[sorted(keep)] = True
        table[~mask] = 0
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        Path(tmp, "packed.json").write_text(json.dumps({"kept_word_pieces": len(keep), "source": str(source)}))
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for f in sorted(Path(tmp).iterdir()):
                tar.add(f, arcname=f.name)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    part = out.with_name(out.name + ".part")
    part.write_bytes(lzma.compress(buf.getvalue(), preset=6))
    part.replace(out)
    print(f"{out}: {out.stat().st_size / 2**20:.1f} MiB, {len(keep)} of {table.shape[0]} word pieces kept")


if __name__ == "__main__":
    main()
