"""The gap analysis of ``benchmarks/trace_step.py`` (the host-side trace of a layer step) on a
synthetic Chrome trace: which GPU idle gaps it finds, which of them the host caused (the next
launch was issued after the GPU had gone idle), the host operators it blames, and the
synchronising runtime calls it counts. The trace itself needs a GPU; its parsing does not."""

from _benchmarks import load_benchmark


def _module():
    return load_benchmark("trace_step")


def _x(cat, ts, dur, name, **args):
    return dict(ph="X", cat=cat, ts=ts, dur=dur, name=name, args=args)


def test_gaps_are_found_and_blamed_on_the_host_when_it_launched_late(capsys):
    ts = _module()
    trace = dict(traceEvents=[
        _x("cpu_op", 0, 1000, "autograd::engine::evaluate_function: FooBackward"),
        _x("cpu_op", 5, 30, "aten::mul"),
        _x("cuda_runtime", 10, 5, "cudaLaunchKernel", correlation=1),
        _x("kernel", 100, 100, "k_first", correlation=1),              # GPU busy 100-200
        _x("cpu_op", 205, 200, "aten::item"),
        _x("cuda_runtime", 210, 190, "cudaStreamSynchronize"),        # the host waits
        _x("cpu_op", 405, 20, "aten::add"),
        _x("cuda_runtime", 410, 5, "cudaLaunchKernel", correlation=2),
        _x("kernel", 420, 50, "k_after_sync", correlation=2),         # gap 220 us, launched late
        _x("cuda_runtime", 430, 5, "cudaLaunchKernel", correlation=3),
        _x("kernel", 600, 10, "k_queued", correlation=3),             # gap 130 us, launched early
        _x("kernel", 612, 10, "k_tiny_gap", correlation=4),           # 2 us: below the threshold
    ])
    ts.analyse(trace, min_gap_us=20, top=10)
    out = capsys.readouterr().out
    assert "idle in gaps > 20 us: 0.35 ms in 2 gaps" in out
    assert "host launched late: 0.22 ms in 1 gaps" in out
    row = next(ln for ln in out.splitlines() if "k_after_sync" in ln)
    assert "| 220 |" in row and "+210" in row and "aten::add" in row and "cudaStreamSynchronize 190" in row
    queued = next(ln for ln in out.splitlines() if "k_queued" in ln)
    assert "| -40 |" in queued  # issued 40 us before the GPU went idle (k_after_sync ends at 470): not the host
    assert "| cudaStreamSynchronize | 1 | 0.19 |" in out


def test_an_empty_trace_says_so(capsys):
    _module().analyse(dict(traceEvents=[]), 20, 5)
    assert "no GPU activity" in capsys.readouterr().out
