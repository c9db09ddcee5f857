"""The trade-off study's report: figures (matplotlib, Agg) and ``REPORT.md``, from ``results.json``.

    write_report(results, out)       # what ``spconv2d study`` calls at the end
    python -m spconv2d.zoo.report reports/study-mnist-streets    # redraw from results.json

Figures (PNG, in ``out``), each with a one-line reading computed from the numbers:

* ``pareto.png`` — accuracy / mIoU vs latency per image (log), one row per data set, one column
  per batch size at the main setting (all cores; the GPU's too when one was used); marker area =
  parameters; sparse models labelled with their density; the frontier dashed.
* ``density_sweep-<data>.png`` — mIoU (left axis), executed MACs as a fraction of dense and the
  speed-up over the dense twin (right axis) vs density.
* ``time_breakdown-<data>.png`` — where the time goes: per-stage latency of ``unet`` and
  ``sparse_unet`` as stacked bars, per timing setting.
* ``per_class-<data>.png`` — per-class IoU, dense vs sparse.
* ``qualitative-<data>.png`` — validation scenes: input | ground truth | dense prediction | sparse
  prediction | active mask | where the two disagree and where the sparse one is wrong.
* ``training_curves.png`` — validation metric and training loss vs training time, every model.

Also ``README-results.md``: the README's zoo results (a table and the where-sparsity-pays
sentences, with the command and the machine), ready to paste.
"""
from __future__ import annotations

import json
import math
import os
import sys
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from .streets import CITYSCAPES_CLASSES, colorize

SPARSE_MARK, DENSE_MARK = "o", "s"


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _pct(x: Optional[float], nd: int = 2) -> str:
    return "–" if x is None else f"{100 * x:.{nd}f}"


def _ms(x: Optional[float]) -> str:
    if x is None:
        return "–"
    return f"{x:.3f}" if x < 1 else f"{x:.2f}" if x < 10 else f"{x:.1f}"


def _dur(s: Optional[float]) -> str:
    if s is None:
        return "–"
    s = float(s)
    return f"{s:.1f} s" if s < 60 else f"{int(s // 60)} min {int(round(s % 60)):02d} s"


def _mmac(x: float) -> str:
    return f"{x / 1e6:.2f}" if x < 1e7 else f"{x / 1e6:.0f}"


def _speed(x: float) -> str:
    """'1.21x faster than' / '2.50x slower than' (x: a speed-up)."""
    return f"{x:.2f}x faster than" if x >= 1 else f"{1 / x:.2f}x slower than"


def _log_axis(axis) -> None:
    from matplotlib.ticker import FuncFormatter

    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(FuncFormatter(lambda v, _: ""))


def main_settings(block: Dict[str, Any]) -> List[str]:
    """The settings the figures show: the CPU at its most threads, then the GPU (every batch)."""
    settings = block["settings"]
    cpu = [s for s in settings if s.startswith("cpu-")]
    most = max((int(s.split("-")[1][:-1]) for s in cpu), default=None)
    out = [s for s in cpu if most is not None and s.startswith(f"cpu-{most}t-")]
    return out + [s for s in settings if not s.startswith("cpu-")]


def describe_setting(block: Dict[str, Any], s: str) -> str:
    lat = block["models"][0]["latency"][s]
    where = f"CPU, {lat['threads']} thread{'s' if lat['threads'] != 1 else ''}" if lat["device"] == "cpu" else "GPU"
    return f"{where}, batch {lat['batch']}"


def _ref(block) -> Tuple[Optional[dict], Optional[dict]]:
    """(dense twin entry, sparse entry at its trained density) of a data set."""
    models = block["models"]
    if block["task"] == "segmentation":
        dense = next((m for m in models if m["model"] == "unet"), None)
        sparse = next((m for m in models if m["model"] == "sparse_unet" and m["density"] is not None
                       and abs(m["density"] - (m["trained_density"] or -1)) < 1e-9
                       and "trained" not in m["id"]), None)
    else:
        dense = next((m for m in models if m["model"] == "cnn"), None)
        sparse = next((m for m in models if m["model"] == "sparse_cnn"), None)
    return dense, sparse


def _sweep(block) -> List[dict]:
    return sorted([m for m in block["models"] if m["model"] == "sparse_unet" and "trained" not in m["id"]],
                  key=lambda m: m["density"])


def _trained_sweep(block) -> List[dict]:
    ref = _ref(block)[1]
    pts = [m for m in block["models"] if m["model"] == "sparse_unet" and "trained" in m["id"]]
    return sorted(pts + ([ref] if ref is not None and pts else []), key=lambda m: m["density"])


def _label(m: dict) -> str:
    if m["model"] == "sparse_unet":
        return f"{m['density']:.2f}" + ("*" if "trained" in m["id"] else "")
    if m["sparse"]:
        return f"{m['model']} ({m['measured_density']:.2f})"
    return m["model"]


# --------------------------------------------------------------------------------------------
# figures
# --------------------------------------------------------------------------------------------
def _frontier(points: List[Tuple[float, float]]) -> List[Tuple[float, float]]:
    """The Pareto frontier (lower latency, higher metric), by increasing latency."""
    best, out = -math.inf, []
    for x, y in sorted(points):
        if y > best:
            out.append((x, y))
            best = y
    return out


def fig_pareto(results, out) -> Tuple[str, str]:
    plt = _plt()
    blocks = results["data"]
    ncols = max(len(main_settings(b)) for b in blocks.values())
    fig, axes = plt.subplots(len(blocks), ncols, figsize=(5.2 * ncols, 4.2 * len(blocks)), squeeze=False)
    pmax = max(m["parameters"] for b in blocks.values() for m in b["models"])
    readings = []
    for i, (data, b) in enumerate(blocks.items()):
        settings = main_settings(b)
        for j in range(ncols):
            ax = axes[i, j]
            if j >= len(settings):
                ax.axis("off")
                continue
            s = settings[j]
            pts = []
            for m in b["models"]:
                x, y = m["latency"][s]["per_image_ms"], 100 * m["value"]
                lo, hi = m["latency"][s]["per_image_p25_ms"], m["latency"][s]["per_image_p75_ms"]
                color = "C0" if m["model"] in ("mlp",) else "C1" if not m["sparse"] else "C2"
                if "trained" in m["id"]:
                    color = "C4"
                ax.errorbar([x], [y], xerr=[[x - lo], [hi - x]], fmt="none", ecolor=color, alpha=0.5, lw=1)
                ax.scatter([x], [y], s=40 + 900 * m["parameters"] / pmax,
                           marker=SPARSE_MARK if m["sparse"] else DENSE_MARK, color=color, alpha=0.7, edgecolors="k", linewidths=0.5, zorder=3)
                ax.annotate(_label(m), (x, y), textcoords="offset points", xytext=(6, 4), fontsize=7)
                pts.append((x, y))
            fr = _frontier(pts)
            ax.plot([p[0] for p in fr], [p[1] for p in fr], "k--", lw=0.8, alpha=0.6, zorder=1)
            ax.set_xscale("log")
            _log_axis(ax.xaxis)
            ax.set_xlabel(f"latency per image (ms, log) — {describe_setting(b, s)}")
            ax.set_ylabel(f"{b['metric']} (%)")
            ax.set_title(f"{data}: {b['metric']} vs latency", fontsize=10)
            ax.grid(alpha=0.3, which="both")
        s_main = settings[-1] if settings else None
        dense, sparse = _ref(b)
        if s_main and dense and sparse:
            sp_ = sparse["speedup_vs_dense"][s_main]["paired_median"]
            readings.append(f"{data} ({describe_setting(b, s_main)}): {sparse['model']} at "
                            f"{sparse['measured_density']:.2f} is {_speed(sp_)} {dense['model']} per image for "
                            f"{100 * (sparse['value'] - dense['value']):+.2f} points")
    fig.suptitle("Pareto view: marker area = parameters; squares dense, circles sparse (label: density; "
                 "* trained at that density); bars: inter-quartile range", fontsize=9)
    fig.tight_layout()
    path = os.path.join(out, "pareto.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return "pareto.png", "; ".join(readings) + "." if readings else ""


def fig_density_sweep(data, b, out) -> Tuple[str, str]:
    plt = _plt()
    sweep = _sweep(b)
    dense, ref = _ref(b)
    d = [m["density"] for m in sweep]
    fig, ax = plt.subplots(figsize=(7.5, 5.6))
    ax.plot(d, [100 * m["value"] for m in sweep], "o-", color="C2", label=f"sparse_unet (trained at "
            f"{ref['trained_density']:.2f}) mIoU")
    tr = _trained_sweep(b)
    if tr:
        ax.plot([m["density"] for m in tr], [100 * m["value"] for m in tr], "D-", color="C4",
                label="sparse_unet trained at each density, mIoU")
    ax.axhline(100 * dense["value"], color="C1", ls="--", label=f"unet mIoU {100 * dense['value']:.2f}")
    ax.set_xscale("log")
    _log_axis(ax.xaxis)
    ax.set_xticks(d)
    ax.set_xlabel("target density (fraction of active pixels)")
    ax.set_ylabel("mIoU (%)")
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(d, [m["macs"]["fraction"] for m in sweep], "s:", color="0.4", label="executed MACs / dense")
    styles = ["-", "--", "-.", ":"]
    speed_lines = []
    for k, s in enumerate(b["settings"]):
        y = [m["speedup_vs_dense"][s]["paired_median"] for m in sweep]
        ax2.plot(d, y, marker="^", ls=styles[k % 4], color=f"C{(k + 5) % 10}",
                 label=f"speed-up ({describe_setting(b, s)})")
        speed_lines.append((s, y))
    ax2.axhline(1.0, color="k", lw=0.6)
    ax2.set_ylabel("executed MACs / dense;  speed-up over unet (x)")
    ax2.set_ylim(bottom=0)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)
    ax.set_title(f"{data}: the density sweep (inference with the model's mask policy)", fontsize=10)
    fig.tight_layout()
    name = f"density_sweep-{data}.png"
    fig.savefig(os.path.join(out, name), dpi=110)
    plt.close(fig)
    # reading: where mIoU stays close, where it is faster
    within = [m["density"] for m in sweep if dense["value"] - m["value"] <= 0.01]
    s_main = main_settings(b)[-1]
    faster = [m["density"] for m in sweep if m["speedup_vs_dense"][s_main]["paired_median"] > 1.0]
    lo = min(sweep, key=lambda m: m["density"])
    parts = [f"mIoU within 1 point of unet at density >= {min(within):g}" if within else
             "mIoU more than 1 point below unet at every density"]
    parts.append(f"faster than unet ({describe_setting(b, s_main)}) at density <= {max(faster):g}" if faster
                 else f"not faster than unet at any density ({describe_setting(b, s_main)})")
    parts.append(f"at {lo['density']:g} it executes {100 * lo['macs']['fraction']:.0f}% of the dense MACs and is "
                 f"{_speed(lo['speedup_vs_dense'][s_main]['paired_median'])} unet")
    return name, "; ".join(parts) + "."


def fig_time_breakdown(data, b, out) -> Tuple[str, str]:
    plt = _plt()
    steps = b["steps"]
    from .measure import NESTED_STAGES, UNET_STAGES

    present = {k for st in steps.values() for mod in st["models"].values() for k in mod["stages_ms"]}
    present -= set(NESTED_STAGES)  # part of the stage they run in
    order = [n for n, _, _ in UNET_STAGES if n in present] + sorted(present - {n for n, _, _ in UNET_STAGES})
    order.append("other")
    cmap = plt.get_cmap("tab20")
    colors = {k: cmap(i % 20) for i, k in enumerate(order)}
    # one panel per setting, each with its own scale (a busy machine can make one setting slower)
    fig, axes = plt.subplots(1, len(steps), figsize=(1.6 + 2.6 * len(steps), 5.2), squeeze=False)
    for ax, (s, st) in zip(axes[0], steps.items()):
        for x, name in enumerate(("unet", "sparse_unet")):
            mod = st["models"][name]
            bottom = 0.0
            for k in order:
                v = mod["other_ms"] if k == "other" else mod["stages_ms"].get(k, {}).get("median", 0.0)
                v = max(v, 0.0)
                if v:
                    ax.bar(x, v, 0.7, bottom=bottom, color=colors[k], edgecolor="w", linewidth=0.4)
                bottom += v
            ax.text(x, bottom, f"{mod['total_ms']['median']:.1f}", ha="center", va="bottom", fontsize=8)
        ax.set_xticks([0, 1])
        ax.set_xticklabels(["unet", "sparse_unet"], fontsize=8)
        where = "GPU" if st["device"] != "cpu" else f"CPU, {st['threads']} thread{'s' if st['threads'] != 1 else ''}"
        ax.set_title(f"{where}, batch {st['batch']}", fontsize=9)
        ax.set_xlim(-0.6, 1.6)
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].set_ylabel("ms per batch (stage medians of alternating rounds)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[k]) for k in order]
    axes[0, -1].legend(handles, order, fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.suptitle(f"{data}: where the time goes (steps wrapped on the instance; 'other': the rest of forward)",
                 fontsize=10)
    fig.tight_layout()
    name = f"time_breakdown-{data}.png"
    fig.savefig(os.path.join(out, name), dpi=110)
    plt.close(fig)
    # reading: the last (main) setting
    s_main = list(steps)[-1]
    st = steps[s_main]
    sp_ = st["models"]["sparse_unet"]
    top = sorted(sp_["stages_ms"].items(), key=lambda kv: -kv[1]["median"])[:3]
    overhead = sum(sp_["stages_ms"].get(k, {}).get("median", 0.0)
                   for k in ("mask", "cell states", "output assembly", "refinement"))
    dense_ctx = sp_["stages_ms"].get("dense context head", {}).get("median", 0.0)
    reading = (f"at {s_main}: unet {st['models']['unet']['total_ms']['median']:.1f} ms, sparse_unet "
               f"{sp_['total_ms']['median']:.1f} ms per batch; sparse_unet's largest stages "
               + ", ".join(f"{k} {v['median']:.1f} ms" for k, v in top)
               + f"; mask + inactive-pixel steps {overhead:.1f} ms "
               f"({100 * overhead / sp_['total_ms']['median']:.0f}%), "
               f"dense context head {dense_ctx:.1f} ms")
    return name, reading + "."


def fig_per_class(data, b, out) -> Tuple[str, str]:
    plt = _plt()
    dense, sparse = _ref(b)
    names = [n for n in b.get("eval_classes") or dense["per_class"]
             if dense["per_class"].get(n) is not None or sparse["per_class"].get(n) is not None]
    dv = [100 * (dense["per_class"][n] or 0) for n in names]
    sv = [100 * (sparse["per_class"].get(n) or 0) for n in names]
    fig, ax = plt.subplots(figsize=(7.5, 1.5 + 0.38 * len(names)))
    y = np.arange(len(names))
    ax.barh(y - 0.2, dv, 0.4, color="C1", label=f"unet ({100 * dense['value']:.2f} mIoU)")
    ax.barh(y + 0.2, sv, 0.4, color="C2", label=f"sparse_unet @ {sparse['density']:.2f} ({100 * sparse['value']:.2f})")
    ax.set_yticks(y)
    ax.set_yticklabels(names)
    ax.invert_yaxis()
    ax.set_xlabel("IoU (%)")
    ax.set_xlim(0, 100)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1 - 0.5 / max(len(names), 1)), ncol=2)
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(f"{data}: per-class IoU on the validation split", fontsize=10)
    fig.tight_layout()
    name = f"per_class-{data}.png"
    fig.savefig(os.path.join(out, name), dpi=110)
    plt.close(fig)
    gaps = sorted(zip(names, dv, sv), key=lambda t: t[2] - t[1])
    worst = [f"{n} {a:.1f} vs {c:.1f}" for n, a, c in gaps[:3] if c < a]
    close = sum(1 for _, a, c in gaps if a - c <= 1.0)
    reading = (f"sparse_unet is within 1 point of unet on {close} of {len(names)} classes"
               + (f"; the largest gaps (unet vs sparse): {', '.join(worst)}" if worst else ""))
    return name, reading + "."


def fig_qualitative(data, b, out) -> Tuple[str, str]:
    plt = _plt()
    q = np.load(os.path.join(out, b["qualitative"]["file"]))
    images, gt, pd, ps, mask = q["images"], q["targets"], q["dense"], q["sparse"], q["mask"]
    n = len(images)
    cols = ["input", "ground truth", "unet", "sparse_unet", "active mask", "disagreement"]
    fig, axes = plt.subplots(n, len(cols), figsize=(len(cols) * 2.3, n * 1.3 + 0.8), squeeze=False)
    labelled = gt != 255
    tot = dict(dis=0, dis_sw=0, sw=0, sw_inactive=0, px=0)
    for i in range(n):
        lab = labelled[i]
        dis = (pd[i] != ps[i]) & lab
        sw = (ps[i] != gt[i]) & lab
        dw = (pd[i] != gt[i]) & lab
        grey = images[i].mean(2, keepdims=True).repeat(3, 2) / 255.0 * 0.5 + 0.25
        over = grey.copy()
        over[dis & ~sw] = (1.0, 0.85, 0.0)   # they disagree, sparse right (the dense one's error)
        over[dis & sw] = (0.9, 0.0, 0.0)     # they disagree, sparse wrong
        over[~dis & sw & dw] = (0.0, 0.8, 0.9)  # both wrong the same way
        panels = [images[i], colorize(gt[i]), colorize(pd[i]), colorize(ps[i]), mask[i], over]
        for j, p in enumerate(panels):
            axes[i, j].imshow(p, cmap="gray" if j == 4 else None, vmin=0, vmax=1, interpolation="nearest")
            axes[i, j].axis("off")
            if i == 0:
                axes[i, j].set_title(cols[j], fontsize=9)
        tot["dis"] += int(dis.sum())
        tot["dis_sw"] += int((dis & sw).sum())
        tot["sw"] += int(sw.sum())
        tot["sw_inactive"] += int((sw & ~mask[i]).sum())
        tot["px"] += int(lab.sum())
    fig.suptitle(f"{data}: validation scenes; sparse_unet at density {float(q['density']):.2f}. Last column: "
                 "red = they disagree and sparse is wrong, yellow = they disagree and sparse is right, "
                 "cyan = both wrong alike", fontsize=8)
    fig.tight_layout()
    name = f"qualitative-{data}.png"
    fig.savefig(os.path.join(out, name), dpi=110)
    plt.close(fig)
    px = max(tot["px"], 1)
    reading = (f"over these {n} scenes the predictions disagree on {100 * tot['dis'] / px:.1f}% of the labelled "
               f"pixels, {100 * tot['dis_sw'] / max(tot['dis'], 1):.0f}% of those are sparse errors; "
               f"{100 * tot['sw_inactive'] / max(tot['sw'], 1):.0f}% of the sparse model's errors "
               f"({100 * tot['sw'] / px:.1f}% of the pixels) lie on inactive pixels")
    return name, reading + "."


def fig_training_curves(results, out) -> Tuple[str, str]:
    plt = _plt()
    blocks = results["data"]
    fig, axes = plt.subplots(2, len(blocks), figsize=(6.2 * len(blocks), 7.0), squeeze=False)
    readings = []
    for j, (data, b) in enumerate(blocks.items()):
        seen = set()
        for k, m in enumerate(b["models"]):
            run = m["train"]["run"]
            if run in seen:
                continue
            seen.add(run)
            hist = m["train"]["history"]
            if not hist:
                continue
            t = np.cumsum([h["time_s"] for h in hist])
            lab = m["model"] + (f" (trained @ {m['trained_density']:.2f})" if m["model"] == "sparse_unet" else "")
            style = "o-" if len(hist) < 30 else "-"
            axes[0, j].plot(t, [100 * h[b["metric"]] for h in hist], style, ms=3, label=lab)
            axes[1, j].plot(t, [h["train_loss"] for h in hist], style, ms=3, label=lab)
            readings.append(f"{m['model']}{'' if m['model'] != 'sparse_unet' else ' @ %.2f' % m['trained_density']} "
                            f"{_dur(m['train']['train_time_s'])}")
        axes[0, j].set_ylabel(f"val {b['metric']} (%)")
        axes[1, j].set_ylabel("train loss")
        axes[1, j].set_yscale("log")
        _log_axis(axes[1, j].yaxis)
        for a in axes[:, j]:
            a.set_xlabel("training time (s)")
            a.set_xlim(left=0)
            a.grid(alpha=0.3)
            a.legend(fontsize=7)
        axes[0, j].set_title(f"{data}: training curves (one point per epoch)", fontsize=10)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "training_curves.png"), dpi=110)
    plt.close(fig)
    return "training_curves.png", "training time: " + ", ".join(readings) + "."


# --------------------------------------------------------------------------------------------
# REPORT.md
# --------------------------------------------------------------------------------------------
def where_sparsity_pays(results) -> List[str]:
    """Sentences the data supports: per data set and setting, the sparse twin's speed-up and
    metric change at its trained density, and (segmentation) the densities at which it is faster
    and within 1 point."""
    out = []
    for data, b in results["data"].items():
        dense, sparse = _ref(b)
        if dense is None or sparse is None:
            continue
        dm = 100 * (sparse["value"] - dense["value"])
        per = []
        for s in b["settings"]:
            x = sparse["speedup_vs_dense"][s]
            per.append(f"{x['paired_median']:.2f}x ({describe_setting(b, s)})")
        line = (f"**{data}**: `{sparse['model']}` at density {sparse['measured_density']:.2f} vs `{dense['model']}`: "
                f"{dm:+.2f} {b['metric']} points, speed-up per image " + ", ".join(per) + ".")
        if b["task"] == "segmentation":
            sweep = _sweep(b)
            good = []
            for s in b["settings"]:
                ok = [m["density"] for m in sweep if m["speedup_vs_dense"][s]["paired_median"] > 1.0
                      and dense["value"] - m["value"] <= 0.01]
                good.append(f"{describe_setting(b, s)}: " + (", ".join(f"{d:g}" for d in ok) if ok else "none"))
            line += (" Densities at which `sparse_unet` is both faster than `unet` and within 1 mIoU point: "
                     + "; ".join(good) + ".")
        out.append(line)
    return out


def _summary_table(data: str, b: Dict[str, Any]) -> List[str]:
    settings = b["settings"]
    heads = [f"ms/img {s}" for s in settings]
    main = main_settings(b)[-1]
    lines = [f"| model | density (target / measured) | {b['metric']} (%) | parameters | MMAC/img dense | "
             "MMAC/img executed (fraction) | " + " | ".join(heads)
             + f" | speed-up vs dense twin ({main}) | training |",
             "|---" * (8 + len(settings)) + "|"]
    for m in b["models"]:
        dens = (f"{m['density']:.2f} / {m['measured_density']:.3f}" if m["density"] is not None else
                f"– / {m['measured_density']:.3f}")
        lat = [f"{_ms(m['latency'][s]['per_image_ms'])}" for s in settings]
        su = m["speedup_vs_dense"][main] if m["speedup_vs_dense"] else None
        su_s = (f"{su['paired_median']:.2f}x [{su['paired_p25']:.2f}-{su['paired_p75']:.2f}]" if su else "–")
        tr = m["train"]
        trained = ("(same run)" if m["model"] == "sparse_unet" and "trained" not in m["id"]
                   and abs((m["density"] or 0) - (m["trained_density"] or 0)) > 1e-9 else
                   f"{_dur(tr['train_time_s'])}, {tr['epochs']} ep")
        lines.append(f"| `{m['label']}` | {dens} | {_pct(m['value'])} | {m['parameters']:,} | "
                     f"{_mmac(m['macs']['dense_per_image'])} | {_mmac(m['macs']['executed_per_image'])} "
                     f"({100 * m['macs']['fraction']:.0f}%) | " + " | ".join(lat) + f" | {su_s} | {trained} |")
    return lines


def _levels_table(b) -> List[str]:
    sparse = [m for m in b["models"] if m["sparse"]]
    if not sparse:
        return []
    shapes = []
    for m in sparse:
        for lv in m["levels"]:
            if lv["shape"] not in shapes:
                shapes.append(lv["shape"])
    lines = ["| model | " + " | ".join(f"{h}x{w}" for h, w in shapes) + " |", "|---" * (1 + len(shapes)) + "|"]
    for m in sparse:
        d = {tuple(lv["shape"]): lv["density"] for lv in m["levels"]}
        lines.append(f"| `{m['label']}` | " + " | ".join(f"{d[tuple(s)]:.3f}" if tuple(s) in d else "–"
                                                     for s in shapes) + " |")
    return lines


def write_markdown(results, out, figures: Dict[str, Dict[str, str]]) -> str:
    st, mach = results["study"], results["machine"]
    names = list(results["data"])
    L = [f"# spconv2d trade-off study: {', '.join(names)}", ""]
    if st["quick"]:
        L += ["> **Smoke run (`--quick`)**: tiny training budgets (one short epoch on a few hundred digits / a few "
              "dozen scenes), few timing rounds and scenes. It shows that the study runs end to end; its "
              "accuracies and speed ratios say nothing about the models. Run `spconv2d study` without `--quick` "
              "for the numbers.", ""]
    gpu = f"GPU {mach['gpu']} (CUDA {mach['cuda']})" if mach.get("gpu") else "no GPU used"
    load = mach.get("load_average")
    end = mach.get("load_average_end")
    load_txt = ("" if not load else f"; 1-min load average {load[0]:.2f} at the start"
                + (f", {end[0]:.2f} at the end" if end else "") + " (the study's own work included at the end)")
    L += [f"Measured on {mach['cpu']} ({mach['cores']} cores), {gpu}; torch {mach['torch']}, "
          f"sparse CPU backend `{mach['cpu_backend']}`{load_txt}. "
          f"{st['started']} to {st['finished']}: {_dur(st['stages_s'])} to train and measure "
          f"({_dur(st['train_s'])} of it training, reused runs included at their lookup time"
          + (f"; resumed after an interruption, this invocation {_dur(st['elapsed_s'])}" if st.get("resumed") else "")
          + ").",
          ""]
    if load and load[0] > 0.5:
        L += [f"> **The machine was busy**: a 1-min load average of {load[0]:.2f} on {mach['cores']} cores before the "
              "study started. Timings with more threads than idle cores wait for busy cores and are inflated, "
              "sometimes by several times; models timed in the same rounds suffer alike, so ratios hold up better "
              "than absolute times, and the 1-thread results better than the all-core ones.", ""]
    L += ["## Summary", ""]
    for data, b in results["data"].items():
        L += [f"### {data} ({b['task']}; {b['metric']} on the validation split: {b.get('source') or ''})", ""]
        L += _summary_table(data, b)
        rounds = {s: b["models"][0]["latency"][s]["rounds"] for s in b["settings"]}
        r_txt = (str(next(iter(rounds.values()))) if len(set(rounds.values())) == 1 else
                 ", ".join(f"{n} ({s})" for s, n in rounds.items()) + " (cut short by the timing budget)")
        L += ["", f"Latency: ms per image, `cpu-Nt-bB` = CPU with N threads at batch B (`cuda-bB`: the GPU), "
              f"mask policy included, median of {r_txt} rounds "
              "in which every model of the table ran once, alternating. Speed-up: median of the round-by-round "
              "ratios [inter-quartile range]. MACs: conv and linear layers over the whole validation split "
              "(dense: what the dense twin computes; executed: kernel-map pairs x C_in x C_out on the sparse "
              "path, plus the dense layers). `sparse_unet @ d`: the model trained at the default density, "
              "evaluated with its mask at density d.", ""]
        lv = _levels_table(b)
        if lv:
            L += ["Measured density at every level of the sparse networks (active sites / grid cells, validation "
                  "split):", ""] + lv + [""]
    L += ["## Where sparsity pays", ""] + [f"* {x}" for x in where_sparsity_pays(results)] + [""]
    L += ["## Figures", ""]
    for key, f in figures.items():
        L += [f"### {f['title']}", "", f"![{f['title']}]({f['file']})", "", f"*{f['reading']}*", ""]
    L += ["## How it was made", "", "```bash", st["command"], "```", "",
          f"Python: `{st['python_command']}`", "",
          "Training runs (a run is reused when a finished run with the same configuration exists under the runs "
          "folder; the equivalent `spconv2d train` command of each):", "",
          "| run | action | training time | threads | command |", "|---|---|---|---|---|"]
    seen = set()
    for b in results["data"].values():
        for m in b["models"]:
            tr = m["train"]
            if tr["run"] in seen:
                continue
            seen.add(tr["run"])
            L.append(f"| `{os.path.basename(tr['run'])}` | {tr['action']} | {_dur(tr['train_time_s'])} | "
                     f"{tr['threads'] if tr['threads'] is not None else '?'} | `{tr['command']}` |")
    L += ["", "Machine:", "", "| | |", "|---|---|"]
    for k, v in mach.items():
        if isinstance(v, list):
            v = ", ".join(f"{x:.2f}" if isinstance(x, float) else str(x) for x in v)
        L.append(f"| {k} | {v} |")
    L += ["", "Stages of this study (seconds; `resumed`: done before an interruption):", "",
          "| stage | s |", "|---|---|"]
    for t in st["stages"]:
        L.append(f"| {t['stage']} | {'–' if t['seconds'] is None else '%.1f' % t['seconds']}"
                 f"{' (resumed)' if t['resumed'] else ''} |")
    L += ["", "Every number is in `results.json` (per model and density: metric, per-class scores, parameters, "
          "MACs, per-level density, the sparse ops' records of one forward, latency per setting with its spread, "
          "speed-ups, training history).", ""]
    text = "\n".join(L)
    with open(os.path.join(out, "REPORT.md"), "w") as f:
        f.write(text)
    return text


def readme_results(results: Dict[str, Any], report_path: str = "REPORT.md") -> str:
    """The README's zoo results from a study: a table (metric, parameters, executed MACs,
    latency per image at every setting, speed-up over the dense twin) and the where-sparsity-pays
    sentences, with the command and machine. Written as ``README-results.md`` for pasting."""
    st, mach = results["study"], results["machine"]
    gpu = f", GPU {mach['gpu']}" if mach.get("gpu") else ", no GPU"
    load = f", 1-min load {mach['load_average'][0]:.2f} at the start" if mach.get("load_average") else ""
    L = [f"Measured by `{st['command']}` ({_dur(st['stages_s'])}; {mach['cpu']}, {mach['cores']} cores{gpu}{load}; "
         f"{st['finished'][:10]}). Full report with figures: [{report_path}]({report_path}).", ""]
    if st["quick"]:
        L += ["**(a `--quick` smoke run: not results)**", ""]
    for data, b in results["data"].items():
        main = main_settings(b)
        heads = " | ".join(f"ms/image {describe_setting(b, s)}" for s in b["settings"])
        L += [f"| model ({data}) | {b['metric']} | density | parameters | MMAC/image executed (of dense) | {heads} | "
              f"speed-up vs dense twin ({describe_setting(b, main[-1])}) |", "|---" * (6 + len(b["settings"])) + "|"]
        for m in b["models"]:
            su = m["speedup_vs_dense"][main[-1]]["paired_median"] if m["speedup_vs_dense"] else None
            L.append(f"| `{m['label']}` | {_pct(m['value'])} % | {m['measured_density']:.2f} | {m['parameters']:,} | "
                     f"{_mmac(m['macs']['executed_per_image'])} ({100 * m['macs']['fraction']:.0f} %) | "
                     + " | ".join(_ms(m["latency"][s]["per_image_ms"]) for s in b["settings"])
                     + f" | {'–' if su is None else '%.2fx' % su} |")
        L.append("")
    L += [f"* {x}" for x in where_sparsity_pays(results)]
    return "\n".join(L) + "\n"


def write_report(results: Dict[str, Any], out: str) -> Dict[str, Dict[str, str]]:
    """Draw every figure and write ``REPORT.md`` into ``out``; returns ``{key: {file, title,
    reading}}`` (also stored in ``results.json`` as ``figures``)."""
    os.makedirs(out, exist_ok=True)
    figs: Dict[str, Dict[str, str]] = {}

    def add(key, title, fn, *args):
        name, reading = fn(*args)
        figs[key] = {"file": name, "title": title, "reading": reading}

    add("pareto", "Accuracy / mIoU vs latency per image (the Pareto view)", fig_pareto, results, out)
    for data, b in results["data"].items():
        if b["task"] != "segmentation":
            continue
        add(f"density_sweep-{data}", f"{data}: the density sweep", fig_density_sweep, data, b, out)
        add(f"time_breakdown-{data}", f"{data}: where the time goes", fig_time_breakdown, data, b, out)
        add(f"per_class-{data}", f"{data}: per-class IoU, dense vs sparse", fig_per_class, data, b, out)
        add(f"qualitative-{data}", f"{data}: validation scenes", fig_qualitative, data, b, out)
    add("training_curves", "Training curves", fig_training_curves, results, out)
    write_markdown(results, out, figs)
    with open(os.path.join(out, "README-results.md"), "w") as f:
        f.write(readme_results(results))
    return figs


def main(argv=None) -> int:
    """``python -m spconv2d.zoo.report OUT``: redraw the figures and REPORT.md from OUT/results.json."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m spconv2d.zoo.report STUDY_FOLDER", file=sys.stderr)
        return 2
    with open(os.path.join(args[0], "results.json")) as f:
        results = json.load(f)
    results["figures"] = write_report(results, args[0])
    print(os.path.join(args[0], "REPORT.md"))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
