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
