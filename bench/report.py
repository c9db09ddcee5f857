"""Turn a pytest-benchmark JSON into a table of ratios (and optionally a plot).

    python bench/report.py bench/results/cpu_subm.json [--baseline dense-nchw] [--plot out.png]

For every group the table lists each implementation's median time and its speed-up over the
baseline (baseline time / its time), plus spconv2d's speed relative to every other row.
"""
import argparse
import json
from collections import defaultdict


def load(path):
    with open(path) as f:
        data = json.load(f)
    groups = defaultdict(dict)
    for b in data["benchmarks"]:
        groups[b["group"]][b["extra_info"].get("impl", b["name"])] = b["stats"]["median"]
    return data.get("machine_info", {}), groups


def table(groups, baseline, ours="spconv2d"):
    impls = sorted({i for g in groups.values() for i in g})
    lines = ["| group | " + " | ".join(f"{i} (ms)" for i in impls) + f" | {ours} speed-up vs " +
             " / ".join(i for i in impls if i != ours) + " |",
             "|" + " --- |" * (len(impls) + 2)]
    for name in sorted(groups):
        g = groups[name]
        times = " | ".join(f"{g[i] * 1e3:.1f}" if i in g else "-" for i in impls)
        ratios = " / ".join(f"{g[i] / g[ours]:.1f}x" if i in g and ours in g else "-" for i in impls if i != ours)
        lines.append(f"| {name} | {times} | {ratios} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("json")
    p.add_argument("--baseline", default="dense-nchw")
    p.add_argument("--ours", default="spconv2d")
    a = p.parse_args(argv)
    info, groups = load(a.json)
    cpu = info.get("cpu", {}).get("brand_raw", info.get("processor", "?"))
    print(f"machine: {cpu}, {info.get('node', '')}")
    print(table(groups, a.baseline, a.ours))


if __name__ == "__main__":
    main()
