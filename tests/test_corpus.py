"""Tests of imagelm.corpus that need pytest's fixtures: environment variables, temporary folders,
monkeypatching and subprocesses. The notebook nbs/00_corpus.ipynb checks the rest."""
import itertools
import os
import subprocess
import sys

import pytest

from imagelm import corpus as corpus_module
from imagelm.corpus import (Corpus, build_embedded_corpus, corpus_cache_path, get_base_dir, hash_documents,
                            iter_document_batches, load_embedded_corpus, read_corpus)

TOY_TRAIN, TOY_VAL = ["first document", "second document"], ["held out"]
TOY_CORPUS = Corpus(TOY_TRAIN, TOY_VAL, hash_documents(TOY_TRAIN, TOY_VAL))


@pytest.fixture
def base_dir(monkeypatch, tmp_path):
    "A fresh base dir, an empty in-process cache, and a builder that returns the toy corpus at once."
    monkeypatch.setenv("IMAGELM_BASE_DIR", str(tmp_path / "base"))
    monkeypatch.setattr(corpus_module, "_loaded_corpora", {})
    monkeypatch.setattr(corpus_module, "build_embedded_corpus", lambda: TOY_CORPUS)
    return tmp_path / "base"


def test_base_dir_from_env_or_home(monkeypatch, tmp_path):
    monkeypatch.setenv("IMAGELM_BASE_DIR", str(tmp_path / "custom"))
    assert get_base_dir() == tmp_path / "custom" and get_base_dir().is_dir()
    monkeypatch.delenv("IMAGELM_BASE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert get_base_dir() == tmp_path / "home" / ".cache" / "imagelm"


def test_cold_load_builds_and_caches(base_dir):
    assert load_embedded_corpus() == TOY_CORPUS
    assert read_corpus(corpus_cache_path()) == TOY_CORPUS
    assert corpus_cache_path().parent.parent == base_dir
    assert os.listdir(corpus_cache_path().parent) == [corpus_cache_path().name]  # no temporary file left


@pytest.mark.parametrize("garbage", ["", "{not json", "[1, 2]", '{"train": 1}', "\x00\xff"])
def test_corrupt_cache_is_rebuilt(base_dir, garbage):
    corpus_cache_path().parent.mkdir(parents=True)
    corpus_cache_path().write_text(garbage)
    assert load_embedded_corpus() == TOY_CORPUS
    assert read_corpus(corpus_cache_path()) == TOY_CORPUS


def test_second_load_comes_from_memory(base_dir):
    first = load_embedded_corpus()
    corpus_cache_path().unlink()
    assert load_embedded_corpus() is first
    assert not corpus_cache_path().exists()


def test_unwritable_cache_warns_and_still_loads(base_dir, monkeypatch):
    def fail_to_save(corpus, path): raise PermissionError("read-only")
    monkeypatch.setattr(corpus_module, "save_corpus", fail_to_save)
    with pytest.warns(UserWarning, match="could not cache"):
        assert load_embedded_corpus() == TOY_CORPUS


@pytest.mark.slow
def test_build_is_the_same_in_another_process():
    "Ranks of one run build the corpus separately; they must agree (string hashing is salted per process)."
    code = "from imagelm.corpus import build_embedded_corpus; print(build_embedded_corpus().content_hash)"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": "12345"})
    built = build_embedded_corpus()
    assert other.stdout.strip() == built.content_hash
    assert sum(built.char_counts.values()) >= 2_000_000


@pytest.mark.parametrize("n_docs,row_group_size,batch_size,world_size",
                         itertools.product([0, 1, 10, 23], [1, 4], [1, 3, 8], [1, 2, 3]))
def test_ranks_cover_every_document_once_and_resume_anywhere(n_docs, row_group_size, batch_size, world_size):
    docs = [f"doc{i}" for i in range(n_docs)]
    seen = []
    for rank in range(world_size):
        batches = list(iter_document_batches(docs, batch_size, rank, world_size, row_group_size=row_group_size))
        assert all(1 <= len(batch) <= batch_size for batch, _ in batches)
        seen += [doc for batch, _ in batches for doc in batch]
        for i, (_, position) in enumerate(batches):  # resuming loses nothing that comes after batch i
            resumed = [doc for batch, _ in iter_document_batches(docs, batch_size, rank, world_size, position,
                                                                 row_group_size) for doc in batch]
            rest = [doc for batch, _ in batches[i + 1:] for doc in batch]
            reread = len(resumed) - len(rest)  # the unfinished part of the current row group
            assert 0 <= reread < row_group_size and resumed[reread:] == rest
    assert sorted(seen) == sorted(docs)


@pytest.mark.parametrize("kwargs,argument", [(dict(world_size=0), "world_size"), (dict(rank=-1), "rank"),
                                             (dict(rank=1, world_size=1), "rank"), (dict(batch_size=0), "batch_size"),
                                             (dict(row_group_size=0), "row_group_size"), (dict(start=-1), "start")])
def test_bad_arguments_name_themselves(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        iter_document_batches(["doc"], **{"batch_size": 4, **kwargs})
