"""The harness of ``benchmarks/conditioning.py`` (fp64 gradient norm, fp32 distance) on a short
case, where the memory's backward is well conditioned: the fp32 gradient must then be close to the
fp64 one (a broken cast or a gradient from the wrong dtype would not be), and the table printed."""

from _benchmarks import load_benchmark


def test_short_sequence_is_well_conditioned_and_the_table_prints(capsys):
    cond = load_benchmark("conditioning")
    r = cond.conditioning(**dict(cond.DEFAULTS, T=128, d_model=32, heads=2))
    assert 0 < r["norm"] < 1e3 and r["fp32"] < 1e-4 and r["perturbed"] < 1e-6
    assert cond.main(["--cases", '[{"T": 64, "d_model": 32, "heads": 2}]']) == 0
    rows = [r for r in capsys.readouterr().out.splitlines() if r.startswith("| 64 |")]
    assert len(rows) == 1 and rows[0].split("|")[8].strip() == "4"
