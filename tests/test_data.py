"""Data sources: the split each purpose reads from a named or Hub dataset (the Hub itself is not reached)."""

import pytest

from llmprune import data


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
