"""The routed-linear and call-count benchmarks run, and their floors and counts mean what they say."""

import torch

from benchmarks import bench_calls, bench_linear


def test_bench_linear_quick_states_each_shape_against_its_floor(tmp_path):
    results = bench_linear.main(["--quick", "--out", str(tmp_path)])
    for r in results:
        assert 1 <= r["distinct_experts"] <= min(r["experts"], bench_linear.TOP_K * r["tokens"])
        assert r["floor_us"] >= r["plain_us"] > 0  # reading W is part of the floor
        assert abs(r["vs_floor"] - r["glider_us"] / r["floor_us"]) < 1e-9
    assert "x floor" in (tmp_path / "bench_linear.md").read_text()


def test_call_counter_counts_kernels_not_views():
    x = torch.ones(4, 4)
    with bench_calls.CountCalls() as counter:
        x.view(16).add(1).mul(2)
    assert counter.calls == {"aten.add": 1, "aten.mul": 1}
