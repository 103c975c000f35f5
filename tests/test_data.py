"""Data sources: the split each purpose reads from a named or Hub dataset (the Hub itself is not reached)."""

import pytest

from llmprune import data


@pytest.mark.needs("datasets")
@pytest.mark.parametrize("source", ["wikitext2", "hf:someone/corpus", "hf:someone/corpus:cfg"])
def test_recovery_trains_on_the_train_split_and_eval_reads_the_test_split(monkeypatch, source):
    import datasets

    seen = []

    def fake_load_dataset(name, config=None, split=None, **kwargs):
        seen.append(split)
        return datasets.Dataset.from_dict({"text": [f"{split} text"]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    texts = {p: data.load_text(source, p) for p in ("calibration", "training", "evaluation")}
    train, test = seen[0], seen[2]
    assert seen[1] == train != test and "test" in test
    assert texts["training"] == texts["calibration"] != texts["evaluation"]


def test_a_large_text_is_tokenized_in_pieces_at_document_boundaries(monkeypatch):
    """Past ``ONE_CALL_CHARS`` the text is tokenized a few pieces at a time, each ending at the blank line between
    documents: the pieces join to the text, the ids decode to it, and they differ from one call's only at the
    boundaries (at most a few tokens each)."""
    import tiny

    tok = tiny.tokenizer()
    docs = [f"Document {i}: " + " ".join(f"word{(i * 7 + j) % 53}" for j in range(40 + i % 17)) for i in range(300)]
    text = "\n\n".join(docs)
    whole = data.tokenize(tok, text)  # below the threshold: one call
    monkeypatch.setattr(data, "ONE_CALL_CHARS", 1000)
    monkeypatch.setattr(data, "PIECE_CHARS", 2000)
    parts = data.pieces(text, 2000)
    assert "".join(parts) == text and len(parts) > 20
    assert all(p.endswith("\n\n") for p in parts[:-1]) and all(len(p) >= 2000 for p in parts[:-1])
    calls = []

    def counting(texts, **kw):
        calls.append(len(texts))
        return tok(texts, **kw)

    cut = data.tokenize(counting, text)
    assert sum(calls) == len(parts) and max(calls) <= 4  # every piece, a few per call
    assert tok.decode(cut.tolist()) == text
    assert cut.dtype == whole.dtype == __import__("torch").long
    assert abs(cut.numel() - whole.numel()) <= 2 * len(parts)


def test_a_text_without_document_boundaries_stays_one_piece():
    assert data.pieces("x" * 5000, 1000) == ["x" * 5000]


def test_the_second_domain_is_the_prose_of_restructured_text():
    """benchmarks/assets.rst_text: paragraphs on one line, roles read as their text, code and markup gone, the
    bodies of notes kept."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import assets

    raw = """=====
Title
=====

.. _target-label:

We'll assume you have :doc:`Django installed </intro/install>` and a
:class:`~django.db.models.QuerySet`, see ``manage.py``.

* first item
* second item

Run this::

    $ python -m django --version

.. code-block:: python

    import this

.. note::

    A note's body is prose,
    kept as one paragraph.

.. toctree::
   :maxdepth: 1

   intro/index
"""
    assert assets.rst_text(raw).split("\n\n") == [
        "Title",
        "We'll assume you have Django installed and a QuerySet, see manage.py.",
        "first item second item",
        "Run this:",
        "A note's body is prose, kept as one paragraph.",
    ]
