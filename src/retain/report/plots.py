"""The report's figures: one function per figure, each writes ``DIR/report_files/<name>.png`` and returns its path
(``None`` when the demo holds no data for it). matplotlib with the Agg backend; nothing is shown on screen.

Accuracies are drawn in points (×100, ``agg["scale"]``); prior drop is positive when prior skills got worse.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("MPLBACKEND", "Agg")
import matplotlib  # noqa: E402

matplotlib.use("Agg", force=True)
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from retain.metrics import fit_quadratic  # noqa: E402
from retain.report.aggregate import group, read_steps  # noqa: E402
from retain.report.findings import fmt_lr, predictor_table  # noqa: E402

DPI = 100
FILES = "report_files"


def _colors(methods: list[str]) -> dict[str, Any]:
    cmap = plt.get_cmap("tab10")
    return {m: cmap(i % 10) for i, m in enumerate(methods)}


def _save(fig: Any, out_dir: Path, name: str) -> Path:
    """Render to PNG in memory, then write atomically (temp file + rename)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight", facecolor="white")
    plt.close(fig)
    path = out_dir / f"{name}.png"
    _atomic_write_bytes(path, buf.getvalue())
    return path


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    """Binary twin of :func:`retain.files.atomic_write_text` (temp file beside the target, fsync, rename)."""
    import tempfile

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _grid(n: int, ncols: int, w: float, h: float, **kw: Any) -> tuple[Any, list[Any]]:
    ncols = max(1, min(ncols, n))
    nrows = max(1, -(-n // ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(w * ncols, h * nrows), squeeze=False, **kw)
    flat = list(axes.ravel())
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


# ----------------------------------------------------------------------------------------------------------------
# 1. accuracy matrices


def _column_kind(col: str, tasks: list[str]) -> int:
    """Display order of evaluation columns: 0 stage task (held-out), 1 ``@train``, 2 other splits (OOD), 3 prior."""
    name, _, split = col.partition("@")
    if name in tasks:
        return 0 if not split else 1 if split == "train" else 2
    return 3


def plot_matrices(agg: dict[str, Any], out_dir: Path) -> Path | None:
    """Heatmap of the mean accuracy matrix (all evaluation columns) per method at its operating point; columns grouped
    as stage tasks (held-out) | training prompts | OOD splits | prior skills."""
    items = [(m, group(agg, m)) for m in agg["methods"]]
    items = [(m, g) for m, g in items if g and g["matrix"]]
    if not items:
        return None
    scale = agg["scale"]
    ncols_eval = max(len(g["matrix"]["eval_tasks"]) for _, g in items)
    nrows_eval = max(len(g["matrix"]["mean"]) for _, g in items)
    fig, axes = _grid(len(items), 2, 0.5 * ncols_eval + 1.3, 0.36 * nrows_eval + 1.35)
    for ax, (m, g) in zip(axes, items):
        tasks = g["matrix"]["tasks"]
        cols = g["matrix"]["eval_tasks"]
        order = sorted(range(len(cols)), key=lambda j: (_column_kind(cols[j], tasks), j))
        mat = (np.asarray(g["matrix"]["mean"]) * scale)[:, order]
        cols = [cols[j] for j in order]
        kinds = [_column_kind(c, tasks) for c in cols]
        rows = ["base"] + [f"{k + 1}: {t}" for k, t in enumerate(tasks)]
        ax.imshow(mat, cmap="viridis", vmin=0, vmax=scale, aspect="auto")
        ax.set_xticks(range(len(cols)), cols, fontsize=8, rotation=35, ha="right", rotation_mode="anchor")
        ax.set_yticks(range(len(rows)), rows, fontsize=8.5)
        for i in range(mat.shape[0]):
            for j in range(mat.shape[1]):
                v = mat[i, j]
                ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=8.5,
                        color="black" if v > 0.6 * scale else "white")
        for j in range(1, len(cols)):
            if kinds[j] != kinds[j - 1]:
                ax.axvline(j - 0.5, color="white", lw=2.5)
        ax.set_title(f"{m} (lr {fmt_lr(g['lr'])}, {g['matrix']['n']} seeds)", fontsize=10)
        ax.tick_params(length=0)
    fig.suptitle("Accuracy (%) after each stage, mean over seeds at the operating point — columns: stage tasks "
                 "(held-out) | training prompts | OOD | prior skills", fontsize=10)
    fig.tight_layout()
    return _save(fig, out_dir, "matrices")


# ----------------------------------------------------------------------------------------------------------------
# 2. forgetting bars


def plot_forgetting_bars(agg: dict[str, Any], out_dir: Path) -> Path | None:
    """Prior drop and −FM per method (operating point), mean with 95% interval bars and the seeds as dots."""
    gs = [(m, group(agg, m)) for m in agg["methods"]]
    gs = [(m, g) for m, g in gs if g]
    if not gs:
        return None
    scale = agg["scale"]
    colors = _colors(agg["methods"])
    fig, axes = plt.subplots(1, 2, figsize=(max(8.0, 1.3 * len(gs) + 4), 3.8))
    panels = [("prior_drop", 1.0, "prior-skill drop (pts, higher = more forgetting)"),
              ("forgetting_measure", -1.0, "−FM (pts, higher = more forgetting)")]
    for ax, (metric, sign, label) in zip(axes, panels):
        for i, (m, g) in enumerate(gs):
            st = g["stats"].get(metric)
            if not st:
                continue
            mean = sign * st["mean"] * scale
            ax.bar(i, mean, color=colors[m], alpha=0.75, width=0.65)
            if st["low"] is not None:
                lo, hi = sorted((sign * st["low"] * scale, sign * st["high"] * scale))
                ax.errorbar(i, mean, yerr=[[mean - lo], [hi - mean]], color="black", capsize=4, lw=1.2)
            vals = np.asarray(st["values"]) * sign * scale
            ax.scatter(np.full(vals.size, i) + np.linspace(-0.12, 0.12, vals.size), vals, s=12, color="black",
                       zorder=3)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xticks(range(len(gs)), [f"{m}\nlr {fmt_lr(g['lr'])}" for m, g in gs], fontsize=8)
        ax.set_title(label, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("Forgetting at each method's operating point: bars = mean, whiskers = 95% t-interval, dots = seeds",
                 fontsize=10)
    fig.tight_layout()
    return _save(fig, out_dir, "forgetting_bars")


# ----------------------------------------------------------------------------------------------------------------
# 3. forgetting vs KL


def plot_kl_scatter(agg: dict[str, Any], out_dir: Path, which: str = "forward") -> Path | None:
    """Prior drop vs the last stage's KL from the base (``which``: ``"forward"``, ``"reverse"``), one dot per run,
    coloured by method, with the quadratic fit over all runs and its R² / Spearman in the title."""
    table = predictor_table(agg)
    key = table["forward_key"] if which == "forward" else table["reverse_key"]
    pts = [(r["method"], r["values"].get(key), r["values"].get("prior_drop")) for r in agg["runs"]]
    pts = [(m, x, y) for m, x, y in pts if x is not None and y is not None]
    if not pts:
        return None
    scale = agg["scale"]
    colors = _colors(agg["methods"])
    fig, ax = plt.subplots(figsize=(7.2, 4.6))
    for m in agg["methods"]:
        xs = [x for mm, x, _ in pts if mm == m]
        ys = [y * scale for mm, _, y in pts if mm == m]
        if xs:
            ax.scatter(xs, ys, color=colors[m], label=m, s=30, alpha=0.85, edgecolor="black", lw=0.4)
    xs = np.array([x for _, x, _ in pts])
    ys = np.array([y for _, _, y in pts])
    fit = fit_quadratic(xs, ys)
    if fit["coef"] is not None and np.ptp(xs) > 0:
        a, b, c = fit["coef"]
        grid = np.linspace(xs.min(), xs.max(), 200)
        ax.plot(grid, (a + b * grid + c * grid**2) * scale, color="black", lw=1.3, ls="--", label="quadratic fit")
    r2 = "undefined" if fit["r2"] is None else f"{fit['r2']:.2f}"
    rho = "–" if fit["spearman"] is None else f"{fit['spearman']:+.2f}"
    name = "KL(π0 ‖ π)" if which == "forward" else "KL(π ‖ π0)"
    ax.set_xlabel(f"{which} {name} on the last stage's prompts (nats / sequence, {key})")
    ax.set_ylabel("prior-skill drop (pts)")
    ax.set_title(f"Forgetting vs {which} KL: quadratic R² = {r2}, Spearman ρ = {rho}, n = {fit['n']}", fontsize=10)
    ax.axhline(0, color="grey", lw=0.8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return _save(fig, out_dir, f"kl_{which}")


# ----------------------------------------------------------------------------------------------------------------
# 4. tokens: entropy × p(target)


def plot_tokens(agg: dict[str, Any], out_dir: Path) -> Path | None:
    """Per task: each SFT target token's predictive entropy vs the probability the base model gives it, with the
    confident-conflict region (entropy < entropy_max and p < prob_max) shaded and the thresholds labelled."""
    tokens = {t: v for t, v in (agg.get("tokens") or {}).items() if v.get("rows")}
    if not tokens:
        return None
    hmax, pmax = agg["thresholds"]["entropy_max"], agg["thresholds"]["prob_max"]
    fig, axes = _grid(len(tokens), 3, 4.4, 3.9)
    for ax, (task, data) in zip(axes, tokens.items()):
        rows = data["rows"]
        h = np.array([r["entropy"] for r in rows], dtype=float)
        p = np.array([r["prob"] for r in rows], dtype=float)
        conflict = (h < hmax) & (p < pmax)
        ymax = max(1.0, float(h.max()) * 1.05 if h.size else 1.0)
        ax.add_patch(Rectangle((0, 0), pmax, hmax, color="tab:red", alpha=0.18, lw=0, zorder=0,
                               label="confident conflict"))
        ax.scatter(p[~conflict], h[~conflict], s=5, alpha=0.35, color="tab:blue", lw=0, label="other tokens")
        ax.scatter(p[conflict], h[conflict], s=7, alpha=0.8, color="tab:red", lw=0)
        ax.axvline(pmax, color="tab:red", lw=0.9, ls="--")
        ax.axhline(hmax, color="tab:red", lw=0.9, ls="--")
        ax.text(pmax, ymax * 0.97, f" p = {pmax:g}", color="tab:red", fontsize=8, va="top")
        ax.text(1.0, hmax, f"H = {hmax:g} nats ", color="tab:red", fontsize=8, ha="right", va="bottom")
        s = data.get("summary") or {}
        share = s.get("conflict_share", float(conflict.mean()) if conflict.size else 0.0)
        ax.set_title(f"{task}: {share * 100:.1f}% conflicts ({s.get('tokens', h.size)} tokens)", fontsize=9.5)
        ax.set_xlim(0, 1.0)
        ax.set_ylim(0, ymax)
        ax.set_xlabel("p(target token) under the base model")
        ax.set_ylabel("predictive entropy (nats)")
        ax.grid(alpha=0.25)
        ax.legend(fontsize=7, loc="upper right", bbox_to_anchor=(1.0, 0.9))
    fig.suptitle(f"SFT target tokens: shaded = confident conflicts (entropy < {hmax:g} nats and p < {pmax:g})",
                 fontsize=10.5)
    fig.tight_layout()
    return _save(fig, out_dir, "tokens")


# ----------------------------------------------------------------------------------------------------------------
# 5. Pareto frontiers


def plot_pareto(agg: dict[str, Any], out_dir: Path) -> Path | None:
    """Per method: new-task accuracy vs prior drop for each lr of the sweep (mean over seeds, 95% interval bars);
    filled circles = held-out test prompts, hollow squares = the training prompts; the line joins the frontier;
    grey dots = the other methods' held-out points, for reference. Axes are the same in every panel."""
    methods = [m for m in agg["methods"] if any(g["method"] == m for g in agg["groups"])]
    if not methods:
        return None
    scale = agg["scale"]
    colors = _colors(agg["methods"])

    def mean(g: dict[str, Any], k: str) -> float | None:
        st = g["stats"].get(k)
        return None if not st else st["mean"] * scale

    def ends(g: dict[str, Any], k: str) -> list[float]:
        st = g["stats"].get(k)
        if not st:
            return []
        return [v * scale for v in (st["mean"], st["low"], st["high"]) if v is not None]

    xs = [v for g in agg["groups"] for v in ends(g, "prior_drop")] + [0.0]
    ys = [v for g in agg["groups"] for k in ("heldout_mean", "train_mean") for v in ends(g, k)]
    if not ys:
        return None
    padx, pady = 0.06 * (max(xs) - min(xs) or 1.0), 0.08 * (max(ys) - min(ys) or 1.0)
    xlim, ylim = (min(xs) - padx, max(xs) + padx), (min(ys) - pady, max(ys) + pady)
    fig, axes = _grid(len(methods), 4, 3.4, 3.0)
    for ax, m in zip(axes, methods):
        gs = sorted((g for g in agg["groups"] if g["method"] == m), key=lambda g: (g["lr"] is None, g["lr"] or 0))
        others = [(mean(g, "prior_drop"), mean(g, "heldout_mean")) for g in agg["groups"] if g["method"] != m]
        others = [(x, y) for x, y in others if x is not None and y is not None]
        if others:
            ax.scatter(*zip(*others), s=14, color="#c4c9d2", zorder=1, lw=0)
        for i, g in enumerate(gs):
            d, held, train = (g["stats"].get(k) for k in ("prior_drop", "heldout_mean", "train_mean"))
            if not d:
                continue
            x = d["mean"] * scale
            xerr = None if d["low"] is None else [[x - d["low"] * scale], [d["high"] * scale - x]]
            for st, marker, face in ((held, "o", colors[m]), (train, "s", "none")):
                if not st:
                    continue
                y = st["mean"] * scale
                yerr = None if st["low"] is None else [[y - st["low"] * scale], [st["high"] * scale - y]]
                ax.errorbar(x, y, xerr=xerr, yerr=yerr, fmt=marker, mfc=face, mec=colors[m], ecolor=colors[m],
                            ms=7, elinewidth=0.8, capsize=2, zorder=3)
            if held:
                star = "*" if g["lr"] == agg["operating_points"].get(m) else ""
                ax.annotate(f"{fmt_lr(g['lr'])}{star}", (x, held["mean"] * scale), textcoords="offset points",
                            xytext=(7, -11 if i % 2 == 0 else 5), fontsize=7.5, zorder=4)
        front = agg["pareto"].get(m, [])
        fx = [(mean(g, "prior_drop"), mean(g, "heldout_mean")) for lr in front for g in gs if g["lr"] == lr]
        if len(fx) > 1:
            ax.plot(*zip(*fx), color=colors[m], lw=1.3, alpha=0.8, zorder=2)
        ax.set_xlim(*xlim)
        ax.set_ylim(*ylim)
        ax.set_title(m, fontsize=10, color=colors[m])
        ax.axvline(0, color="grey", lw=0.7)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
        ax.set_xlabel("prior drop (pts)", fontsize=8)
        ax.set_ylabel("new-task accuracy (%)", fontsize=8)
    handles = [plt.Line2D([], [], marker="o", ls="", color="black", label="held-out test prompts"),
               plt.Line2D([], [], marker="s", ls="", mfc="none", color="black", label="training prompts"),
               plt.Line2D([], [], color="black", label="Pareto frontier (held-out)"),
               plt.Line2D([], [], marker="o", ls="", color="#c4c9d2", label="other methods (held-out)")]
    height = fig.get_figheight()
    fig.suptitle("Learning-rate sweep: new-task accuracy (mean over stage tasks) vs prior drop; "
                 "labels = lr, * = operating point", fontsize=10, y=1 - 0.08 / height, va="top")
    fig.legend(handles=handles, loc="upper center", ncol=4, fontsize=8, bbox_to_anchor=(0.5, 1 - 0.34 / height))
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / height))
    return _save(fig, out_dir, "pareto")


# ----------------------------------------------------------------------------------------------------------------
# 0. the frontier: gain against forgetting along every checkpoint


def plot_frontier(agg: dict[str, Any], out_dir: Path, stage: int = 1) -> Path | None:
    """Per readout (greedy prior drop, prior NLL increase): every (method, lr, seed) trajectory of ``stage`` as a
    faint line through its checkpoints (selection-half gain, readout), and per method the frontier — at each gain
    level, the median over seeds of the least readout reaching that gain (:func:`retain.metrics.frontier.frontier`)."""
    from retain.metrics.frontier import frontier
    from retain.report.matched import READOUTS, points_for

    readouts = [r for r in ("prior_drop", "prior_nll") if points_for(agg, stage, r)]
    if not readouts:
        return None
    colors = _colors(agg["methods"])
    fig, axes = _grid(len(readouts), len(readouts), 5.2, 3.8)
    for ax, readout in zip(axes, readouts):
        name, scale, unit = READOUTS[readout]
        points = points_for(agg, stage, readout)
        for m in agg["methods"]:
            mine = [p for p in points if p.method == m]
            if not mine:
                continue
            for key in sorted({(p.lr, p.seed) for p in mine}):
                line = sorted((p for p in mine if (p.lr, p.seed) == key), key=lambda p: p.step)
                ax.plot([p.gain * 100 for p in line], [p.readouts[readout] * scale for p in line], color=colors[m],
                        alpha=0.18, lw=0.8)
            seeds = sorted({p.seed for p in mine})
            top = min(max(p.gain for p in mine if p.seed == s) for s in seeds)
            levels = np.linspace(0, max(top, 0.0), 12)
            ys = []
            for g in levels:
                best = [frontier([p for p in mine if p.seed == s], g, readout) for s in seeds]
                ys.append(float(np.median([b.readouts[readout] * scale for b in best if b is not None])))
            ax.plot(levels * 100, ys, color=colors[m], lw=2.4, label=m, marker="o", ms=3)
        ax.set_xlabel(f"new-task gain, selection half (pts) — stage {stage}", fontsize=8)
        ax.set_ylabel(f"{name} ({unit}, symlog)", fontsize=8)
        # high-lr runs forget 100× more than the frontier: a linear axis would flatten every frontier onto 0
        ax.set_yscale("symlog", linthresh=0.5 if unit == "pts" else 1.0)
        ax.axhline(0, color="grey", lw=0.7)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
        ax.legend(fontsize=8)
    fig.suptitle("Forgetting against new-task gain along every checkpoint and lr (thick: frontier, median over seeds)",
                 fontsize=10)
    fig.tight_layout()
    return _save(fig, out_dir, "frontier")


# ----------------------------------------------------------------------------------------------------------------
# 6. learning curves


def _curve(run_dirs: list[str], key: str) -> tuple[list[tuple[np.ndarray, np.ndarray]], list[tuple[float, str]]]:
    """Mean over runs of ``key`` per (stage, step), on a global step axis (stages laid end to end): one ``(x, y)``
    segment per stage, and the stage starts ``(x, task)``."""
    per: dict[tuple[int, int], list[float]] = {}
    names: dict[int, str] = {}
    for d in run_dirs:
        for rec in read_steps(d):
            v, st, step = rec.get(key), rec.get("stage"), rec.get("step")
            if isinstance(v, (int, float)) and isinstance(st, int) and isinstance(step, int) and np.isfinite(v):
                per.setdefault((st, step), []).append(float(v))
                names.setdefault(st, str(rec.get("task", st)))
    segments, starts, offset = [], [], 0
    for s in sorted({s for s, _ in per}):
        steps = sorted(k for ss, k in per if ss == s)
        segments.append((np.array([offset + k for k in steps], dtype=float),
                         np.array([np.mean(per[(s, k)]) for k in steps])))
        starts.append((float(offset), names[s]))
        offset += max(steps)
    return segments, starts


def _smooth(y: np.ndarray) -> np.ndarray:
    """Centered moving average over ~5% of a stage's logged steps (window 1 = none below 40 points)."""
    w = max(1, len(y) // 20)
    if w == 1:
        return y
    kernel = np.ones(w) / w
    pad = np.pad(y, (w // 2, w - 1 - w // 2), mode="edge")
    return np.convolve(pad, kernel, mode="valid")


def plot_learning_curves(agg: dict[str, Any], out_dir: Path) -> Path | None:
    """Training loss per method (and reward, KL to the reference for methods that log them, i.e. GRPO), mean over
    the seeds of the operating point, smoothed (moving average over ~5% of a stage), stages end to end (dotted
    lines = stage starts)."""
    colors = _colors(agg["methods"])
    keys = [("loss", "training loss"), ("reward", "mean reward (GRPO)"), ("kl_mean", "KL to the reference (GRPO)")]
    curves: dict[str, list[tuple[str, Any, Any]]] = {k: [] for k, _ in keys}
    for m in agg["methods"]:
        g = group(agg, m)
        if not g:
            continue
        for k, _ in keys:
            segments, starts = _curve(g["dirs"], k)
            if segments:
                curves[k].append((m, segments, starts))
    panels = [(k, label) for k, label in keys if curves[k]]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.8 * len(panels), 3.6), squeeze=False)
    for ax, (k, label) in zip(axes[0], panels):
        for m, segments, _ in curves[k]:
            for i, (x, y) in enumerate(segments):
                ax.plot(x, _smooth(y), color=colors[m], lw=1.1, label=m if i == 0 else None)
        for x0, task in curves[k][0][2]:
            ax.axvline(x0, color="grey", ls=":", lw=0.9)
            ax.text(x0, 1.0, f" {task}", transform=ax.get_xaxis_transform(), fontsize=7.5, color="grey", va="top")
        ax.set_title(label, fontsize=10, pad=4)
        ax.set_xlabel("optimizer step (stages end to end)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="center right")
    fig.suptitle(f"Learning curves at the operating points (mean over seeds; sequence {' → '.join(agg['sequence'])})",
                 fontsize=10)
    fig.tight_layout()
    return _save(fig, out_dir, "curves")


def all_figures(agg: dict[str, Any], root: str | Path) -> list[tuple[str, Path]]:
    """Every figure that has data, as ``(key, path)`` in report order."""
    out_dir = Path(root) / FILES
    out_dir.mkdir(parents=True, exist_ok=True)
    makers = [
        ("frontier", lambda: plot_frontier(agg, out_dir)),
        ("matrices", lambda: plot_matrices(agg, out_dir)),
        ("forgetting_bars", lambda: plot_forgetting_bars(agg, out_dir)),
        ("pareto", lambda: plot_pareto(agg, out_dir)),
        ("kl_forward", lambda: plot_kl_scatter(agg, out_dir, "forward")),
        ("kl_reverse", lambda: plot_kl_scatter(agg, out_dir, "reverse")),
        ("tokens", lambda: plot_tokens(agg, out_dir)),
        ("curves", lambda: plot_learning_curves(agg, out_dir)),
    ]
    out = []
    for key, make in makers:
        path = make()
        if path is not None:
            out.append((key, path))
    return out
