"""TitansSequenceClassifier, its network, and the titans-genomics CLI (tiny models, CPU)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import polars as pl
import pytest
import torch
from sklearn.base import clone

from titans_genomics.classifier import TitansSequenceClassifier
from titans_genomics.cli import main as cli_main
from titans_genomics.datasets import load_gue
from titans_genomics.fasta import read_fasta
from titans_genomics.module import TitansSequenceNetwork
from titans_genomics.tokenizer import NucleotideTokenizer, reverse_complement
from titans_memory import MemoryConfig, TitansConfig
from titans_memory.errors import CheckpointError, DataError, NotFittedError, ShapeError, StateError, TitansError

DATA = Path(os.environ.get("TITANS_TEST_DATA") or Path(__file__).resolve().parents[1].parent / "shared" / "data")
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"shared data not found at {DATA}")

TINY = dict(
    d_model=16, n_layers=1, n_heads=2, memory_depth=2, memory_expansion=1, chunk_size=16, ffn_mult=1,
    dropout=0.0, batch_size=32, warmup_steps=0, device="cpu", random_state=0, enable_progress_bar=False,
)


@pytest.fixture(autouse=True, scope="module")
def _env(tmp_path_factory):
    """One CPU thread (tiny tensors; avoids oversubscription on shared runners), caches in tmp."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TITANS_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        yield
    torch.set_num_threads(threads)


def gc_at(n: int, length: int = 60, seed: int = 0):
    """GC-rich ('GC') vs AT-rich ('AT') random sequences: a trivially separable task."""
    rng = np.random.default_rng(seed)
    seqs, labels = [], []
    for i in range(n):
        rich = i % 2 == 0
        strong = rng.random(length) < (0.85 if rich else 0.15)
        s = np.where(strong, rng.choice(list("GC"), length), rng.choice(list("AT"), length))
        seqs.append("".join(s))
        labels.append("GC" if rich else "AT")
    return seqs, labels


def random_dna(n: int, seed: int = 0) -> str:
    return "".join(np.random.default_rng(seed).choice(list("ACGT"), n))


@pytest.fixture(scope="module")
def fitted():
    X, y = gc_at(200, seed=1)
    clf = TitansSequenceClassifier(max_epochs=6, learning_rate=1e-2, **TINY)
    return clf.fit(X, y)


def write_fasta(path: Path, records) -> Path:
    with open(path, "w") as f:
        for name, seq in records:
            f.write(f">{name}\n")
            for i in range(0, len(seq), 60):
                f.write(seq[i : i + 60] + "\n")
    return path


# ------------------------------------------------------------------------------------------- fit
def test_learns_gc_vs_at(fitted):
    Xt, yt = gc_at(100, seed=2)
    assert fitted.score(Xt, yt) > 0.9
    assert list(fitted.classes_) == ["AT", "GC"]
    assert len(fitted.history_) >= 1 and "val_loss" in fitted.history_[0]
    assert np.isfinite(fitted.best_val_loss_)


@needs_data
def test_fit_predict_real_gue_slice():
    tr = load_gue("prom/prom_core_tata", "train", data_dir=DATA).sample(192, random_state=0)
    te = load_gue("prom/prom_core_tata", "test", data_dir=DATA).iloc[:40]
    names = {0: "background", 1: "promoter"}
    clf = TitansSequenceClassifier(max_epochs=1, **TINY)
    clf.fit(tr["sequence"].tolist(), tr["label"].map(names))
    proba = clf.predict_proba(te["sequence"].tolist())
    assert proba.shape == (40, 2)
    np.testing.assert_allclose(proba.sum(1), 1.0, atol=1e-9)
    assert (proba >= 0).all()
    pred = clf.predict(te["sequence"].tolist())
    assert pred.shape == (40,) and set(pred) <= {"background", "promoter"}
    assert list(clf.classes_) == ["background", "promoter"]
    assert 0.0 <= clf.score(te["sequence"].tolist(), te["label"].map(names)) <= 1.0
    d = clf.decision_function(te["sequence"].tolist())
    assert d.shape == (40,)
    np.testing.assert_allclose(d, np.log(proba[:, 1]) - np.log(proba[:, 0]), rtol=1e-6, atol=1e-9)


def test_dataframe_inputs_and_multiclass():
    X, _ = gc_at(60, seed=3)
    y = np.array([0, 1, 2] * 20)
    df = pd.DataFrame({"seq": X, "cls": y})
    clf = TitansSequenceClassifier(max_epochs=1, sequence_col="seq", label_col="cls", **TINY)
    clf.fit(df)
    assert clf.classes_.tolist() == [0, 1, 2]
    p = clf.predict_proba(pl.from_pandas(df))
    assert p.shape == (60, 3)
    np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-9)
    assert 0.0 <= clf.score(df) <= 1.0  # labels from the DataFrame column
    assert clf.predict(df[["seq"]]).dtype.kind == "i"
    # explicit validation data
    clf2 = TitansSequenceClassifier(max_epochs=1, **{**TINY, "random_state": 1})
    clf2.fit(X[:40], y[:40], X_val=X[40:], y_val=y[40:])
    assert "val_loss" in clf2.history_[0]


def test_sklearn_params_and_clone():
    clf = TitansSequenceClassifier(d_model=32, variant="mag", rc_average=False)
    params = clf.get_params()
    assert params["d_model"] == 32 and params["variant"] == "mag" and params["rc_average"] is False
    assert clf.set_params(d_model=64, max_epochs=2) is clf
    assert clf.d_model == 64 and clf.max_epochs == 2
    c = clone(clf)
    assert c is not clf and c.get_params() == clf.get_params()
    assert not hasattr(c, "model_")
    with pytest.raises(ValueError):
        clf.set_params(no_such_param=1)
    with pytest.raises(NotFittedError):
        c.predict(["ACGT"])


def test_input_errors(fitted):
    clf = TitansSequenceClassifier(max_epochs=1, **TINY)
    with pytest.raises(DataError, match="at least two classes"):
        clf.fit(["ACGT", "ACGA"], ["a", "a"])
    with pytest.raises(ShapeError):
        clf.fit(["ACGT", "ACGA"], ["a"])
    with pytest.raises(DataError, match="labels"):
        clf.fit(["ACGT", "ACGA"])
    with pytest.raises(DataError, match="position 2"):
        fitted.predict(["ACXT"])
    with pytest.raises(DataError, match="empty"):
        fitted.predict(["ACGT", ""])
    with pytest.raises(DataError, match="not among the training classes"):
        clf.fit(["ACGT", "ACGA"], ["a", "b"], X_val=["ACGT"], y_val=["c"])
    with pytest.raises(DataError):
        fitted.predict("ACGT")  # a bare string is neither a list nor a FASTA path


# ----------------------------------------------------------------------------- padding and strands
@pytest.mark.parametrize("variant", ["lmm", "mac", "mag", "mal"])
@pytest.mark.parametrize("pooling", ["mean", "mean+last"])
def test_padding_does_not_change_prediction(variant, pooling):
    cfg = TitansConfig(d_model=16, n_layers=2, n_heads=2, variant=variant, memory=MemoryConfig(chunk_size=8, expansion=1),
                       ffn_mult=1, segment_size=16, window_size=16, persistent_tokens=2)
    net = TitansSequenceNetwork(cfg, n_classes=3, pooling=pooling).eval()
    tok = NucleotideTokenizer()
    short, long = random_dna(37, 1), random_dna(101, 2)
    alone = tok.batch_encode([short])
    padded = tok.batch_encode([short, long], pad_to_multiple_of=16)
    with torch.no_grad():
        a = net(alone["input_ids"], alone["attention_mask"])
        b = net(padded["input_ids"], padded["attention_mask"])[:1]
        # pad tokens with garbage ids must not matter either: the mask decides
        ids = padded["input_ids"].clone()
        ids[~padded["attention_mask"]] = 5
        c = net(ids, padded["attention_mask"])[:1]
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)


def test_padding_invariance_through_estimator(fitted):
    s = random_dna(45, 3)
    alone = fitted.predict_proba([s])
    with_longer = fitted.predict_proba([s, random_dna(300, 4), random_dna(120, 5)])[:1]
    np.testing.assert_allclose(alone, with_longer, rtol=1e-5, atol=1e-6)


def test_rc_average_is_strand_symmetric(fitted):
    seqs = [random_dna(50, 6), random_dna(77, 7)]
    rcs = [reverse_complement(s) for s in seqs]
    np.testing.assert_allclose(fitted.predict_proba(seqs), fitted.predict_proba(rcs), rtol=1e-6, atol=1e-7)
    single = clone(fitted).set_params(rc_average=False)
    single.__dict__.update({k: v for k, v in fitted.__dict__.items() if k.endswith("_")})
    one_strand = single.predict_proba(seqs)
    both = (one_strand + single.predict_proba(rcs)) / 2
    np.testing.assert_allclose(fitted.predict_proba(seqs), both, rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------------------- persistence
def test_save_load_roundtrip(fitted, tmp_path):
    X, _ = gc_at(20, seed=8)
    out = fitted.save(tmp_path / "model")
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    loaded = TitansSequenceClassifier.load(out)
    np.testing.assert_array_equal(loaded.predict_proba(X), fitted.predict_proba(X))
    assert loaded.classes_.tolist() == fitted.classes_.tolist() and loaded.classes_.dtype == fitted.classes_.dtype
    assert loaded.get_params() == fitted.get_params()
    assert loaded.history_ == fitted.history_
    with pytest.raises(CheckpointError):
        TitansSequenceClassifier.load(tmp_path / "missing")
    (out / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError):
        TitansSequenceClassifier.load(out)


# --------------------------------------------------------------------------------------------- FASTA
@needs_data
def test_fasta_inputs_real_oct4_mafk(tmp_path):
    oct4 = list(read_fasta(DATA / "fasta" / "sample.fa"))[:48]
    mafk = list(read_fasta(DATA / "fasta" / "sample2.fa"))[:48]
    fa = write_fasta(tmp_path / "oct4.fa", oct4)
    fb = write_fasta(tmp_path / "mafk.fa", mafk)
    clf = TitansSequenceClassifier(max_epochs=1, **TINY).fit({"Oct4": fa, "MafK": str(fb)})
    assert clf.classes_.tolist() == ["MafK", "Oct4"]
    p = clf.predict_proba(DATA / "fasta" / "sample_test.fa")  # a single FASTA path
    assert p.shape == (100, 2)
    np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-9)
    # list of files with one label per file (labels may repeat)
    clf2 = TitansSequenceClassifier(max_epochs=1, **TINY).fit([fa, fb, fa], ["Oct4", "MafK", "Oct4"])
    assert clf2.classes_.tolist() == ["MafK", "Oct4"]
    acc = clf2.score({"Oct4": DATA / "fasta" / "sample_test.fa", "MafK": DATA / "fasta" / "sample2_test.fa"})
    assert 0.0 <= acc <= 1.0
    with pytest.raises(DataError, match="not found"):
        clf.predict(tmp_path / "nope.fa")


# ----------------------------------------------------------------------------------------------- CLI
def test_cli_train_predict(tmp_path, capsys):
    X, y = gc_at(80, seed=9)
    fa = write_fasta(tmp_path / "gc.fa", [(f"gc{i}", s) for i, (s, l) in enumerate(zip(X, y)) if l == "GC"])
    fb = write_fasta(tmp_path / "at.fa", [(f"at{i}", s) for i, (s, l) in enumerate(zip(X, y)) if l == "AT"])
    model = tmp_path / "model"
    rc = cli_main(["train", "--fasta", f"{fa}:GC", f"{fb}:AT", "--out", str(model), "--d-model", "16",
                   "--n-layers", "1", "--n-heads", "2", "--memory-expansion", "1", "--chunk-size", "16",
                   "--ffn-mult", "1", "--epochs", "2", "--batch-size", "32", "--device", "cpu", "--seed", "0", "--quiet"])
    assert rc == 0 and (model / "config.json").is_file()
    Xq, _ = gc_at(10, seed=10)
    query = write_fasta(tmp_path / "query.fa", [(f"q{i}", s) for i, s in enumerate(Xq)])
    out = tmp_path / "pred.tsv"
    assert cli_main(["predict", str(model), str(query), "-o", str(out), "--quiet"]) == 0
    table = pd.read_csv(out, sep="\t")
    assert list(table.columns) == ["id", "predicted_label", "prob_AT", "prob_GC"]
    assert table["id"].tolist() == [f"q{i}" for i in range(10)]
    assert set(table["predicted_label"]) <= {"AT", "GC"}
    np.testing.assert_allclose(table[["prob_AT", "prob_GC"]].sum(1), 1.0, atol=1e-5)
    # stdout, and a CSV input
    capsys.readouterr()
    pd.DataFrame({"sequence": Xq}).to_csv(tmp_path / "q.csv", index=False)
    assert cli_main(["predict", str(model), str(tmp_path / "q.csv"), "--quiet", "--long", "--piece-length", "32"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split("\t") == ["id", "predicted_label", "prob_AT", "prob_GC"] and len(lines) == 11
    # CSV training
    pd.DataFrame({"sequence": X, "label": y}).to_csv(tmp_path / "train.csv", index=False)
    assert cli_main(["train", "--csv", str(tmp_path / "train.csv"), "--out", str(tmp_path / "m2"), "--d-model", "16",
                     "--n-layers", "1", "--n-heads", "2", "--epochs", "1", "--device", "cpu", "--quiet"]) == 0


def test_cli_user_errors(tmp_path, capsys):
    bad = tmp_path / "bad.fa"
    bad.write_text(">r1\nACGTXXACGT\n")
    ok = write_fasta(tmp_path / "ok.fa", [("r", "ACGTACGTAC")])
    args = ["train", "--fasta", f"{bad}:a", f"{ok}:b", "--out", str(tmp_path / "m"), "--device", "cpu", "--quiet"]
    assert cli_main(args) == 1
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err
    assert cli_main(["predict", str(tmp_path / "no_model"), str(ok)]) == 1
    assert "not a saved" in capsys.readouterr().err
    assert cli_main(["train", "--csv", str(tmp_path / "missing.csv"), "--out", str(tmp_path / "m")]) == 1
    with pytest.raises(SystemExit) as exc:  # argparse usage error
        cli_main(["train", "--fasta", "no_label_given.fa", "--out", str(tmp_path / "m")])
    assert exc.value.code == 2
    # the installed entry point: non-zero exit, one-line message, no traceback
    proc = subprocess.run([sys.executable, "-m", "titans_genomics.cli", "predict", str(tmp_path / "no_model"), str(ok)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "titans-genomics: error:" in proc.stderr and "Traceback" not in proc.stderr


# ------------------------------------------------------------------------------------ long sequences
def test_chunked_long_inference_equals_one_shot(fitted):
    seq = random_dna(3000, 11)
    one_shot = clone(fitted).set_params(piece_length=10**6)
    one_shot.__dict__.update({k: v for k, v in fitted.__dict__.items() if k.endswith("_")})
    ref = one_shot.predict_proba([seq])
    for piece in (700, 1024):  # a piece cut inside a memory chunk, and on the chunk grid
        np.testing.assert_allclose(fitted.predict_proba_long([seq], piece_length=piece), ref, rtol=1e-5, atol=1e-6)
    e_ref = one_shot.embed([seq])
    e_chunked = fitted.embed([seq], piece_length=700, chunked=True)
    np.testing.assert_allclose(e_chunked, e_ref, rtol=1e-4, atol=1e-5)
    # automatic: sequences over piece_length run in pieces inside predict_proba
    auto = clone(fitted).set_params(piece_length=512)
    auto.__dict__.update({k: v for k, v in fitted.__dict__.items() if k.endswith("_")})
    np.testing.assert_allclose(auto.predict_proba([seq, "ACGTAC"])[:1], ref, rtol=1e-5, atol=1e-6)


def test_network_stream_equals_features():
    cfg = TitansConfig(d_model=16, n_layers=2, n_heads=2, memory=MemoryConfig(chunk_size=16, expansion=1), ffn_mult=1)
    net = TitansSequenceNetwork(cfg, n_classes=2, pooling="mean+last").eval()
    ids = NucleotideTokenizer().batch_encode([random_dna(2000, 12), random_dna(2000, 13)])["input_ids"]
    with torch.no_grad():
        ref = net.features(ids)
        got = net.features_stream(ids[:, i : i + 300] for i in range(0, 2000, 300))
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------ variants
@pytest.mark.parametrize("variant", ["lmm", "mac", "mag", "mal"])
def test_each_variant_fits_one_step(variant):
    X, y = gc_at(24, seed=14)
    clf = TitansSequenceClassifier(variant=variant, max_epochs=1, val_size=None, window_size=16, segment_size=16,
                                   persistent_tokens=2, **{**TINY, "batch_size": 24})
    clf.fit(X, y)
    assert len(clf.history_) == 1 and np.isfinite(clf.history_[0]["train_loss"])
    p = clf.predict_proba(X[:4])
    assert p.shape == (4, 2) and np.isfinite(p).all()
    # every variant carries its state: piecewise long-sequence inference equals one pass
    np.testing.assert_allclose(clf.predict_proba_long(X[:2], piece_length=16), clf.predict_proba(X[:2]), atol=1e-5)


def test_interrupted_fit_resumes_from_checkpoint_dir(tmp_path):
    """``checkpoint_dir``: running the same fit again continues from the last checkpoint."""
    rng = np.random.default_rng(0)
    seqs = ["".join(rng.choice(list("ACGT"), 40)) for _ in range(40)]
    labels = [i % 2 for i in range(40)]
    kw = dict(d_model=16, n_layers=1, n_heads=2, batch_size=16, early_stopping_patience=None,
              enable_progress_bar=False, random_state=0, checkpoint_dir=str(tmp_path / "ckpt"), device="cpu")
    first = TitansSequenceClassifier(max_epochs=2, **kw).fit(seqs, labels)
    assert len(first.history_) == 2
    resumed = TitansSequenceClassifier(max_epochs=3, **kw).fit(seqs, labels)
    assert [row["epoch"] for row in resumed.history_] == [2.0]
