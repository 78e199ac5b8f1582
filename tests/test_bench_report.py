"""bench/report.py: last.json split by device and suite, tables and plots per group."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

REPORT = Path(__file__).resolve().parents[1] / "bench" / "report.py"


def _report_module():
    spec = importlib.util.spec_from_file_location("bench_report", REPORT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _bench(suite, provider, mean, group="g", **info):
    return {"fullname": f"bench/{suite}.py::test_x[{provider}]", "name": f"test_x[{provider}]", "param": provider,
            "group": group, "stats": {"mean": mean, "min": mean * 0.9, "rounds": 3},
            "extra_info": dict(provider=provider, **info)}


def test_split_and_report(tmp_path):
    report = _report_module()
    info = dict(device="dev-a", bytes_moved=4e9, copy_bw_gbs=10.0)
    run = {"machine_info": {"cbp_device": "dev-a", "torch": "x"}, "datetime": "2026-01-01T00:00:00",
           "benchmarks": [_bench("bench_one", "ours", 0.5, role="ours", **info),
                          _bench("bench_one", "naive", 1.0, role="baseline", **info),
                          _bench("bench_two", "eager", 2.0, group="T=16"), _bench("bench_two", "fused", 1.0, group="T=16"),
                          _bench("bench_two", "fused", 1.0, group="T=4")]}
    (tmp_path / "last.json").write_text(json.dumps(run))
    written = report.split_last_run(tmp_path)
    assert sorted(p.name for p in written) == ["bench_one.json", "bench_two.json"]
    assert len(json.loads((tmp_path / "dev-a" / "bench_two.json").read_text())["benchmarks"]) == 3
    text = report.write_report(tmp_path).read_text()
    assert "| **ours** | 500.000 | 450.000 | 3 | 2.00x | 8.0 | 80% |" in text  # 4 GB in 0.5 s vs a 10 GB/s copy
    assert "| eager (baseline) | 2000.000 | 1800.000 | 3 | 1.00x |" in text  # baseline by name, no roles
    assert text.index("### T=4") < text.index("### T=16")
    assert len(list((tmp_path / "dev-a").glob("*.png"))) == 3  # one plot per group


def test_merge_joins_the_suites_runs(tmp_path):
    """make bench runs each suite in a process of its own: --merge joins their runs into last.json
    (every benchmark, in order; the first run's machine_info), which is then split as one run."""
    report = _report_module()
    runs = []
    for i, suite in enumerate(["bench_one", "bench_two"]):
        path = tmp_path / f"{suite}.json"
        path.write_text(json.dumps({"machine_info": {"cbp_device": f"dev-{i}"}, "datetime": f"2026-01-0{i + 1}",
                                    "benchmarks": [_bench(suite, "ours", 0.5 + i), _bench(suite, "naive", 1.0 + i)]}))
        runs.append(path)
    report.main(["--results", str(tmp_path), "--merge", *map(str, runs)])
    merged = json.loads((tmp_path / "last.json").read_text())
    suites = [b["fullname"].split("::")[0] for b in merged["benchmarks"]]
    assert suites == ["bench/bench_one.py"] * 2 + ["bench/bench_two.py"] * 2
    assert merged["machine_info"] == {"cbp_device": "dev-0"}
    assert sorted(p.name for p in (tmp_path / "dev-0").glob("*.json")) == ["bench_one.json", "bench_two.json"]
    assert "bench_two" in (tmp_path / "REPORT.md").read_text()


def test_ours_against_each_provider_with_peak_memory(tmp_path):
    """Groups with peak memory: a peak-memory column, ours against every other row (its time over
    ours, ours' peak over its), and one table of those ratios per suite, a row per group."""
    report = _report_module()
    one, eight = "step, batch 1, 1 thread(s)", "step, batch 8, 2 thread(s)"
    run = {"machine_info": {"cbp_device": "dev-a", "torch": "x"}, "datetime": "2026-01-01T00:00:00",
           "benchmarks": [_bench("bench_m", "ours", 0.5, group=one, role="ours", peak_memory_bytes=100e6, threads=1),
                          _bench("bench_m", "sj", 1.0, group=one, role="peer", peak_memory_bytes=200e6, threads=1),
                          _bench("bench_m", "sj_compiled", 0.4, group=one, role="peer", peak_memory_bytes=400e6,
                                 threads=1),
                          _bench("bench_m", "ours", 2.0, group=eight, role="ours", peak_memory_bytes=300e6, threads=2),
                          _bench("bench_m", "authors", 3.0, group=eight, role="baseline", peak_memory_bytes=600e6,
                                 threads=2)]}
    (tmp_path / "last.json").write_text(json.dumps(run))
    report.split_last_run(tmp_path)
    text = report.write_report(tmp_path).read_text()
    assert "1 / 2 torch thread(s)" in text
    # 1.0 s against ours' 0.5 s, ours' 100 MB against its 200 MB; 0.40x: vs the fastest peer (0.4 s)
    assert "| sj (peer) | 1000.000 | 900.000 | 3 | 0.40x | 200.0 | 2.00x | 0.50x |" in text
    assert "| **ours** | 500.000 | 450.000 | 3 | 0.80x | 100.0 |  |  |" in text
    assert "| authors (baseline) | 3000.000 | 2700.000 | 3 | 1.00x | 600.0 | 1.50x | 0.50x |" in text
    summary = text.index("### ours against each provider")
    assert summary < text.index(f"### {one}") < text.index(f"### {eight}")
    assert "| group | authors | sj | sj_compiled |" in text
    assert f"| {one} |  | 2.00x / 0.50x | 0.80x / 0.25x |" in text
    assert f"| {eight} | 1.50x / 0.50x |  |  |" in text
