"""The comparison's outputs: report.json (SCHEMA_VERSION, docs/compare.md), report.md, the terminal
table, latency.png, error_vs_timestep.png and samples.gif.

`write_gif` is shared with `vdit calibrate report`: one column per runtime or precision, so the eye
compares the same sample across them."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from vdit_deploy.errors import VditError
from vdit_deploy.files import atomic_path
from vdit_deploy.plots import plot_error_vs_timestep, pyplot, save

SCHEMA_VERSION = 2          # 2: settings.conditioning (labels or --cond rows) replaced settings.labels

COLUMNS = ("runtime", "batch", "start s", "step ms p50/p90", "sample s p50±sd", "video/s", "RSS MB",
           "size MB", "eps relL2", "PSNR dB", "SSIM", "max err")


def fmt(v, spec: str, none: str = "-") -> str:
    return none if v is None else format(v, spec)


def table_rows(report: dict) -> list[tuple[list[str], bool]]:
    """(cells, below threshold) per result row."""
    out = []
    for r in report["results"]:
        if r["status"] != "ok":
            out.append(([r["label"], str(r["batch"]), f"failed: {r['reason']}"], True))
            continue
        lat, acc, mem = r["latency"], r["accuracy"], r["memory"]
        ref = "ref" if acc and acc["reference"] else ("-" if acc is None else "")
        acc = acc or {}
        psnr_cell = ref or ("non-finite" if not acc["finite"] else
                            "identical" if acc["psnr_db"] is None else f"{acc['psnr_db']:.1f}")
        out.append(([r["label"], str(r["batch"]), f"{r['startup']['total_s']:.2f}",
                     f"{lat['step_ms']['median']:.1f}/{lat['step_ms']['p90']:.1f}",
                     f"{lat['sample_s']['median']:.2f}±{lat['sample_s']['std']:.2f}",
                     f"{r['throughput_videos_per_s']:.2f}",
                     fmt(mem["host_rss_delta_mb"] if mem["host_rss_delta_mb"] is not None
                          else mem["host_peak_rss_mb"], ".0f"),
                     f"{r['artifact']['bytes'] / 1e6:.1f}",
                     ref or f"{acc['eps_rel_l2_mean']:.1e}", psnr_cell, ref or fmt(acc["ssim"], ".4f"),
                     ref or f"{acc['max_abs']:.1e}"], bool(acc.get("below_threshold"))))
    return out


def format_table(report: dict, color: bool = True) -> str:
    import click

    rows = table_rows(report)
    widths = [max([len(c)] + [len(cells[i]) for cells, _ in rows if i < len(cells)]) for i, c in enumerate(COLUMNS)]
    line = lambda cells: "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    lines = [line(COLUMNS)]
    for cells, bad in rows:
        text = line(cells) if len(cells) == len(COLUMNS) else "  ".join(cells)
        lines.append(click.style(text, fg="red") if bad and color else text)
    for s in report["skipped"]:
        lines.append(f"{s['label']:<{widths[0]}}  skipped: {s['reason']}")
    return "\n".join(lines)


def format_markdown(report: dict, plots: dict) -> str:
    m, s = report["machine"], report["settings"]
    gpu = ", ".join(f"{g['name']} (driver {g['driver']})" for g in m["gpus"]) or "none"
    libs = ", ".join(f"{k} {v}" for k, v in m["libraries"].items() if v and k != "onnxruntime_providers")
    md = [f"# vdit compare ({report['created']})", "",
          f"- source: `{report['source']['path']}` ({report['source']['kind']}, checkpoint sha256 "
          f"`{report['source']['checkpoint_sha256'][:12]}`)",
          f"- machine: {m['cpu']}, {m['cpu_cores_usable']}/{m['cpu_cores']} cores usable, "
          f"{m['memory_gb']} GB RAM, GPU: {gpu}, load average {fmt(m['load_average_1m'], '.1f')} at start",
          f"- libraries: {libs}",
          f"- sampling: {s['sampler']} {s['steps']} steps, eta {s['eta']:g}, guidance {s['guidance']:g}, "
          f"seeds {s['seeds']}, batches {s['batches']}, {s['repeats']} timed runs after 1 warm-up, "
          f"threads {s['threads'] or 'runtime default'}",
          f"- reference: {report['reference']}; rows marked **below** have PSNR < {s['min_psnr_db']:g} dB", ""]
    md += [f"- note: {n}" for n in report["notes"]]
    md += ["", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for cells, bad in table_rows(report):
        cells = cells + [""] * (len(COLUMNS) - len(cells))
        if bad:
            cells[0] = f"**{cells[0]}** (below)"
        md.append("| " + " | ".join(cells) + " |")
    for sk in report["skipped"]:
        md.append(f"| {sk['label']} | | skipped: {sk['reason']} |" + " |" * (len(COLUMNS) - 3))
    md += ["", "start s: load + first call. step: one guided sampler step (one denoiser call on the "
           "cond+null batch + the update). sample: a full sample of `batch` videos. RSS MB: growth of the "
           "process's peak resident memory over load + all runs. size MB: the files the runtime loaded (an export's "
           "fused step.onnx holds a second copy of the weights). eps relL2: mean over steps and seeds of "
           "the denoiser's relative L2 error on the reference's inputs. PSNR/SSIM/max err: final videos "
           "against the reference's, worst seed.", ""]
    if report.get("cache"):
        from vdit_deploy.compare.cache_rows import format_cache_table
        md += ["## Step caching", "", "Each setting against the same runtime uncached, same noise and conditioning "
               "(vdit_deploy/compare/cache_rows.py): full calls = steps that ran the tail; speed-up = median over "
               "rounds of uncached / cached seconds; PSNR/SSIM: worst seed.", "", format_cache_table(report["cache"]),
               ""]
    for name, path in plots.items():
        if path:
            md.append(f"![{name}]({Path(path).name})")
    if report.get("gif_columns"):
        md.append(f"\nsamples.gif columns, left to right: {', '.join(report['gif_columns'])}")
    return "\n".join(md) + "\n"


def write_outputs(report: dict, out: Path, decoder=None) -> dict:
    """Write every output under `out` (each file atomically) -> report["files"]: their names. decoder:
    (what decodes latents, its name) for samples.gif, one for every column (compare.gif_decoder)."""
    out.mkdir(parents=True, exist_ok=True)
    ok = [r for r in report["results"] if r["status"] == "ok"]
    files = {"json": "report.json", "markdown": "report.md", "latency_plot": None, "error_plot": None,
             "gif": None, **({"cache_plot": None} if report.get("cache") else {})}
    try:
        files["latency_plot"] = plot_latency(ok, out / "latency.png").name
        files["error_plot"] = plot_errors(ok, out / "error_vs_timestep.png").name
        if any(r["status"] == "ok" for r in report.get("cache", [])):
            from vdit_deploy.compare.cache_rows import plot_sweep
            files["cache_plot"] = plot_sweep(report["cache"], out / "cache_sweep.png").name
    except ImportError:
        report["notes"].append("plots skipped: matplotlib is not installed (pip install 'vdit-deploy[report]')")
    smallest = min((r["batch"] for r in ok), default=None)
    columns = {r["label"]: r["_video"][None] for r in ok if r["batch"] == smallest}   # (1, C, F, H, W) each
    if columns and decoder is not None:
        try:
            columns = {k: decoder[0].decode(v) for k, v in columns.items()}
            report["notes"].append(f"samples.gif: frames decoded by {decoder[1]}, the same decoder for every column")
        except VditError as e:
            report["notes"].append(f"samples.gif shows latents: decoding failed ({e})")
    if columns and (gif := write_gif(out / "samples.gif", columns, report["notes"])):
        files["gif"], report["gif_columns"] = gif, list(columns)
    for r in report["results"]:
        r.pop("_video", None)
    report["files"] = files
    with atomic_path(out / "report.json") as tmp:
        tmp.write_text(json.dumps(report, indent=1) + "\n")
    with atomic_path(out / "report.md") as tmp:
        tmp.write_text(format_markdown(report, {"latency": files["latency_plot"], "error": files["error_plot"],
                                                "samples": files["gif"], "cache sweep": files.get("cache_plot")}))
    return files


def write_gif(path: Path, columns: dict[str, np.ndarray], notes: list[str]) -> str | None:
    """A grid GIF, one column per key (its name drawn above it), one row per video of its (N, C, F, H, W) array -> its file name,
    or None with the reason in `notes` (a video it cannot draw is no reason to lose the report)."""
    from vdit_deploy.video import write_video

    grid = np.stack(list(columns.values()), axis=1)                 # (N, columns, C, F, H, W)
    try:
        write_video(path, grid.reshape(-1, *grid.shape[2:]), columns=len(columns), titles=list(columns))
    except VditError as e:
        notes.append(f"GIF skipped: {e}")
        return None
    return path.name


def plot_latency(rows: list[dict], path: Path) -> Path:
    """Median latency per runtime, one bar group per batch; whiskers reach p90."""
    plt = pyplot()
    labels = list(dict.fromkeys(r["label"] for r in rows))
    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2), dpi=80)
    width = 0.8 / max(len(batches), 1)
    for ax, key, unit, scale in ((axes[0], "step_ms", "ms per step", 1.0), (axes[1], "sample_s", "s per sample", 1.0)):
        for j, b in enumerate(batches):
            med, p90, xs = [], [], []
            for i, label in enumerate(labels):
                r = next((r for r in rows if r["label"] == label and r["batch"] == b), None)
                if r:
                    xs.append(i + (j - (len(batches) - 1) / 2) * width)
                    med.append(r["latency"][key]["median"] * scale)
                    p90.append(r["latency"][key]["p90"] * scale)
            ax.bar(xs, med, width, yerr=[np.zeros(len(med)), np.subtract(p90, med)], capsize=2, label=f"batch {b}")
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(unit)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("latency: median, whisker to p90", fontsize=10)
    return save(fig, path)


def plot_errors(rows: list[dict], path: Path) -> Path:
    """eps relative L2 against timestep, one line per runtime (smallest batch)."""
    b = min((r["batch"] for r in rows), default=1)
    curves = [(r["label"], r["timesteps"], r["accuracy"]["eps_rel_l2_per_step"]) for r in rows
              if r["batch"] == b and r["accuracy"] and not r["accuracy"]["reference"]]
    return plot_error_vs_timestep(curves, path, "eps relative L2 vs reference")
