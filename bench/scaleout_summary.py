"""Summarise `bench/scaleout_epochs.sh OUTDIR`: per configuration, each run's per-epoch
training and epoch times (from metrics.json) and the load average logged around the run.

    python bench/scaleout_summary.py OUTDIR
"""
import glob
import json
import os
import re
import sys


def main(out: str) -> None:
    loads = {}
    with open(os.path.join(out, "log.txt")) as f:
        for line in f:
            m = re.match(r"== (\S+) (start|end) .*load (\S+) (\S+) (\S+)", line)
            if m:
                loads.setdefault(m.group(1), []).append(float(m.group(3)))
    rows = []
    for path in sorted(glob.glob(os.path.join(out, "r*", "metrics.json"))):
        name = os.path.basename(os.path.dirname(path))
        m = json.load(open(path))
        run = m.get("run", {})
        ep = m["epochs"]
        rows.append((name.split("_", 1)[1], name, run.get("processes"), run.get("global_batch_size"), run.get("amp"),
                     [round(e["train_time_s"], 1) for e in ep], [round(e["time_s"], 1) for e in ep],
                     loads.get(name)))
    print("| config | run | processes | global batch | amp | train s per epoch (1, 2) | epoch s incl. eval (1, 2) | load before / after |")
    print("|---|---|---|---|---|---|---|---|")
    for cfg, name, p, g, amp, tr, tot, ld in sorted(rows):
        print(f"| {cfg} | {name} | {p} | {g} | {amp} | {tr} | {tot} | {ld} |")


if __name__ == "__main__":
    main(sys.argv[1])
