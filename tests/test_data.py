import collections
import itertools
import json
import random
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from dsv2_jax.train.data import data_checkpoint_args, default_corpus, make_dataset
from dsv2_jax.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
KEYS = {"inputs": np.int32, "targets": np.int32, "segment_ids": np.int32, "positions": np.int32,
        "loss_mask": np.float32}


def _docs(n, lo=3, hi=20, seed=0):
    """Distinct random lowercase documents, so a lost or duplicated one is visible."""
    rng = random.Random(seed)
    return [f"{i}:" + "".join(rng.choices("abcdefghij ", k=rng.randint(lo, hi))) for i in range(n)]


def _jsonl(path, docs, field="text"):
    path.write_text("".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)))
    return path


def _segments(batch):
    """Token arrays of every packed segment in a batch."""
    out = []
    for inp, seg in zip(batch["inputs"], batch["segment_ids"]):
        out += [inp[seg == s] for s in np.unique(seg[seg > 0])]
    return out


def _decoded(batches):
    return sorted(TOK.decode(s) for b in batches for s in _segments(b))


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)


def _check_packing(batch, seq_len, pad_id=TOK.pad_id):
    for k, dtype in KEYS.items():
        assert batch[k].dtype == dtype and batch[k].shape == batch["inputs"].shape
    assert batch["inputs"].shape[1] == seq_len
    for inp, tgt, seg, pos, mask in zip(*(batch[k] for k in KEYS)):
        real = seg > 0
        # Padding only after all segments; ids 1..k each one contiguous run.
        n_real = int(real.sum())
        assert real[:n_real].all() and not real[n_real:].any()
        ids = [s for s, _ in itertools.groupby(seg[:n_real])]
        assert ids == list(range(1, len(ids) + 1))
        for s in ids:
            idx = np.flatnonzero(seg == s)
            np.testing.assert_array_equal(pos[idx], np.arange(len(idx)))
            np.testing.assert_array_equal(tgt[idx[:-1]], inp[idx[1:]])
            assert mask[idx[:-1]].all() and mask[idx[-1]] == 0 and tgt[idx[-1]] == pad_id
        assert (mask[~real] == 0).all() and (inp[~real] == pad_id).all() and (tgt[~real] == pad_id).all()


def test_default_corpus_is_stdlib_python():
    paths = default_corpus()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    assert len(paths) > 100 and paths == sorted(paths) and paths == default_corpus()
    assert all(p.endswith(".py") and Path(p).is_relative_to(stdlib) and "site-packages" not in p for p in paths)
    assert str(stdlib / "os.py") in paths


def test_default_corpus_pipeline():
    it = iter(make_dataset(None, TOK, seq_len=64, global_batch=4, seed=0, shuffle_window=16))
    for b in _take(it, 3):
        _check_packing(b, 64)
        assert b["loss_mask"].mean() > 0.9  # long source files fill the rows


def test_one_epoch_packing_invariants_and_no_loss(tmp_path):
    docs = _docs(40)
    ds = make_dataset(_jsonl(tmp_path / "d.jsonl", docs), TOK, seq_len=48, global_batch=4, seed=3,
                      num_epochs=1)
    batches = list(ds)
    for b in batches:
        _check_packing(b, 48)
    assert _decoded(batches) == sorted(docs)  # every document exactly once
    segs = [s for b in batches for s in _segments(b)]
    assert all(s[0] == TOK.bos_id and s[-1] == TOK.eos_id for s in segs)
    assert sum(len(s) for s in segs) == sum(len(d) + 2 for d in docs)


def test_long_documents_split_keeping_every_transition(tmp_path):
    rng = np.random.default_rng(0)
    docs = ["".join(rng.choice(list("abcdefghijklmnop"), size=n)) for n in (5, 90, 200, 31, 30)]
    for i, d in enumerate(docs):
        (tmp_path / f"{i}.txt").write_text(d)
    batches = list(make_dataset(tmp_path, TOK, seq_len=32, global_batch=2, seed=1, num_epochs=1))
    got = collections.Counter()
    for b in batches:
        _check_packing(b, 32)
        got.update(zip(b["inputs"][b["loss_mask"] > 0].tolist(), b["targets"][b["loss_mask"] > 0].tolist()))
    want = collections.Counter()
    for d in docs:
        ids = [TOK.bos_id, *TOK.encode(d), TOK.eos_id]
        want.update(zip(ids[:-1], ids[1:]))
    assert got == want


def test_last_partial_batch_is_padded(tmp_path):
    (tmp_path / "a.txt").write_text("tiny")
    (b,) = list(make_dataset(tmp_path / "a.txt", TOK, seq_len=16, global_batch=4, num_epochs=1))
    _check_packing(b, 16)
    assert b["inputs"].shape == (4, 16) and (b["segment_ids"][1:] == 0).all()


def test_sources_text_dir_jsonl_field_and_array_record(tmp_path):
    from array_record.python.array_record_module import ArrayRecordWriter

    d = tmp_path / "dir"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text("alpha")
    (d / "sub" / "b.py").write_text("print('beta')")
    (d / "c.md").write_text("# gamma ünï")
    (d / "empty.txt").write_text("")
    (d / "skip.bin").write_bytes(b"\x00ignored")
    _jsonl(tmp_path / "j.jsonl", ["delta", "", "epsilon"], field="body")
    w = ArrayRecordWriter(str(tmp_path / "r.array_record"), "group_size:1")
    for rec in (b"zeta raw", json.dumps({"body": "eta json"}).encode(), b"{theta not json"):
        w.write(rec)
    w.close()
    single = tmp_path / "notes.log"
    single.write_text("iota")
    sources = [d, tmp_path / "j.jsonl", str(tmp_path / "r.array_record"), single]
    batches = list(make_dataset(sources, TOK, seq_len=24, global_batch=2, seed=0, num_epochs=1,
                                text_field="body"))
    want = ["alpha", "print('beta')", "# gamma ünï", "delta", "epsilon", "zeta raw", "eta json",
            "{theta not json", "iota"]
    assert _decoded(batches) == sorted(want)


def test_determinism_and_seed_sensitivity():
    corpus = default_corpus()[:30]

    def first(seed):
        return _take(iter(make_dataset(corpus, TOK, 32, 4, seed=seed, shuffle_window=64)), 4)

    a = first(7)
    _assert_same(a, first(7))
    assert any(not np.array_equal(x["inputs"], y["inputs"]) for x, y in zip(a, first(8)))


def test_exact_resume_across_epochs(tmp_path):
    # 12 short docs over batches of 4 rows x 24 tokens: a few batches per epoch,
    # so N + M batches cross several epoch boundaries.
    path = _jsonl(tmp_path / "d.jsonl", _docs(12))
    ds = make_dataset(path, TOK, seq_len=24, global_batch=4, seed=5, shuffle_window=8)
    it = iter(ds)
    _take(it, 7)
    state = json.loads(json.dumps(it.get_state()))  # must survive JSON
    expected = _take(it, 9)
    fresh = iter(make_dataset(path, TOK, seq_len=24, global_batch=4, seed=5, shuffle_window=8))
    fresh.set_state(state)
    _assert_same(_take(fresh, 9), expected)


def test_orbax_checkpoint_round_trip(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    corpus = default_corpus()[:20]
    it = iter(make_dataset(corpus, TOK, 32, 2, seed=1, shuffle_window=32))
    _take(it, 5)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.save(5, args=ocp.args.Composite(data=data_checkpoint_args(it)))
        mngr.wait_until_finished()
        expected = _take(it, 4)
        fresh = iter(make_dataset(corpus, TOK, 32, 2, seed=1, shuffle_window=32))
        mngr.restore(5, args=ocp.args.Composite(data=data_checkpoint_args(fresh, restore=True)))
    _assert_same(_take(fresh, 4), expected)


def test_per_host_sharding(tmp_path):
    docs = _docs(30, seed=1)
    path = _jsonl(tmp_path / "d.jsonl", docs)
    per_host = []
    for pi in range(3):
        batches = list(make_dataset(path, TOK, 32, global_batch=6, seed=2, num_epochs=1,
                                    process_index=pi, process_count=3))
        assert all(b["inputs"].shape == (2, 32) for b in batches)
        per_host.append(_decoded(batches))
    assert all(len(h) == 10 for h in per_host)
    assert sorted(itertools.chain(*per_host)) == sorted(docs)  # disjoint and complete
    again = list(make_dataset(path, TOK, 32, global_batch=6, seed=2, num_epochs=1, process_index=1,
                              process_count=3))
    assert _decoded(again) == per_host[1]


def test_hf_tokenizer_without_specials_in_pipeline(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from dsv2_jax.tokenizer import load_tokenizer

    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.train_from_iterator(_docs(20), trainers.BpeTrainer(vocab_size=80, special_tokens=["<unk>"]))
    raw.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(tmp_path)
    docs = _docs(10, seed=3)
    batches = list(make_dataset(_jsonl(tmp_path / "d.jsonl", docs), tok, 16, 2, num_epochs=1))
    for b in batches:
        _check_packing(b, 16, pad_id=0)
    n_tokens = sum(int((b["segment_ids"] > 0).sum()) for b in batches)
    assert n_tokens == sum(len(tok.encode(d)) for d in docs)


@pytest.mark.parametrize("case, exc, match", [
    ("missing", FileNotFoundError, "does not exist: .*nope"),
    ("empty_dir", ValueError, "no usable files in directory"),
    ("empty_file", ValueError, "empty corpus"),
    ("empty_jsonl", ValueError, "empty corpus"),
    ("bad_json", ValueError, r"bad\.jsonl:2: line is not valid JSON"),
    ("no_field", ValueError, r"nofield\.jsonl:1: JSON object lacks string field 'text'"),
    ("seq_len", ValueError, "seq_len must be >= 2"),
    ("batch", ValueError, "multiple of process_count"),
    ("index", ValueError, "process_index 2 not in"),
    ("few_docs", ValueError, "fewer than process_count"),
])
def test_bad_inputs(tmp_path, case, exc, match):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "x.bin").write_bytes(b"1")
    (tmp_path / "blank.txt").write_text("")
    _jsonl(tmp_path / "blank.jsonl", ["", ""])
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{oops\n')
    (tmp_path / "nofield.jsonl").write_text('{"body": "x"}\n')
    good = _jsonl(tmp_path / "good.jsonl", ["a", "b"])
    kwargs = dict(sources=good, tokenizer=TOK, seq_len=8, global_batch=2)
    kwargs.update({
        "missing": dict(sources=tmp_path / "nope"),
        "empty_dir": dict(sources=tmp_path / "empty"),
        "empty_file": dict(sources=[tmp_path / "blank.txt"]),
        "empty_jsonl": dict(sources=tmp_path / "blank.jsonl"),
        "bad_json": dict(sources=tmp_path / "bad.jsonl"),
        "no_field": dict(sources=tmp_path / "nofield.jsonl"),
        "seq_len": dict(seq_len=1),
        "batch": dict(global_batch=3, process_count=2, process_index=0),
        "index": dict(process_count=2, process_index=2),
        "few_docs": dict(global_batch=4, process_count=4, process_index=0),
    }[case])
    with pytest.raises(exc, match=match):
        make_dataset(**kwargs)


def test_whitespace_only_corpus_has_no_tokens(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    raw = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.save(str(tmp_path / "tokenizer.json"))
    from dsv2_jax.tokenizer import load_tokenizer

    (tmp_path / "ws.txt").write_text("   \n\t ")
    with pytest.raises(ValueError, match="no tokens"):
        make_dataset(tmp_path / "ws.txt", load_tokenizer(tmp_path), 8, 2)
