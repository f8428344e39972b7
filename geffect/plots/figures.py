"""Figures from run records (Wang et al. 2025, Figs. 3–5 style, and more).

Each function takes :class:`RunRecords` (one run, or a list to compare) and returns a matplotlib
Figure, or None when the records it needs are absent. G-effects span orders of magnitude and
change sign, so their axes are symmetric-log: linear within ±linthresh, logarithmic beyond.
Sign convention (REFERENCE.md §1): e_u < 0 removes, e_r ≥ 0 retains; the target side is shaded.
"""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from geffect.plots.records import RunRecords

GROUP_COLORS = {"embed": "#8c564b", "shallow": "#1f77b4", "middle": "#2ca02c", "deep": "#ff7f0e",
                "lm": "#9467bd", "total": "black"}
RISK_LABEL = {"unlearn": "unlearning G-effect e_u (forget risk)", "retain": "retaining G-effect e_r (retain risk)"}
TARGET = {"unlearn": ("below", "target e_u < 0: removal"), "retain": ("above", "target e_r ≥ 0: retention")}
TARGET_COLOR = "#2ca02c"


def _finite(values) -> np.ndarray:
    v = np.asarray(values, dtype=float)
    return v[np.isfinite(v)]


def symlog_axis(ax, values) -> None:
    """Symmetric-log y axis whose linear band is the 10th percentile of the nonzero |values|."""
    v = np.abs(_finite(values))
    v = v[v > 0]
    if v.size == 0:
        return
    linthresh = float(np.percentile(v, 10))
    ax.set_yscale("symlog", linthresh=max(linthresh, 1e-12), linscale=0.6)
    ax.annotate(f"symlog: linear within ±{linthresh:.2g}", xy=(0.99, 0.02), xycoords="axes fraction",
                ha="right", va="bottom", fontsize=7, color="0.4")


def shade_target(ax, risk: str, label: bool = True) -> None:
    """Shade the paper's target side of zero and draw the zero line."""
    side, text = TARGET[risk]
    lo, hi = ax.get_ylim()
    if side == "below":
        ax.axhspan(min(lo, -1e-12), 0, color=TARGET_COLOR, alpha=0.08, label=text if label else None, zorder=0)
    else:
        ax.axhspan(0, max(hi, 1e-12), color=TARGET_COLOR, alpha=0.08, label=text if label else None, zorder=0)
    ax.set_ylim(lo, hi)
    ax.axhline(0, color="0.3", lw=0.8, zorder=1)


def _finish(fig, ax, xlabel: str, ylabel: str, title: str):
    """Labels, title, grid and legend of a one-panel figure."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _group_order(df: pd.DataFrame) -> list[str]:
    groups = list(dict.fromkeys(df["group"]))
    return [g for g in groups if g != "total"] + (["total"] if "total" in groups else [])


def _color(group: str, i: int) -> str:
    return GROUP_COLORS.get(group, plt.cm.viridis(i / 12))


def _effect_panels(run: RunRecords, cumulative: bool):
    df = run.batch_effects()
    if df is None or df.empty:
        return None
    fig, axes = plt.subplots(2, 1, figsize=(10.5, 7), sharex=True)
    for ax, risk in zip(axes, ("unlearn", "retain")):
        d = df[df["risk"] == risk]
        plotted = []
        for i, g in enumerate(_group_order(d)):
            s = d[d["group"] == g].groupby("step")["value"].sum(min_count=1).sort_index()
            if g != "total" and (s.fillna(0) == 0).all():
                continue  # a group with no parameters (e.g. 'deep' of a 2-block model)
            if cumulative:
                s = s.cumsum(skipna=False)      # past a NaN step the cumulative value is unknown: a gap
            plotted.append(s.to_numpy())
            ax.plot(s.index, s.to_numpy(), color=_color(g, i), lw=2.4 if g == "total" else 1.4,
                    marker="o" if len(s) == 1 else None, label=g)
        symlog_axis(ax, np.concatenate(plotted) if plotted else [])
        shade_target(ax, risk)
        note_nan(ax, d)
        ax.set_ylabel(("cumulative " if cumulative else "") + RISK_LABEL[risk], fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    axes[-1].set_xlabel("unlearning step")
    kind = "Cumulative G-effect" if cumulative else "G-effect per step"
    fig.suptitle(f"{kind} by layer group: {run.method} (in-batch, {_direction(run)})")
    fig.tight_layout()
    return fig


def note_nan(ax, df: pd.DataFrame, column: str = "value") -> None:
    """Say on the axes which steps had no finite value (drawn as gaps, never as 0)."""
    bad = sorted(df.loc[~np.isfinite(pd.to_numeric(df[column], errors="coerce")), "step"].unique())
    if bad:
        shown = ", ".join(map(str, bad[:8])) + (" …" if len(bad) > 8 else "")
        ax.annotate(f"no finite value (gap) at step {shown}", xy=(0.01, 0.98), xycoords="axes fraction",
                    ha="left", va="top", fontsize=8, color="#b00000")


def _direction(run: RunRecords) -> str:
    d = run.config.get("profile", {}).get("direction", "grad")
    return "direction ∇L" if d == "grad" else "direction: optimizer update"


def geffect_per_step(run: RunRecords):
    """Paper Figs. 3–4: e_u and e_r per step, total and per layer group."""
    return _effect_panels(run, cumulative=False)


def geffect_cumulative(run: RunRecords):
    """Σ_t e(t): which groups carry the removal and the retention damage over the run."""
    return _effect_panels(run, cumulative=True)


def nll_curves(run: RunRecords):
    """Forget and retain NLL over steps (training batches) with the full-set values before/after."""
    s = run.steps
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(s["step"], s["nll_forget"], color="#d62728", marker="o" if len(s) == 1 else None,
            label="forget batch NLL")
    ax.plot(s["step"], s["nll_retain"], color="#1f77b4", marker="o" if len(s) == 1 else None,
            label="retain batch NLL")
    b, a = run.summary.get("before", {}), run.summary.get("after", {})
    last = s["step"].max()
    for key, color, name in (("nll_forget", "#d62728", "forget set"), ("nll_retain", "#1f77b4", "retain set")):
        if key in b and key in a:
            ax.plot([-0.5, last + 0.5], [b[key], a[key]], ls="none", marker="D", color=color, markersize=7,
                    markeredgecolor="black", label=f"{name}, before → after")
    return _finish(fig, ax, "unlearning step", "answer NLL (nats per token)",
                   f"Forget and retain NLL: {run.method} (forget should rise, retain stay low)")


def weights(run: RunRecords):
    """Paper Fig. 5a: the objective's weights over steps (mean, ±1 std, min and max)."""
    s = run.steps
    if "weight_mean" not in s.columns or s["weight_mean"].isna().all():
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5))
    m, sd = s["weight_mean"], s.get("weight_std", pd.Series(0.0, index=s.index)).fillna(0.0)
    ax.plot(s["step"], m, color="#9467bd", lw=2, marker="o" if len(s) == 1 else None, label="mean weight")
    ax.fill_between(s["step"], m - sd, m + sd, color="#9467bd", alpha=0.2, label="±1 std")
    for col, ls in (("weight_min", ":"), ("weight_max", "--")):
        if col in s.columns:
            ax.plot(s["step"], s[col], color="#9467bd", ls=ls, lw=1, label=col.replace("weight_", "") + " weight")
    ax.axhline(1.0, color="0.4", lw=0.8, ls="-.", label="w = 1 (θ = θ_o for NPO-family)")
    per = "token" if run.config.get("objective", {}).get("weighting") == "token" else "instance"
    return _finish(fig, ax, "unlearning step", f"per-{per} weight of the forget objective",
                   f"Objective weights over steps: {run.method}")


def pg_effect_density(run: RunRecords):
    """Paper Fig. 5b: per forget instance, its objective term's unlearning vs retaining G-effect,
    split into weight ranges (darker = larger weights)."""
    p = run.pairs
    if p is None:
        return None
    p = p.replace([np.inf, -np.inf], np.nan).dropna(subset=["unlearn", "retain"])
    if p.empty:
        return None
    import seaborn as sns
    fig, ax = plt.subplots(figsize=(7.5, 6))
    if p["weight"].notna().sum() >= 3 and p["weight"].nunique() > 1:
        bins = pd.qcut(p["weight"], q=min(3, p["weight"].nunique()), duplicates="drop")
        cats = list(bins.cat.categories)
        palette = plt.cm.Purples(np.linspace(0.4, 0.95, len(cats)))
        groups = [(f"weight {c.left:.3g}–{c.right:.3g}", p[bins == c], palette[i]) for i, c in enumerate(cats)]
    else:
        groups = [("all forget instances", p, plt.cm.Purples(0.8))]
    for label, d, color in groups:
        if len(d) >= 4 and d["unlearn"].std() > 0 and d["retain"].std() > 0:
            try:
                sns.kdeplot(x=d["unlearn"], y=d["retain"], ax=ax, color=color, levels=5, linewidths=1.2,
                            warn_singular=False)
            except (ValueError, np.linalg.LinAlgError):
                pass
        ax.scatter(d["unlearn"], d["retain"], s=18, color=color, edgecolor="black", linewidth=0.3, label=label)
    ax.axhline(0, color="0.3", lw=0.8)
    ax.axvline(0, color="0.3", lw=0.8)
    xlo, xhi = ax.get_xlim()
    ylo, yhi = ax.get_ylim()
    ax.fill_between([min(xlo, 0), 0], 0, max(yhi, 0), color=TARGET_COLOR, alpha=0.08,
                    label="target: removes and retains")
    ax.set_xlim(xlo, xhi)
    ax.set_ylim(ylo, yhi)
    steps = sorted(p["step"].unique())
    ax.set_xlabel("unlearning PG-effect ∇R_uᵀ∇L(s_i)   (< 0: removes)")
    ax.set_ylabel("retaining PG-effect ∇R_rᵀ∇L(s_i)   (≥ 0: retains)")
    ax.set_title(f"PG-effects of forget instances by weight: {run.method}\n(steps {', '.join(map(str, steps))} "
                 "jointly; contours: density)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def conflicts(run: RunRecords):
    """Cosine between the forget and retain parts' gradients per layer group and step, and the
    fraction of steps in conflict (cosine < 0)."""
    c = run.conflicts
    if c is None:
        return None
    order = ["global"] + [g for g in dict.fromkeys(c["group"]) if g != "global"]
    cos = c.pivot_table(index="group", columns="step", values="cosine", aggfunc="mean").reindex(order)
    freq = c.groupby("group")["conflict"].mean().reindex(order)
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 1]})
    vmax = float(np.nanmax(np.abs(cos.to_numpy()))) if np.isfinite(cos.to_numpy()).any() else 1.0
    vmax = vmax if vmax > 0 else 1.0
    im = ax.imshow(cos.to_numpy(dtype=float), aspect="auto", cmap="RdBu", vmin=-vmax, vmax=vmax,
                   interpolation="nearest")
    ax.set_yticks(range(len(order)), order)
    steps = list(cos.columns)
    ticks = range(0, len(steps), max(1, len(steps) // 10))
    ax.set_xticks(list(ticks), [str(steps[i]) for i in ticks])
    ax.set_xlabel("unlearning step")
    ax.set_title("cos(g_forget, g_retain)   red < 0: conflict")
    fig.colorbar(im, ax=ax, label="cosine")
    bx.barh(range(len(order)), freq.to_numpy(dtype=float), color="#d62728")
    bx.set_yticks(range(len(order)), order)
    bx.invert_yaxis()
    bx.set_xlim(0, 1)
    bx.set_xlabel("fraction of steps in conflict")
    bx.set_title("conflict frequency")
    bx.grid(alpha=0.3, axis="x")
    fig.suptitle(f"Conflict between the forget and retain parts: {run.method}")
    fig.tight_layout()
    return fig


def token_geffect_view(run: RunRecords, n_samples: int = 4):
    """Answers shaded by each token's G-effect e_{i,t} (red < 0: the objective raises that token's NLL)."""
    t = run.tokens
    if t is None or "geffect" not in t.columns or t["geffect"].isna().all():
        return None
    return token_view(run, n_samples, value="geffect")


def token_view(run: RunRecords, n_samples: int = 4, width_chars: int = 90, value: str = "auto"):
    """Answers of a few forget samples, each token shaded by its weight (token-weighted objectives)
    or its NLL (or, with value='geffect', its G-effect), at the last step that measured it."""
    t = run.tokens
    if t is None:
        return None
    if value == "auto":
        value = "weight" if t["weight"].notna().any() else "nll"
    t = t[t[value].notna()]
    if t.empty:
        return None
    use_weight = value == "weight"
    last = t[t["step"] == t["step"].max()]
    picks = list(dict.fromkeys(last["index"]))[:n_samples]
    vals = _finite(t[value])
    if value == "geffect":
        m = float(np.percentile(np.abs(vals), 95)) if vals.size else 1.0
        vmin, vmax, cmap = -m, m, plt.cm.RdBu
    elif use_weight:
        vmin, vmax, cmap = 0.0, max(1.0, float(vals.max()) if vals.size else 1.0), plt.cm.viridis
    else:
        vmin, vmax, cmap = 0.0, float(np.percentile(vals, 95)) if vals.size else 1.0, plt.cm.magma_r
    lines = []   # per sample: list of rows of (token, value)
    for idx in picks:
        d = last[last["index"] == idx].sort_values("position")
        row, rows, n = [], [], 0
        for tok, v in zip(d["token"].astype(str), d[value]):
            tok = tok.replace("\n", "⏎")
            if n + len(tok) > width_chars and row:
                rows.append(row)
                row, n = [], 0
            row.append((tok, v))
            n += len(tok)
        rows.append(row)
        lines.append((idx, rows))
    n_rows = sum(len(r) + 1 for _, r in lines)
    fig = plt.figure(figsize=(11, 0.9 + 0.32 * n_rows))
    ax = fig.add_axes([0.02, 0.02, 0.86, 0.86])
    ax.axis("off")
    char_w = 1.0 / width_chars
    y = 1.0
    dy = 1.0 / max(n_rows, 1)
    norm = matplotlib.colors.Normalize(vmin=vmin, vmax=vmax if vmax > vmin else vmin + 1)
    for idx, rows in lines:
        ax.text(0, y, f"forget sample {idx}:", fontsize=9, weight="bold", va="top", transform=ax.transAxes)
        y -= dy
        for row in rows:
            x = 0.0
            for tok, v in row:
                color = cmap(norm(v)) if np.isfinite(v) else (0.9, 0.9, 0.9, 1)
                lum = 0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2]
                ax.text(x, y, tok, family="monospace", fontsize=9, va="top", transform=ax.transAxes,
                        color="white" if lum < 0.5 else "black",
                        bbox={"boxstyle": "square,pad=0.1", "facecolor": color, "edgecolor": "none"})
                x += char_w * len(tok)
            y -= dy
    cax = fig.add_axes([0.9, 0.1, 0.02, 0.75])
    label = {"weight": "token weight w_t", "nll": "token NLL (nats)",
             "geffect": "per-token G-effect e_t (< 0: NLL rises)"}[value]
    fig.colorbar(matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap), cax=cax, label=label)
    what = {"weight": "token weight", "nll": "token NLL", "geffect": "per-token unlearning G-effect"}[value]
    fig.suptitle(f"Forget answers shaded by {what} at step {int(last['step'].max())}: {run.method}", fontsize=11)
    return fig


# ---- comparisons across runs -------------------------------------------------------------------

def _labels(runs: list[RunRecords]) -> list[str]:
    names = [r.method for r in runs]
    return [n if names.count(n) == 1 else f"{n} ({r.path.name})" for n, r in zip(names, runs)]


def _palette(n: int):
    import seaborn as sns
    return sns.color_palette("tab10" if n <= 10 else "husl", n)


def compare_geffect(runs: list[RunRecords], cumulative: bool = False):
    """Total e_u and e_r per step (or cumulative), one colour per method."""
    runs = [r for r in runs if r.batch_effects() is not None]
    if not runs:
        return None
    fig, axes = plt.subplots(2, 1, figsize=(11, 7), sharex=True)
    colors = _palette(len(runs))
    for ax, risk in zip(axes, ("unlearn", "retain")):
        allv = []
        for run, label, color in zip(runs, _labels(runs), colors):
            d = run.batch_effects()
            s = d[(d["risk"] == risk) & (d["group"] == "total")].set_index("step")["value"].sort_index()
            if cumulative:
                s = s.cumsum(skipna=False)
            allv.append(s.to_numpy())
            ax.plot(s.index, s.to_numpy(), color=color, lw=1.6, marker="o" if len(s) == 1 else None, label=label)
        symlog_axis(ax, np.concatenate(allv))
        shade_target(ax, risk)
        ax.set_ylabel(("cumulative " if cumulative else "") + RISK_LABEL[risk], fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    axes[-1].set_xlabel("unlearning step")
    fig.suptitle(("Cumulative G-effect" if cumulative else "G-effect per step") + " by method (total over layers)")
    fig.tight_layout()
    return fig


def compare_groups(runs: list[RunRecords]):
    """Cumulative e_u and e_r per layer group, grouped bars, one colour per method."""
    runs = [r for r in runs if r.batch_effects() is not None]
    if not runs:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    colors = _palette(len(runs))
    width = 0.8 / len(runs)
    for ax, risk in zip(axes, ("unlearn", "retain")):
        allv = []
        groups = None
        for k, (run, label, color) in enumerate(zip(runs, _labels(runs), colors)):
            d = run.batch_effects()
            cum = d[d["risk"] == risk].groupby("group", sort=False)["value"].sum(min_count=1)
            cum[d[d["risk"] == risk].groupby("group", sort=False)["value"].apply(lambda v: v.isna().any())] = np.nan
            groups = groups or _group_order(d[d["risk"] == risk])
            v = cum.reindex(groups).to_numpy(dtype=float)
            allv.append(v)
            ax.bar(np.arange(len(groups)) + (k - (len(runs) - 1) / 2) * width, v, width, color=color, label=label)
        symlog_axis(ax, np.concatenate(allv))
        shade_target(ax, risk, label=True)
        ax.set_xticks(range(len(groups)), groups)
        ax.set_xlabel("layer group")
        ax.set_ylabel("cumulative " + RISK_LABEL[risk], fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    axes[0].legend(fontsize=7, ncol=2)
    fig.suptitle("Where the G-effect lands: cumulative over the run, per layer group and method")
    fig.tight_layout()
    return fig


def compare_nll(runs: list[RunRecords]):
    """Forget and retain batch NLL over steps, one colour per method."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharex=True)
    colors = _palette(len(runs))
    for ax, key, title in zip(axes, ("nll_forget", "nll_retain"), ("forget NLL (should rise)",
                                                                   "retain NLL (should stay low)")):
        for run, label, color in zip(runs, _labels(runs), colors):
            ax.plot(run.steps["step"], run.steps[key], color=color, lw=1.5,
                    marker="o" if len(run.steps) == 1 else None, label=label)
        ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel("unlearning step")
        ax.set_ylabel("batch answer NLL (nats per token, log scale)")
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=7, ncol=2)
    fig.suptitle("Forget and retain NLL by method")
    fig.tight_layout()
    return fig


def compare_conflicts(runs: list[RunRecords]):
    """Global cosine between the parts' gradients per step, for methods with a retain part."""
    runs = [r for r in runs if r.conflicts is not None]
    if not runs:
        return None
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for run, label, color in zip(runs, _labels(runs), _palette(len(runs))):
        g = run.conflicts[run.conflicts["group"] == "global"].sort_values("step")
        frac = g["conflict"].astype(float).mean()
        ax.plot(g["step"], g["cosine"], color=color, lw=1.5, marker="o" if len(g) == 1 else None,
                label=f"{label} ({100 * frac:.0f}% of steps in conflict)")
    ax.axhspan(ax.get_ylim()[0], 0, color="#d62728", alpha=0.06, label="conflict (cosine < 0)")
    ax.axhline(0, color="0.3", lw=0.8)
    return _finish(fig, ax, "unlearning step", "cos(g_forget, g_retain), all parameters",
                   "Conflict between the forget and retain parts by method")


def _symlog_coords(v: np.ndarray) -> np.ndarray:
    a = np.abs(v[np.isfinite(v) & (v != 0)])
    lt = float(np.percentile(a, 10)) if a.size else 1.0
    t = np.sign(v) * np.log10(1 + np.abs(v) / lt)
    span = np.nanmax(t) - np.nanmin(t) if np.isfinite(t).any() else 1.0
    return t / (span if span > 0 else 1.0)


def _label_clusters(ax, chosen: list[dict], x: np.ndarray, y: np.ndarray, records: list[dict]) -> None:
    """Label the chosen points; points that nearly coincide on the (symlog) plot share one label."""
    tx, ty = _symlog_coords(x), _symlog_coords(y)
    pos = {id(r): i for i, r in enumerate(records)}
    done: list[tuple[float, float, list[str], float, float]] = []
    for r in sorted(chosen, key=lambda r: r.get("rank", 99)):
        i = pos[id(r)]
        if not (np.isfinite(tx[i]) and np.isfinite(ty[i])):
            continue
        name = f"{r.get('rank', '')}. {r['method']}"
        for cx, cy, names, _, _ in done:
            if abs(cx - tx[i]) < 0.03 and abs(cy - ty[i]) < 0.03:
                names.append(name)
                break
        else:
            done.append((tx[i], ty[i], [name], x[i], y[i]))
    for _, _, names, xi, yi in done:
        text = ", ".join(names[:3]) + (f" (+{len(names) - 3} more)" if len(names) > 3 else "")
        ax.annotate(text, (xi, yi), fontsize=7, xytext=(4, 3), textcoords="offset points", zorder=4)


def diagnosis_plane(records: list[dict], basis: str = ""):
    """Candidates on the (e_u, e_r) plane (cumulative, along each one's update), target region
    e_u < 0, e_r ≥ 0 shaded, the Pareto front drawn."""
    fig, ax = plt.subplots(figsize=(12, 7))
    x = np.array([r["e_u"] for r in records], dtype=float)
    y = np.array([r["e_r"] for r in records], dtype=float)
    fronts = np.array([r.get("front", 1) for r in records])
    fmax = max(int(fronts.max()), 2) if len(fronts) else 2
    for r, xi, yi, f in zip(records, x, y, fronts):
        if not (np.isfinite(xi) and np.isfinite(yi)):
            continue
        on_front = bool(r.get("pareto"))
        color = "#d62728" if on_front else plt.cm.Greys(0.75 - 0.55 * (f - 2) / max(fmax - 2, 1))
        ax.scatter(xi, yi, s=55 if on_front else 28, color=color, edgecolor="black",
                   linewidth=0.8 if on_front else 0.3, zorder=3)
    _label_clusters(ax, [r for r in records if r.get("pareto") or r.get("rank", 99) <= 10], x, y, records)
    front = sorted([(xi, yi) for r, xi, yi in zip(records, x, y) if r.get("pareto") and np.isfinite(xi)
                    and np.isfinite(yi)])
    if front:
        fx, fy = zip(*front)
        ax.plot(fx, fy, color="#d62728", lw=1.5, ls="--", zorder=2, label="Pareto front (removal vs retention)")
    ok = np.isfinite(x) & np.isfinite(y)
    for setter, vals in ((ax.set_xscale, x[ok]), (ax.set_yscale, y[ok])):
        v = np.abs(vals[vals != 0])
        if v.size:
            setter("symlog", linthresh=float(np.percentile(v, 10)), linscale=0.6)
    xlo, xhi = ax.get_xlim()
    ylo, yhi = ax.get_ylim()
    ax.fill_between([min(xlo, 0), 0], 0, max(yhi, 0), color=TARGET_COLOR, alpha=0.1,
                    label="target: e_u < 0 (removes), e_r ≥ 0 (retains)", zorder=0)
    ax.set_xlim(xlo, xhi)
    ax.set_ylim(ylo, yhi)
    ax.axhline(0, color="0.3", lw=0.8)
    ax.axvline(0, color="0.3", lw=0.8)
    ax.scatter([], [], color="#d62728", edgecolor="black", label="Pareto front (front 1)")
    ax.scatter([], [], color=plt.cm.Greys(0.6), edgecolor="black", s=28, label="later fronts (lighter = later)")
    ax.set_xlabel("cumulative unlearning G-effect e_u along the update (symlog; < 0 removes)")
    ax.set_ylabel("cumulative retaining G-effect e_r along the update\non the fixed retain sample (symlog; ≥ 0 retains)")
    ax.set_title("Diagnosis: candidates on the (e_u, e_r) plane; numbers are ranks")
    if basis:
        fig.text(0.01, 0.005, "Basis: " + basis, fontsize=7, wrap=True, color="0.3")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return fig


def eval_tradeoff(run: RunRecords):
    """Forget quality (or forget probability) against model utility over the run, as TOFU plots it,
    and the components over steps (eval.csv)."""
    if run.eval is None:
        return None
    wide = run.eval.pivot_table(index="step", columns="metric", values="value", sort=True)
    if "model_utility" not in wide.columns:
        return None
    has_fq = "forget_quality" in wide.columns and wide["forget_quality"].notna().any()
    ykey = "forget_quality" if has_fq else "probability_forget"
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.8))
    x, y, steps = wide["model_utility"].to_numpy(), wide[ykey].to_numpy(), wide.index.to_numpy()
    ax.plot(x, y, color="0.5", lw=1, zorder=1)
    pts = ax.scatter(x, y, c=steps, cmap="viridis", s=45, edgecolor="black", zorder=2)
    for xi, yi, k in zip(x, y, steps):
        ax.annotate(f"{k}", (xi, yi), textcoords="offset points", xytext=(5, 4), fontsize=7)
    fig.colorbar(pts, ax=ax, label="step (updates made)")
    if has_fq:
        ax.set_yscale("log")
        ax.set_ylabel("forget quality (KS-test p-value vs reference; higher is better)")
        ax.set_title(f"Forget quality vs model utility: {run.method}")
    else:
        ax.set_ylabel("forget probability p(answer)^(1/|answer|) (lower is better)")
        ax.set_title(f"Forget probability vs model utility: {run.method}")
    ax.set_xlabel("model utility (higher is better)\nharmonic mean of retain probability, ROUGE-L, truth ratio")
    ax.grid(alpha=0.3)
    series = [("probability_forget", "forget probability", "#d62728", "-"),
              ("rouge_forget", "forget ROUGE-L recall", "#d62728", "--"),
              ("probability_retain", "retain probability", "#1f77b4", "-"),
              ("rouge_retain", "retain ROUGE-L recall", "#1f77b4", "--"),
              ("model_utility", "model utility", "black", "-")]
    for key, label, color, ls in series:
        if key in wide.columns:
            bx.plot(steps, wide[key], color=color, ls=ls, marker="o", markersize=4, label=label)
    items = run.eval["items"].iloc[0] if "items" in run.eval.columns else "?"
    bx.set_ylim(-0.02, 1.02)
    _finish(fig, bx, "unlearning step (updates made)", "value (0 to 1)",
            f"TOFU metrics over the run ({items} forget+retain items)")
    return fig


RUN_FIGURES = {"geffect_per_step": geffect_per_step, "geffect_cumulative": geffect_cumulative,
               "nll": nll_curves, "weights": weights, "pg_effect_density": pg_effect_density,
               "conflicts": conflicts, "tokens": token_view, "tokens_geffect": token_geffect_view,
               "eval": eval_tradeoff}
COMPARE_FIGURES = {"compare_geffect": compare_geffect,
                   "compare_cumulative": lambda runs: compare_geffect(runs, cumulative=True),
                   "compare_groups": compare_groups, "compare_nll": compare_nll,
                   "compare_conflicts": compare_conflicts}



def spunge_attributes(table: pd.DataFrame, result: dict):
    """Spunge's per-attribute outcome (spunge.csv): forget NLL (higher: more forgotten) and retain NLL
    (lower: more kept) per attribute value, grouped bars for the base, the plain run and Spunge."""
    shown = [m for m in ("base", "plain", "spunge") if m in set(table["model"])]
    names = {"base": "base model", "plain": f"{result['method']} on the whole forget set",
             "spunge": f"Spunge ({result['merge']['method']}, density {result['merge']['density']:g})"}
    colors = {"base": "0.6", "plain": "#1f77b4", "spunge": "#d62728"}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, split, better in zip(axes, ("forget", "retain"), ("higher: forgotten", "lower: kept")):
        d = table[table["split"] == split]
        values = list(dict.fromkeys(d["value"]))
        width = 0.8 / len(shown)
        for k, m in enumerate(shown):
            v = d[d["model"] == m].set_index("value")["nll"].reindex(values).to_numpy(dtype=float)
            ax.bar(np.arange(len(values)) + (k - (len(shown) - 1) / 2) * width, v, width, color=colors[m],
                   label=names[m])
        sizes = d.drop_duplicates("value").set_index("value")["records"].reindex(values)
        ax.set_xticks(range(len(values)), [f"{v}\n({n} records)" for v, n in zip(values, sizes)], fontsize=8)
        ax.set_xlabel(f"{result['split_by']} ({split} set)")
        ax.set_ylabel(f"mean answer NLL, nats/token ({better})")
        ax.set_title(f"{split.capitalize()} set", fontsize=10)
        ax.grid(alpha=0.3, axis="y")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Spunge vs plain {result['method']}: NLL per {result['split_by']} "
                 f"({len(result['splits'])} splits, each unlearned from the same base, then merged)")
    fig.tight_layout()
    return fig
