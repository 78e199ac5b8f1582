"""Turns the benchmark suites' pytest-benchmark JSON into bench/results/REPORT.md and one bar
plot (PNG) per benchmark group. Generic over suites: it reads only pytest-benchmark's fields
and these optional ``extra_info`` keys, which bench/harness.py's ``run`` stores:

- ``provider`` (else the test's parameter id), ``role``: ``"ours"``, ``"baseline"`` (the
  naive implementation speed-ups are measured against), ``"peer"`` (the library we compare
  with); without roles, providers named ``naive`` / ``eager`` and ``spikingjelly`` take them;
- ``bytes_moved`` (bytes one call must move) and ``copy_bw_gbs`` (a large copy's bandwidth,
  same run): they give GB/s and the % of the measured copy bandwidth;
- ``device`` (else the run's ``machine_info["cbp_device"]``), ``threads``, ``load_avg_1min``;
- ``peak_memory_bytes``: a group with it gets a peak-memory column and, beside an ``"ours"``
  row, ours against each other row (its time over ours, ours' peak memory over its); a suite
  with such groups opens with one table of those two ratios, a row per group (e.g. per batch
  and thread count), a column per provider.

Steps: (0) with ``--merge``, the given runs (``make bench`` runs each suite in a process of its
own) are joined into ``bench/results/last.json``; (1) ``last.json``, when present, is split into
``bench/results/<device>/<suite>.json`` (a new run of a suite on a device replaces the old one);
(2) every ``bench/results/<device>/*.json`` is read and the report written.

    python bench/report.py [--results bench/results] [--merge RUN.json ...]
"""
from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
BASELINE_NAMES = ("naive", "eager")  # the baseline of a suite that gives no roles
PEER_NAMES = ("spikingjelly",)  # and its peer


def _device(bench: dict, machine_info: dict) -> str:
    return bench.get("extra_info", {}).get("device") or machine_info.get("cbp_device") or "unknown-device"


def _suite(bench: dict) -> str:
    return Path(bench["fullname"].split("::")[0]).stem


def merge_runs(runs: list[Path], results: Path) -> Path:
    """Joins pytest-benchmark runs (one per suite) into results/last.json: their benchmarks in
    order, the first run's machine_info and datetime; returns last.json's path."""
    loaded = [json.loads(path.read_text()) for path in runs]
    if not loaded:
        raise ValueError("--merge needs at least one run file")
    last = results / "last.json"
    last.write_text(json.dumps({**loaded[0], "benchmarks": [b for run in loaded for b in run["benchmarks"]]}) + "\n")
    return last


def split_last_run(results: Path) -> list[Path]:
    """Writes last.json's benchmarks into <device>/<suite>.json files; returns the files written."""
    last = results / "last.json"
    if not last.is_file():
        return []
    run = json.loads(last.read_text())
    parts: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for bench in run["benchmarks"]:
        parts[(_device(bench, run["machine_info"]), _suite(bench))].append(bench)
    written = []
    for (device, suite), benches in sorted(parts.items()):
        path = results / device / f"{suite}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**run, "benchmarks": benches}, indent=1) + "\n")
        written.append(path)
    return written


def _rows(benches: list[dict]) -> list[dict]:
    """One row per provider of a group, fastest first, with speed-ups and bandwidth."""
    rows = []
    for b in benches:
        info = b.get("extra_info", {})
        provider = info.get("provider") or b.get("param") or b["name"]
        role = info.get("role") or ("baseline" if provider in BASELINE_NAMES else "peer" if provider in PEER_NAMES else "")
        rows.append(dict(provider=provider, role=role, mean=b["stats"]["mean"], min=b["stats"]["min"],
                         rounds=b["stats"]["rounds"], info=info))
    rows.sort(key=lambda r: r["mean"])
    base = next((r for r in rows if r["role"] == "baseline"), None)
    peer = next((r for r in rows if r["role"] == "peer"), None)
    ours = next((r for r in rows if r["role"] == "ours"), None)
    for r in rows:
        r["peak"] = r["info"].get("peak_memory_bytes")
    for r in rows:
        r["vs_baseline"] = base["mean"] / r["mean"] if base else None
        r["vs_peer"] = peer["mean"] / r["mean"] if peer else None
        # ours against this row: its time over ours (> 1: ours faster), ours' peak over its (< 1: ours smaller)
        other = ours is not None and r is not ours
        r["ours_speedup"] = r["mean"] / ours["mean"] if other else None
        r["ours_memory"] = ours["peak"] / r["peak"] if other and ours["peak"] and r["peak"] else None
        nbytes, copy_bw = r["info"].get("bytes_moved"), r["info"].get("copy_bw_gbs")
        r["gbs"] = nbytes / r["mean"] / 1e9 if nbytes else None
        r["pct_bw"] = 100 * r["gbs"] / copy_bw if r["gbs"] and copy_bw else None
    return rows


def _fmt(value, spec: str, suffix: str = "") -> str:
    return "" if value is None else f"{value:{spec}}{suffix}"


def _table(rows: list[dict]) -> list[str]:
    has_base = any(r["vs_baseline"] for r in rows)
    has_peer = any(r["vs_peer"] for r in rows)
    has_bw = any(r["gbs"] for r in rows)
    has_peak = any(r["peak"] for r in rows)
    has_ours = any(r["ours_speedup"] for r in rows)
    head = ["provider", "mean (ms)", "min (ms)", "rounds"]
    head += ["speed-up vs baseline"] if has_base else []
    peers = sum(r["role"] == "peer" for r in rows)
    head += ["speed-up vs fastest peer" if peers > 1 else "speed-up vs peer"] if has_peer else []
    head += ["GB/s", "% of copy BW"] if has_bw else []
    head += ["peak memory (MB)"] if has_peak else []
    head += ["ours: speed-up", "ours: peak memory ratio"] if has_ours else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        name = f"**{r['provider']}**" if r["role"] == "ours" else r["provider"]
        if r["role"] and r["role"] != "ours":
            name += f" ({r['role']})"
        cells = [name, f"{r['mean'] * 1e3:.3f}", f"{r['min'] * 1e3:.3f}", str(r["rounds"])]
        cells += [_fmt(r["vs_baseline"], ".2f", "x")] if has_base else []
        cells += [_fmt(r["vs_peer"], ".2f", "x")] if has_peer else []
        cells += [_fmt(r["gbs"], ".1f"), _fmt(r["pct_bw"], ".0f", "%")] if has_bw else []
        cells += [_fmt(r["peak"] and r["peak"] / 1e6, ".1f")] if has_peak else []
        cells += [_fmt(r["ours_speedup"], ".2f", "x"), _fmt(r["ours_memory"], ".2f", "x")] if has_ours else []
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _ours_summary(groups: dict[str, list[dict]]) -> list[str]:
    """One table for a suite: a row per group that has an ``"ours"`` row and peak memory, a column
    per other provider, each cell "its time over ours / ours' peak memory over its"."""
    table = {}
    for group, rows in sorted(groups.items(), key=lambda item: _natural(item[0])):
        if any(r["ours_memory"] for r in rows):
            table[group] = {r["provider"]: r for r in rows if r["ours_speedup"]}
    if not table:
        return []
    providers = sorted({p for cells in table.values() for p in cells})
    lines = ["### ours against each provider", "",
             "Each cell: ours' speed-up over that provider (its mean time / ours) / ours' peak memory as a "
             "fraction of its (< 1: ours needs less).", "",
             "| group | " + " | ".join(providers) + " |", "|" + "---|" * (len(providers) + 1)]
    for group, cells in table.items():
        lines.append(f"| {group} | " + " | ".join(
            f"{cells[p]['ours_speedup']:.2f}x / {_fmt(cells[p]['ours_memory'], '.2f', 'x') or '-'}" if p in cells else ""
            for p in providers) + " |")
    return lines + [""]


def _natural(text: str) -> list:
    """Sort key that orders "T=4" before "T=16"."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _plot(rows: list[dict], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"ours": "tab:green", "peer": "tab:orange", "baseline": "tab:gray"}
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(rows) + 1.2))
    names = [r["provider"] for r in rows][::-1]
    means = [r["mean"] * 1e3 for r in rows][::-1]
    ax.barh(names, means, color=[colors.get(r["role"], "tab:blue") for r in rows][::-1])
    if max(means) / min(means) > 30:
        ax.set_xscale("log")
    else:
        ax.set_xlim(0, max(means) * 1.2)  # room for the labels
    for y, m in enumerate(means):
        ax.text(m, y, f" {m:.0f} ms" if m >= 100 else f" {m:.3g} ms", va="center", fontsize=8)
    ax.set_xlabel("mean time per call (ms, lower is better)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(results: Path) -> Path:
    lines = ["# Benchmark report", "",
             "Written by `bench/report.py` from `bench/results/<device>/<suite>.json` (pytest-benchmark).",
             "Speed-ups compare mean times with the group's naive baseline (and its peer library, where",
             "there is one); GB/s is the bytes a call must move over its mean time, against a large",
             "tensor copy timed in the same run. A timing is only comparable with others on the same device.", ""]
    for device_dir in sorted(p for p in results.iterdir() if p.is_dir()):
        for path in sorted(device_dir.glob("*.json")):
            run = json.loads(path.read_text())
            groups: dict[str, list[dict]] = defaultdict(list)
            for b in run["benchmarks"]:
                groups[b.get("group") or b["name"].split("[")[0]].append(b)
            info = run["benchmarks"][0].get("extra_info", {}) if run["benchmarks"] else {}
            threads = sorted({b["extra_info"]["threads"] for b in run["benchmarks"] if "threads" in b.get("extra_info", {})})
            mi = run["machine_info"]
            lines += [f"## {path.stem} on {device_dir.name}", "",
                      f"{run.get('datetime', '')[:19]} UTC, torch {mi.get('torch', '?')}, "
                      f"{mi.get('cpu', {}).get('count', '?')} CPU cores"
                      + (f", {' / '.join(map(str, threads))} torch thread(s)" if threads else "")
                      + (f", 1-min load average {info['load_avg_1min']:.1f} at the start" if "load_avg_1min" in info else "")
                      + (f", GLIBC_TUNABLES={mi['glibc_tunables']}" if mi.get("glibc_tunables") else "")
                      + f"; raw data: `{device_dir.name}/{path.name}`.", ""]
            rows_of = {group: _rows(benches) for group, benches in groups.items()}
            lines += _ours_summary(rows_of)
            for group, rows in sorted(rows_of.items(), key=lambda item: _natural(item[0])):
                png = device_dir / f"{path.stem}-{_slug(group)}.png"
                _plot(rows, group, png)
                lines += [f"### {group}", "", *_table(rows), "", f"![{group}]({device_dir.name}/{png.name})", ""]
    report = results / "REPORT.md"
    report.write_text("\n".join(lines))
    return report


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=RESULTS, help="the results directory (default: bench/results)")
    parser.add_argument("--merge", type=Path, nargs="+", metavar="RUN", help="runs to join into last.json first")
    args = parser.parse_args(argv)
    if args.merge:
        print(f"wrote {merge_runs(args.merge, args.results)}")
    for path in split_last_run(args.results):
        print(f"wrote {path}")
    print(f"wrote {write_report(args.results)}")


if __name__ == "__main__":
    main()
