#!/usr/bin/env python3
"""Build the evidence corpus for the stability runs (issue 6): npm prose packages -> cleaned,
de-duplicated passages -> train/valid split -> byte-level BPE -> Megatron indexed datasets.

    python tools/prepare_corpus.py --out data/corpus [--vocab-size 16000] [--cache DIR] [--offline]

Writes ``OUT/tokenizer/`` (vocab.json, merges.txt, tokenizer.json, tokenizer_config.json),
``OUT/corpus_{train,valid}_text_document.{bin,idx}`` and ``OUT/manifest.json`` (sources, licences,
checksums, sizes, counts). Train with e.g.

    --train-data-path OUT/corpus_train_text_document --valid-data-path OUT/corpus_valid_text_document
    --tokenizer-type HuggingFaceTokenizer --tokenizer-model OUT/tokenizer

(Megatron-Core 0.19's ``GPT2BPETokenizer`` loads ``gpt2`` from the Hugging Face hub whatever
``--vocab-file`` says, so it does not use this vocabulary.)

Sources, licences and cleaning rules: ``megatron_mhc/tools/corpus.py``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv=None) -> int:
    """Command-line entry point."""
    from tqdm import tqdm

    from megatron_mhc.tools import corpus

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--cache", type=Path, default=None,
                        help="where the npm tarballs are kept (default OUT/npm)")
    parser.add_argument("--offline", action="store_true",
                        help="use only tarballs already in --cache")
    parser.add_argument("--vocab-size", type=int, default=16000,
                        help="BPE vocabulary (the evidence runs use 8k-16k; allowed 512..65535)")
    parser.add_argument("--val-fraction", type=float, default=0.02)
    parser.add_argument("--passage-chars", type=int, default=4000)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    if not 512 <= args.vocab_size <= 65535:
        parser.error(f"--vocab-size {args.vocab_size}: allowed 512..65535")
    if not 0 < args.val_fraction < 0.5:
        parser.error(f"--val-fraction {args.val_fraction}: allowed (0, 0.5)")
    manifest_path = args.out / "manifest.json"
    if manifest_path.exists() and not args.overwrite:
        parser.error(f"{args.out} already holds a corpus; pass --overwrite to rebuild it")
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        with tqdm(total=len(corpus.SOURCES), desc="sources", unit="pkg") as bar:
            tarballs = corpus.fetch_sources(args.cache or args.out / "npm", args.offline, bar)
    except corpus.CorpusError as exc:
        print(f"prepare_corpus: {exc}", file=sys.stderr)
        return 2
    split = corpus.split_passages(corpus.documents(tarballs), args.val_fraction,
                                  args.passage_chars)
    print(f"passages: {len(split.train)} train, {len(split.valid)} valid, "
          f"{split.duplicates} repeated paragraphs/sentences dropped; characters by source: "
          f"{split.chars_by_source}")
    tokenizer = corpus.train_tokenizer(split.train, args.vocab_size, args.out / "tokenizer")
    counts = {}
    for name, texts in (("train", split.train), ("valid", split.valid)):
        with tqdm(total=len(texts), desc=f"tokenise {name}", unit="passage") as bar:
            counts[name] = corpus.write_indexed_dataset(
                tokenizer, texts, args.out / f"corpus_{name}_text_document", bar)
    manifest = {
        "sources": [{"package": s.name, "version": s.version, "sha256": s.sha256,
                     "licence": s.licence, "url": s.url} for s in corpus.SOURCES],
        "characters_by_source": split.chars_by_source,
        "passages": {"train": len(split.train), "valid": len(split.valid)},
        "duplicates_dropped": split.duplicates,
        "tokens": counts,
        "vocab_size": tokenizer.get_vocab_size(),
        "eod_token": corpus.EOD_TOKEN,
    }
    manifest_path.write_text(json.dumps(manifest, indent=1))
    print(json.dumps({k: manifest[k] for k in ("tokens", "vocab_size", "passages")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
