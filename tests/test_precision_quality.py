"""The harness of ``benchmarks/precision_quality.py`` on the CPU (a tiny model on the real genome
of ``../shared/data``): it trains, evaluates, and its gradient check against the fp64 PyTorch
operator finds the fp32 operators close to it (on the CPU ``impl="auto"`` is the PyTorch path, so
a large distance would mean the check itself is broken, e.g. a cast that does not round-trip)."""

import math
import re

from _benchmarks import load_benchmark


def test_tiny_run_trains_and_its_gradient_check_agrees_with_fp64(data_dir, capsys):
    pq = load_benchmark("precision_quality")
    assert pq.main(["--data-dir", str(data_dir), "--device", "cpu", "--steps", "4", "--length", "64", "--batch", "2",
                    "--layers", "1", "--d-model", "32", "--heads", "2", "--eval-windows", "2", "--seeds", "0,1",
                    "--precisions", "tf32", "--theta-max", "0.01", "--grad-check"]) == 0
    out = capsys.readouterr().out
    runs = re.findall(r"^\| tf32 \| (\d) \| ([\d.]+) \| ([\d.]+) \|", out, re.M)
    assert [r[0] for r in runs] == ["0", "1"]
    for _, train, held in runs:  # near ln(vocab) for an untrained 4-step model, and finite
        assert 0.5 < float(train) < 4.0 and 0.5 < float(held) < 4.0
    checks = re.findall(r"^\| (initial weights|after 4 steps \(tf32\)) \| ([\d.e+-]+) \| (torch fp32|auto tf32) \| "
                        r"([\d.e+-]+) \| ([\d.e+-]+) \|", out, re.M)
    assert len(checks) == 4
    for _, norm, _, loss_diff, dist in checks:
        assert math.isfinite(float(norm)) and float(norm) > 0
        assert float(loss_diff) < 1e-5 and float(dist) < 1e-3
