"""`vdit compare --cache`: one row per runtime and step-caching setting, scored against the same runtime
uncached with the same noise and conditioning (what caching costs, apart from the runtime's own error).

Per runtime: one warm-up sample uncached and one per setting (graphs load, engines warm), then
`repeats` rounds in which the uncached sample and every setting's run back to back (on a shared
machine the load moves: each round's ratio sees the same load). Speed-up: the median over rounds of
uncached seconds / cached seconds. Full calls: the steps that ran the tail (the head runs every step).
A threshold sweep of one criterion is the same thing with many settings: cache_sweep.png plots
speed-up against PSNR, one line per runtime and criterion.
"""
from __future__ import annotations

import numpy as np

from vdit_deploy.errors import VditError
from vdit_deploy.metrics import psnr, ssim
from vdit_deploy.step_cache import DEFAULT_MAX_SKIPS, DEFAULT_WARMUP, MODES


def parse_cache(text: str, warmup: int = DEFAULT_WARMUP, max_skips: int = DEFAULT_MAX_SKIPS) -> list[dict]:
    """'fbcache:0.05,fbcache:0.1,teacache:0.2' (or 'fbcache' for the default threshold) -> settings."""
    out = []
    for item in filter(None, (s.strip() for s in str(text).split(","))):
        mode, _, threshold = item.partition(":")
        if mode not in MODES or mode == "off":
            raise VditError(f"--cache takes MODE[:THRESHOLD] items, MODE fbcache or teacache; got {item!r}")
        try:
            value = float(threshold) if threshold else None
        except ValueError:
            raise VditError(f"--cache threshold must be a number, got {item!r}") from None
        if value is not None and not (np.isfinite(value) and value >= 0):
            raise VditError(f"--cache threshold must be a finite number >= 0, got {item!r}")
        out.append({"mode": mode, "threshold": value, "warmup": warmup, "max_skips": max_skips})
    if not out:
        raise VditError("--cache is empty; e.g. fbcache:0.05,teacache:0.1")
    return out


def measure_cache(label: str, open_rt, batch: int, seeds: list[int], sampler: str, steps: int, eta: float,
                  guidance: float, repeats: int, pool, settings: list[dict], fit_dir=None) -> list[dict]:
    """Rows for one runtime: every setting against the runtime uncached."""
    from vdit_deploy.compare.measure import stats, videos_cond
    from vdit_deploy.sampling import SampleTimes, conditioning, sample, sampler_name, sampler_plan
    from vdit_deploy.step_cache import policy_for

    rows = []
    with open_rt() as rt:
        contract = rt.contract
        plan = sampler_plan(contract, sampler, None if sampler == "ddpm" else steps, eta)
        pool = conditioning(contract, cond=pool)
        cond = {seed: videos_cond(pool, seed, batch) for seed in seeds}
        policies = []
        for s in settings:
            try:
                policies.append(policy_for(rt, **s, fit_dir=fit_dir))
            except VditError as e:      # teacache without its fit: that row says so
                policies.append(str(e))

        def run(policy, seed):
            cache = policy.start(len(plan)) if policy is not None else None
            times = SampleTimes()
            video = sample(rt, contract, cond[seed], plan, guidance, seed, times=times, cache=cache)
            return video, times.total, cache

        live = [p for p in policies if not isinstance(p, str)]
        for p in [None, *live]:                                   # warm-up: sessions, engines, graphs
            run(p, seeds[0])
        refs, seconds = {}, {id(p): [] for p in [None, *live]}
        videos, caches = {id(p): {} for p in live}, {id(p): {} for p in live}
        for i in range(max(repeats, len(seeds))):
            seed = seeds[i % len(seeds)]
            ref, total, _ = run(None, seed)
            refs.setdefault(seed, ref)
            seconds[id(None)].append(total)
            for p in live:
                video, total, cache = run(p, seed)
                seconds[id(p)].append(total)
                videos[id(p)].setdefault(seed, video)
                caches[id(p)].setdefault(seed, cache)
        base = np.asarray(seconds[id(None)])
        for s, p in zip(settings, policies):
            row = {"label": label, "batch": batch, "setting": s, "sampler": sampler_name(contract, sampler),
                   "steps": len(plan)}
            if isinstance(p, str):
                rows.append({**row, "status": "skipped", "reason": p})
                continue
            psnrs = [psnr(videos[id(p)][seed], refs[seed]) for seed in seeds]
            h, w = contract.latent[-2:]
            ssims = [ssim(videos[id(p)][seed], refs[seed]) for seed in seeds] if min(h, w) >= 7 else []
            full = [caches[id(p)][seed].full_steps for seed in seeds]
            rows.append({**row, "status": "ok", "policy": p.describe(), "threshold": p.limit,
                         "full_calls": float(np.mean(full)), "fewer_full_calls": len(plan) / float(np.mean(full)),
                         "speedup": float(np.median(base / np.asarray(seconds[id(p)]))),
                         "sample_s": stats(seconds[id(p)]), "uncached_s": stats(base),
                         "psnr_db": min(psnrs) if np.isfinite(min(psnrs)) else None,
                         "ssim": min(ssims) if ssims else None,
                         "skipped_steps": [int(i) for i, d in enumerate(caches[id(p)][seeds[0]].decisions) if d]})
    return rows


def format_cache_table(rows: list[dict]) -> str:
    lines = ["| runtime | batch | setting | full calls | fewer full calls | speed-up | PSNR dB | SSIM |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        setting = f"{r['setting']['mode']}:{r.get('threshold') or r['setting']['threshold'] or 'default'}"
        if r["status"] != "ok":
            lines.append(f"| {r['label']} | {r['batch']} | {setting} | skipped: {r['reason']} | | | | |")
            continue
        p = "identical" if r["psnr_db"] is None else f"{r['psnr_db']:.1f}"
        s = "-" if r["ssim"] is None else f"{r['ssim']:.4f}"
        lines.append(f"| {r['label']} | {r['batch']} | {setting} | {r['full_calls']:.1f}/{r['steps']} | "
                     f"{r['fewer_full_calls']:.2f}x | {r['speedup']:.2f}x | {p} | {s} |")
    return "\n".join(lines)


def plot_sweep(rows: list[dict], path):
    """Speed-up against PSNR, one line per runtime and criterion (a threshold per point)."""
    from vdit_deploy.plots import pyplot, save

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=90)
    ok = [r for r in rows if r["status"] == "ok"]
    for key in dict.fromkeys((r["label"], r["setting"]["mode"]) for r in ok):
        pts = sorted((r["threshold"], r["psnr_db"] if r["psnr_db"] is not None else 100.0, r["speedup"],
                      r["fewer_full_calls"]) for r in ok if (r["label"], r["setting"]["mode"]) == key)
        ax.plot([p[1] for p in pts], [p[2] for p in pts], "o-", label=f"{key[0]} {key[1]} wall clock")
        ax.plot([p[1] for p in pts], [p[3] for p in pts], "x--", alpha=0.6, label=f"{key[0]} {key[1]} full calls")
        for thr, q, s, _ in pts:
            ax.annotate(f"{thr:g}", (q, s), fontsize=6, xytext=(2, 2), textcoords="offset points")
    ax.axvline(30, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("PSNR vs uncached, same noise (dB)")
    ax.set_ylabel("speed-up over uncached")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    ax.set_title("step caching: threshold sweep", fontsize=9)
    return save(fig, path)

