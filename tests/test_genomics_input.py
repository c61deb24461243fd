"""Genomics input layer: tokenizer, FASTA access, dataset loaders (fast, no network)."""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import random
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import polars as pl
import pytest
import torch

from titans_genomics import datasets as gds
from titans_genomics.datasets import (load_coordinate_dataset, load_fasta_classes, load_gue,
                                      load_oct4_mafk, read_genomic_benchmarks_intervals)
from titans_genomics.fasta import FastaGenome, read_fasta
from titans_genomics.tokenizer import NucleotideTokenizer, reverse_complement
from titans_memory.errors import ConfigError, DataError, DatasetError

DATA = Path(os.environ.get("TITANS_TEST_DATA")
            or Path(__file__).resolve().parents[1].parent / "shared" / "data")
FASTA_DIR = DATA / "fasta"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"shared data not found at {DATA}")


@pytest.fixture(autouse=True, scope="module")
def _cache(tmp_path_factory):
    """All caches (decompressed FASTA, .fai indexes, downloads) go to a temp dir."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TITANS_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        yield


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _slow_parse(path: Path) -> dict[str, str]:
    """Reference FASTA parser in plain Python."""
    recs, name = {}, None
    for line in path.read_text().splitlines():
        if line.startswith(">"):
            name = line[1:].split()[0]
            recs[name] = []
        elif line.strip():
            recs[name].append(line.strip())
    return {k: "".join(v) for k, v in recs.items()}


# ------------------------------------------------------------------------------------ tokenizer
def test_tokenizer_vocab_and_round_trip():
    tok = NucleotideTokenizer()
    assert (tok.pad_id, tok.cls_id, tok.mask_id, tok.unk_id, tok.vocab_size) == (0, 1, 2, 3, 9)
    ids = tok.encode("ACGTN")
    assert ids.dtype == np.int64 and ids.tolist() == [4, 5, 6, 7, 8]
    seq = "".join(random.Random(0).choice("ACGTN") for _ in range(500))
    assert tok.decode(tok.encode(seq)) == seq
    assert tok.encode("ACG", add_cls=True).tolist() == [1, 4, 5, 6]
    assert tok.decode(tok.encode("ACG", add_cls=True)) == "ACG"
    assert tok.encode("").shape == (0,)


def test_tokenizer_lowercase_and_iupac():
    tok = NucleotideTokenizer()
    assert tok.encode("acgtn").tolist() == tok.encode("ACGTN").tolist()
    assert tok.encode("RYSWKMBDHVrysw").tolist() == [8] * 14
    with pytest.raises(DataError, match="position 2"):
        NucleotideTokenizer(iupac="error").encode("ACR")
    with pytest.raises(ConfigError):
        NucleotideTokenizer(iupac="drop")


def test_tokenizer_bad_character_names_record_and_position():
    tok = NucleotideTokenizer()
    with pytest.raises(DataError) as ei:
        tok.encode("ACGTXAC", record_id="chr7:100-200")
    msg = str(ei.value)
    assert "chr7:100-200" in msg and "position 4" in msg and "'X'" in msg
    assert isinstance(ei.value, ValueError)
    with pytest.raises(DataError, match="position 1"):
        tok.encode("Aé")
    assert NucleotideTokenizer(unknown="unk").encode("AC-T").tolist() == [4, 5, 3, 7]
    assert NucleotideTokenizer(unknown="skip").encode("AC-T").tolist() == [4, 5, 7]


def test_tokenizer_kmer_modes():
    seq = "ACGTACGTAC"
    over = NucleotideTokenizer(k=3)
    ids = over.encode(seq)
    assert over.vocab_size == 10 + 64 and len(ids) == len(seq) - 2
    assert ids[0] == 9 + (0 * 16 + 1 * 4 + 2)  # ACG
    assert over.decode(ids) == seq
    assert ((ids >= 9) & (ids < over.vocab_size)).all()
    ids_n = over.encode("ACNTA")
    assert ids_n.tolist() == [over.nkmer_id] * 3
    non = NucleotideTokenizer(k=3, stride=3)
    ids = non.encode(seq)  # 3 k-mers + 1 trailing base
    assert len(ids) == 4 and ids[-1] == 5 and non.decode(ids) == seq
    assert over.encode("AC").tolist() == [4, 5]  # shorter than k: base by base
    with pytest.raises(ConfigError):
        NucleotideTokenizer(k=3, stride=2)


def test_batch_encode_padding_mask_truncation():
    tok = NucleotideTokenizer()
    b = tok.batch_encode(["ACGT", "AC", "A"], pad_to_multiple_of=8, add_cls=True)
    ids, mask = b["input_ids"], b["attention_mask"]
    assert ids.dtype == torch.long and mask.dtype == torch.bool and ids.shape == (3, 8)
    assert ids[0].tolist() == [1, 4, 5, 6, 7, 0, 0, 0]
    assert mask.sum(1).tolist() == [5, 3, 2]
    assert (ids[~mask] == 0).all()
    long = "AAACCCGGG"
    with pytest.raises(DataError, match="max_length"):
        tok.batch_encode([long], max_length=4)
    cut = {t: tok.decode(tok.batch_encode([long], max_length=3, truncation=t)["input_ids"][0])
           for t in ("right", "left", "center")}
    assert cut == {"right": "AAA", "left": "GGG", "center": "CCC"}
    b = tok.batch_encode(["ACGTACGT", "A"], max_length=5, truncation="right", add_cls=True,
                         padding="max_length")
    assert b["input_ids"].shape == (2, 5) and b["input_ids"][0].tolist() == [1, 4, 5, 6, 7]


def test_reverse_complement_string_and_ids():
    assert reverse_complement("ACGTN") == "NACGT"
    assert reverse_complement("aaCGr") == "yCGtt"
    assert reverse_complement("RYKMBVDHSW") == "WSDHBVKMRY"
    s = "".join(random.Random(1).choice("ACGTNacgtnRYSWKMBDHV") for _ in range(300))
    assert reverse_complement(reverse_complement(s)) == s
    with pytest.raises(DataError, match="position 2"):
        reverse_complement("AC*")
    tok = NucleotideTokenizer()
    seqs = ["ACGTTN", "GGA", "T"]
    b = tok.batch_encode(seqs, add_cls=True)
    rc = tok.reverse_complement_ids(b["input_ids"])
    assert isinstance(rc, torch.Tensor)
    assert tok.decode(rc) == [reverse_complement(s) for s in seqs]
    assert torch.equal(rc[:, 0], b["input_ids"][:, 0]) and torch.equal(rc == 0, b["input_ids"] == 0)
    assert torch.equal(tok.reverse_complement_ids(rc), b["input_ids"])
    one = tok.encode("AACGN")
    assert tok.reverse_complement_ids(one).tolist() == tok.encode(reverse_complement("AACGN")).tolist()
    with pytest.raises(ConfigError):
        NucleotideTokenizer(k=2).reverse_complement_ids(one)


# ------------------------------------------------------------------------------------ FASTA
@needs_data
def test_read_fasta_sample():
    recs = list(read_fasta(FASTA_DIR / "sample.fa"))
    assert len(recs) == 3897
    assert recs[0][0] == "chr1:15710957-15711157"
    assert {len(s) for _, s in recs} == {200}
    assert len({n for n, _ in recs}) == 3897
    g = FastaGenome(FASTA_DIR / "sample.fa")
    side = FASTA_DIR / "sample.fa.fai"  # a fresh samtools index beside the file would be reused
    assert g._index == side or g._index.parent != FASTA_DIR, "never write into the data directory"


@needs_data
def test_indexed_fetch_matches_slow_parse():
    path = FASTA_DIR / "pseudo_genome.fa"
    ref = _slow_parse(path)
    g = FastaGenome(path)
    assert g.names == list(ref) and g.lengths == {k: len(v) for k, v in ref.items()}
    rng = random.Random(2)
    for _ in range(20):
        chrom = rng.choice(g.names)
        start = rng.randrange(0, len(ref[chrom]) - 1)
        end = min(len(ref[chrom]), start + rng.randrange(1, 3000))
        assert g.fetch(chrom, start, end) == ref[chrom][start:end]
        assert g.fetch(chrom, start, end, strand="-") == reverse_complement(ref[chrom][start:end])
    n = len(ref["pseudo2"])
    assert g.fetch("pseudo2", n - 5, n) == ref["pseudo2"][-5:] and g.fetch("pseudo2", 3, 3) == ""


@needs_data
def test_fetch_bed_tables_and_errors():
    g = FastaGenome(FASTA_DIR / "pseudo_genome.fa")
    ref = _slow_parse(FASTA_DIR / "pseudo_genome.fa")
    rows = [("pseudo1", 100, 150, "+"), ("pseudo2", 0, 60, "-"), ("pseudo1", 1_000_000, 1_000_010, ".")]
    want = [ref["pseudo1"][100:150], reverse_complement(ref["pseudo2"][:60]),
            ref["pseudo1"][1_000_000:1_000_010]]
    pdf = pd.DataFrame(rows, columns=["chrom", "start", "end", "strand"])
    assert g.fetch_bed(pdf) == want
    assert g.fetch_bed(pl.from_dict({c: list(pdf[c]) for c in pdf.columns})) == want
    assert g.fetch_bed(rows) == want
    assert g.fetch_bed([r[:3] for r in rows])[1] == ref["pseudo2"][:60]
    with pytest.raises(DataError, match="out of range"):
        g.fetch("pseudo2", 39_990, 40_001)
    with pytest.raises(DataError, match="out of range"):
        g.fetch("pseudo1", -1, 10)
    with pytest.raises(DataError, match="unknown chromosome 'chrX'"):
        g.fetch("chrX", 0, 10)
    with pytest.raises(DataError, match="strand"):
        g.fetch("pseudo1", 0, 10, strand="x")
    with pytest.raises(DataError, match="chrom column"):
        g.fetch_bed(pd.DataFrame({"start": [0], "end": [1]}))


@needs_data
def test_plain_gzip_fasta(tmp_path):
    src = FASTA_DIR / "sample_test.fa"
    gz = tmp_path / "sample_test.fa.gz"
    gz.write_bytes(gzip.compress(src.read_bytes()))
    assert list(read_fasta(gz)) == list(read_fasta(src))
    g = FastaGenome(gz)
    assert len(g) == 100 and g.fetch(g.names[0], 0, 10) == _slow_parse(src)[g.names[0]][:10]


def test_fasta_file_errors(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        FastaGenome(tmp_path / "missing.fa")
    with pytest.raises(DataError, match="empty"):
        FastaGenome(_write(tmp_path / "empty.fa", ""))
    dup = _write(tmp_path / "dup.fa", ">r1\nACGT\n>r2\nAC\n>r1 again\nGG\n")
    with pytest.raises(DataError, match=r"duplicate record name 'r1' \(header lines 1, 5\)"):
        FastaGenome(dup)
    blank = _write(tmp_path / "blank.fa", ">ok\nACGT\n>bad rec\nACGT\n\nACGT\nAC\n")
    with pytest.raises(DataError) as ei:
        list(read_fasta(blank))
    assert "blank.fa" in str(ei.value) and "'bad'" in str(ei.value) and "line 5" in str(ei.value)
    ragged = _write(tmp_path / "ragged.fa", ">r\nACGT\nAC\nACGT\n")
    with pytest.raises(DataError, match="line 3 of record 'r'"):
        FastaGenome(ragged)
    prot = _write(tmp_path / "prot.fa", ">dna\nACGT\n>P12345 protein\nMKVLAAGIE\n")
    with pytest.raises(DataError, match=r"record 'P12345' has non-DNA character 'L' at position 3"):
        list(read_fasta(prot))
    with pytest.raises(DataError, match="no FASTA record"):
        FastaGenome(_write(tmp_path / "text.fa", "\n\n"))
    with pytest.raises(DataError, match="before the first"):
        FastaGenome(_write(tmp_path / "nohead.fa", "ACGT\n"))
    ok = _write(tmp_path / "ok.fa", ">a desc\nacgtRY\nNN\n\n>b\nAC\n")  # soft-masked, blank between
    assert list(read_fasta(ok)) == [("a", "acgtRYNN"), ("b", "AC")]


class _RegionDataset(torch.utils.data.Dataset):
    def __init__(self, genome, regions):
        self.genome, self.regions = genome, regions

    def __len__(self):
        return len(self.regions)

    def __getitem__(self, i):
        seq = self.genome.fetch(*self.regions[i])
        return i, seq, os.getpid(), id(self.genome._handle)


@needs_data
def test_pickling_and_dataloader_workers():
    g = FastaGenome(FASTA_DIR / "pseudo_genome.fa")
    g2 = pickle.loads(pickle.dumps(g))
    assert g2._fa is None and g2.fetch("pseudo1", 10, 20) == g.fetch("pseudo1", 10, 20)
    rng = random.Random(3)
    regions = [("pseudo1", s, s + 50, rng.choice("+-")) for s in rng.sample(range(1_000_000), 32)]
    loader = torch.utils.data.DataLoader(_RegionDataset(g, regions), batch_size=4, num_workers=2)
    got, pids = {}, set()
    for idx, seqs, pid, _ in loader:
        got.update(zip(idx.tolist(), seqs))
        pids.update(pid.tolist())
    assert got == {i: g.fetch(*r) for i, r in enumerate(regions)}
    assert len(pids) == 2 and os.getpid() not in pids


# ------------------------------------------------------------------------------------ datasets
@needs_data
@pytest.mark.parametrize("task,sizes,length", [("prom/prom_core_tata", (4904, 613, 613), 70),
                                               ("tf/0", (32378, 1000, 1000), 101)])
def test_load_gue(task, sizes, length):
    for split, n in zip(("train", "dev", "test"), sizes):
        df = load_gue(task, split, data_dir=DATA, download=False)
        assert df.shape == (n, 2) and list(df.columns) == ["sequence", "label"]
        assert df["label"].dtype == np.int64 and set(df["label"]) == {0, 1}
        assert (df["sequence"].str.len() == length).all()
    enc = NucleotideTokenizer().batch_encode(list(df["sequence"][:16]))
    assert enc["input_ids"].shape == (16, length)


@needs_data
def test_load_gue_aliases_env_and_errors(monkeypatch, tmp_path):
    monkeypatch.setenv("TITANS_DATA_DIR", str(DATA))
    assert len(load_gue("prom_core_tata", "val", download=False)) == 613
    assert len(load_gue("tf_0", "test", download=False)) == 1000
    with pytest.raises(DatasetError, match="ambiguous"):
        load_gue("0", "train")
    with pytest.raises(DatasetError, match="download=False"):
        load_gue("tf/0", "train", data_dir=tmp_path, download=False)
    bad = tmp_path / "GUE" / "prom" / "prom_core_tata"
    bad.mkdir(parents=True)
    pd.DataFrame({"sequence": ["ACGT"] * 3, "label": [0, 1, 2]}).to_csv(bad / "dev.csv", index=False)
    with pytest.raises(DatasetError, match="rows"):
        load_gue("prom/prom_core_tata", "dev", data_dir=tmp_path, download=False)


@needs_data
def test_gue_download_paths(monkeypatch, tmp_path):
    """Mirror and archive downloads, served from file:// URLs."""
    import copy
    raw = gzip.decompress((DATA / "GUE/prom/prom_core_tata/dev.csv.gz").read_bytes())
    mirror = tmp_path / "mirror"
    (mirror / "prom/prom_core_tata").mkdir(parents=True)
    (mirror / "prom/prom_core_tata/dev.csv").write_bytes(raw)
    with zipfile.ZipFile(tmp_path / "GUE.zip", "w") as z:
        z.writestr("GUE/prom/prom_core_tata/test.csv",
                   gzip.decompress((DATA / "GUE/prom/prom_core_tata/test.csv.gz").read_bytes()))
    man = copy.deepcopy(gds.gue_manifest())
    man["mirror"]["base_url"] = mirror.as_uri() + "/"
    man["archive"]["download_url"] = (tmp_path / "GUE.zip").as_uri()
    man["tasks"]["prom/prom_core_tata"]["files"]["test"]["mirror"] = False
    monkeypatch.setattr(gds, "gue_manifest", lambda: man)
    monkeypatch.delenv("TITANS_DATA_DIR", raising=False)
    cache = tmp_path / "cache"
    assert len(load_gue("prom/prom_core_tata", "dev", cache_dir=cache)) == 613
    assert len(load_gue("prom/prom_core_tata", "test", cache_dir=cache)) == 613
    assert hashlib.sha256((cache / "GUE/prom/prom_core_tata/dev.csv").read_bytes()).hexdigest() == \
        man["tasks"]["prom/prom_core_tata"]["files"]["dev"]["sha256"]
    (mirror / "prom/prom_core_tata/train.csv").write_bytes(raw)  # wrong bytes for 'train'
    (tmp_path / "GUE.zip").unlink()
    with pytest.raises(DatasetError, match="checksum mismatch"):
        load_gue("prom/prom_core_tata", "train", cache_dir=cache)


@needs_data
def test_load_oct4_vs_mafk():
    df = load_oct4_mafk("train", data_dir=DATA, download=False)
    assert list(df.columns) == ["sequence", "label", "record_id"] and len(df) == 3897 + 3900
    assert df["label"].value_counts().to_dict() == {1: 3897, 0: 3900}
    assert (df["sequence"].str.len() == 200).all()
    test = load_fasta_classes({"oct4": FASTA_DIR / "sample_test.fa", "mafk": FASTA_DIR / "sample2_test.fa"})
    assert test.shape == (200, 3) and set(test["label"]) == {"oct4", "mafk"}


@needs_data
def test_coordinate_dataset_genomic_benchmarks_layout(tmp_path):
    ref = _slow_parse(FASTA_DIR / "pseudo_genome.fa")
    rng = random.Random(4)
    for split in ("train", "test"):
        (tmp_path / "toy" / split).mkdir(parents=True)
        for cls in ("positive", "negative"):
            starts = rng.sample(range(30_000), 5)
            pd.DataFrame({"id": range(5), "region": "pseudo2", "start": starts,
                          "end": [s + 100 for s in starts], "strand": ["+", "-", "+", "-", "+"]}
                         ).to_csv(tmp_path / "toy" / split / f"{cls}.csv.gz", index=False)
    coords = read_genomic_benchmarks_intervals(tmp_path / "toy", "train")
    assert len(coords) == 10 and set(coords["class_name"]) == {"positive", "negative"}
    assert dict(zip(coords["class_name"], coords["label"])) == {"negative": 0, "positive": 1}
    df = load_coordinate_dataset(coords, FASTA_DIR / "pseudo_genome.fa")
    assert list(df.columns[:2]) == ["sequence", "label"] and (df["sequence"].str.len() == 100).all()
    for row in df.itertuples():
        s = ref["pseudo2"][row.start:row.end]
        assert row.sequence == (reverse_complement(s) if row.strand == "-" else s)
    pl_coords = pl.from_dict({"chrom": ["pseudo1"], "start": [5], "end": [15], "label": [1]})
    out = load_coordinate_dataset(pl_coords, FastaGenome(FASTA_DIR / "pseudo_genome.fa"))
    assert out["sequence"][0] == ref["pseudo1"][5:15] and out["label"][0] == 1
    with pytest.raises(DataError, match="label column"):
        load_coordinate_dataset(coords.drop(columns="label"), FASTA_DIR / "pseudo_genome.fa")
