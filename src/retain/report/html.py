"""``DIR/report.html`` (self-contained: inline CSS, images as base64 ``data:`` URIs, no script, no external fetch)
and ``DIR/report.md`` (the findings table in markdown). Both written atomically.

Layout of report.html: title and the run's facts; the findings table (``id="findings"``); how methods were compared
(operating point and Pareto rules); the per-method metrics table at the operating points, the per-task accuracies,
every (method, lr) of the sweep, the forgetting-predictor table; every figure with its caption; how to read this;
caveats.
"""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path
from typing import Any

from retain.files import atomic_write_text
from retain.metrics import t_critical
from retain.report.aggregate import group
from retain.report.findings import INCONCLUSIVE, NOT_REPRODUCED, REPRODUCED, fmt_lr, fmt_stat, predictor_table
from retain.report.matched import LEARNED_RULE, NOT_REACHED, NOT_RUN, SHARED_RULES

CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; color: #1d2330; background: #fff;
       margin: 0 auto; padding: 24px 32px 48px; max-width: 1180px; line-height: 1.45; font-size: 15px; }
h1 { font-size: 26px; margin: 0 0 4px; } h2 { font-size: 20px; margin: 32px 0 10px; border-bottom: 2px solid #e3e7ee;
     padding-bottom: 4px; } h3 { font-size: 16px; margin: 22px 0 8px; }
.sub { color: #5b6475; margin: 0 0 18px; }
table { border-collapse: collapse; width: 100%; margin: 8px 0 14px; font-size: 13.5px; }
th, td { border: 1px solid #d5dae3; padding: 5px 8px; text-align: left; vertical-align: top; }
th { background: #f1f4f8; font-weight: 600; }
td.num { text-align: right; white-space: nowrap; font-variant-numeric: tabular-nums; }
.ci { color: #6b7385; font-size: 11.5px; }
.wrap { overflow-x: auto; }
table.facts { width: auto; } table.facts th { width: 210px; }
.verdict { font-weight: 700; white-space: nowrap; text-align: center; }
.v-reproduced { background: #d9f2dd; color: #135c22; }
.v-not-reproduced { background: #fadbd8; color: #8a1c12; }
.v-inconclusive { background: #fff1c9; color: #7a5500; }
#findings td:nth-child(2) { width: 34%; } #findings td:nth-child(3) { width: 17%; }
#findings td:nth-child(4) { width: 37%; }
.rule { color: #5b6475; font-size: 12px; margin-top: 4px; }
.summary { display: flex; gap: 12px; margin: 10px 0 4px; flex-wrap: wrap; }
.pill { padding: 4px 12px; border-radius: 14px; font-weight: 600; font-size: 13.5px; }
figure { margin: 18px 0 26px; } figure img { max-width: 100%; height: auto; border: 1px solid #e3e7ee; }
figcaption { color: #39414f; font-size: 13.5px; margin-top: 6px; }
.note { background: #f6f8fb; border-left: 4px solid #9aa7bd; padding: 8px 14px; margin: 10px 0; }
code { background: #f1f4f8; padding: 0 3px; border-radius: 3px; font-size: 90%; }
ul { margin: 6px 0 10px; }
"""

CAPTIONS = {
    "frontier": "The picture behind the verdicts (SPEC §2.4): for each method, every checkpoint of every learning rate "
                "of the first stage as new-task gain (selection half of the fixed held-out split) against prior-skill "
                "forgetting; one faint line per (lr, seed) along its checkpoints, the thick line the method's frontier "
                "(least forgetting at each gain, median over seeds). Left: greedy accuracy drop; right: answer NLL "
                "increase. Down and to the right is better: a method forgets less when its frontier lies lower at "
                "the same gain.",
    "matrices": "Accuracy matrix per method at its operating point (mean over seeds): rows are the model before any "
                "stage (base) and after each stage; columns are every evaluation column — the stage tasks on "
                "held-out test prompts, their OOD splits (<code>@ood</code>), their training prompts "
                "(<code>@train</code>) and the prior skills. Darker = lower accuracy.",
    "forgetting_bars": "Forgetting per method at its operating point. Left: prior-skill drop (mean over prior skills "
                       "of accuracy before the first stage minus after the last). Right: −FM, the forgetting measure "
                       "of Lai/Chaudhry on the stage tasks. Bars are means, whiskers the 95% t-interval over seeds, "
                       "dots the individual seeds.",
    "pareto": "The learning-rate sweep per method (SPEC §2.4): each lr is one point, mean over seeds with 95% "
              "intervals; filled circles = accuracy on held-out test prompts, hollow squares = accuracy on the "
              "training prompts (mean over the stage tasks, after the last stage). The line joins the Pareto "
              "frontier (held-out accuracy vs prior drop); * marks the operating point. Up and to the left is better.",
    "kl_forward": "Forgetting vs the forward KL shift KL(π0‖π) from the base model on the last stage's held-out "
                  "prompts (Razor), one dot per run, with the quadratic fit over all runs (finding 3).",
    "kl_reverse": "The same against the reverse KL KL(π‖π0) (samples from the finetuned model; Huan), shown beside "
                  "the forward KL as Razor's Table 1 compares them.",
    "tokens": "SFT target tokens of each task under the base model: predictive entropy vs the probability of the "
              "target token. The shaded corner (low entropy and low p(target)) holds the confident conflicts that "
              "EAFT down-weights and conflict-masked SFT drops (SPEC §2.3); up to 2000 tokens per task are drawn.",
    "curves": "Training curves at each method's operating point, mean over seeds, stages laid end to end (dotted "
              "lines): the training loss for every method, and for GRPO the mean reward and the KL to the stage's "
              "reference model.",
}

VERDICT_CLASS = {REPRODUCED: "v-reproduced", NOT_REPRODUCED: "v-not-reproduced", INCONCLUSIVE: "v-inconclusive",
                 NOT_REACHED: "v-inconclusive", NOT_RUN: "v-inconclusive"}


def esc(v: Any) -> str:
    return html.escape(str(v), quote=True)


def _fmt_seconds(s: Any) -> str:
    if not isinstance(s, (int, float)) or not math.isfinite(s):
        return "–"
    m, sec = divmod(int(round(s)), 60)
    return f"{m} min {sec:02d} s ({s:.0f} s)" if m else f"{s:.0f} s"


def _eval_n_text(agg: dict[str, Any]) -> str:
    parts = []
    for col, (lo, hi) in agg["eval_n"].items():
        parts.append(f"{col} {lo}" if lo == hi else f"{col} {lo}–{hi}")
    return ", ".join(parts) or "–"


def facts(agg: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, text) pairs describing the demo; every value escaped later."""
    meta = agg["meta"]
    th = agg["thresholds"]
    seeds = sorted({r["seed"] for r in agg["runs"] if r["seed"] is not None})
    lrs = meta.get("lrs") or {m: sorted({g["lr"] for g in agg["groups"] if g["method"] == m and g["lr"] is not None})
                              for m in agg["methods"]}
    shift = agg["shift_config"]
    rows = [
        ("preset", str(meta.get("preset", "–"))),
        ("task sequence", " → ".join(agg["sequence"])),
        ("methods", ", ".join(agg["methods"])),
        ("seeds", ", ".join(str(s) for s in (meta.get("seeds") or seeds))),
        ("learning rates", "; ".join(f"{m}: {', '.join(fmt_lr(v) for v in vals)}" for m, vals in lrs.items())),
        ("runs", f"{len(agg['runs'])} finished" + (f", {len(agg['missing'])} missing: {', '.join(agg['missing'])}"
                                                    if agg["missing"] else "")),
        ("evaluation prompts per column (eval_n)", _eval_n_text(agg)),
        ("KL measurement", f"{shift.get('prompts', '–')} held-out prompts × {shift.get('samples', '–')} sample(s) of "
                           "the last stage's task, seed = run seed × 1000 + stage"),
        ("confident-conflict thresholds", f"entropy < {th['entropy_max']:g} nats and p(target) < {th['prob_max']:g}"),
        ("base model", str(meta.get("base_model", "–"))),
        ("reward functions", "; ".join(f"{t}: {f}" for t, f in agg.get("rewards", {}).items()) or "the tasks' own"),
        ("machine", str(meta.get("machine", "–"))),
        ("wall time", _fmt_seconds(meta.get("wall_seconds"))),
        ("peak memory", f"{meta['peak_rss_mb']:.0f} MB (peak RSS)" if isinstance(meta.get("peak_rss_mb"), (int, float))
         else "–"),
    ]
    return rows


def _table(headers: list[str], rows: list[list[tuple[str, str]]], attrs: str = "") -> str:
    """``rows`` of (html, css class) cells; headers are escaped."""
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f'<td class="{c}">{v}</td>' if c else f"<td>{v}</td>" for v, c in row) + "</tr>"
                   for row in rows)
    return f'<div class="wrap"><table{attrs}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def learned_html(agg: dict[str, Any]) -> str:
    """Did each method learn each stage's task on held-out prompts? (test half of the best selection checkpoint)"""
    rows = []
    for row in agg.get("learned") or []:
        if not row.get("seeds"):
            continue
        sel, test = row["selection"], row["test"]
        chosen = row["chosen"]
        lrs = sorted({c["lr"] for c in chosen})
        rows.append([
            (esc(row["method"]), ""), (esc(f"{row['stage']}: {row.get('task', '')}"), ""), (esc(row["seeds"]), ""),
            (esc(fmt_stat({"mean": sel["mean"], "low": sel["low"], "high": sel["high"]}, 100)), "num"),
            (esc(fmt_stat({"mean": test["mean"], "low": test["low"], "high": test["high"]}, 100)), "num"),
            (esc(", ".join(fmt_lr(v) for v in lrs)), ""),
            (esc("learned" if row["learned"] else row["reason"]),
             f"verdict {'v-reproduced' if row['learned'] else 'v-inconclusive'}"),
        ])
    if not rows:
        return "<p>No in-stage trajectories in these runs.</p>"
    return (f'<div class="note">{esc(_cap(LEARNED_RULE))}.</div>' + _table(
        ["method", "stage", "seeds", "best gain, selection half (pts)", "its test-half gain (pts)",
         "lr of the best checkpoints", "learned?"], rows, ' id="learned"'))


# The descriptive tables compare methods at their own operating points or at equal lr, where forgetting follows
# lr × steps: their rows say which way the numbers point, never "reproduced" (only matched-gain verdicts decide).
PATTERN = {"reproduced": "points the paper's way", "not reproduced": "points against the paper",
           "inconclusive": "unclear"}


def descriptive(verdict: str) -> str:
    """A descriptive row's label for what its rule computed (see PATTERN)."""
    return PATTERN.get(verdict, verdict)


def findings_table(fs: list[dict[str, Any]], table_id: str = "findings", verdicts: bool = True) -> str:
    rows = []
    for f in fs:
        label = f["verdict"] if verdicts else descriptive(f["verdict"])
        rows.append([
            (esc(f["id"]), ""),
            (esc(f["claim"]) + f'<div class="rule">Rule: {esc(f["rule"])}</div>', ""),
            (esc(f["paper"]), ""),
            (esc(f["measured"]), ""),
            (esc(label), f"verdict {VERDICT_CLASS[f['verdict']]}"),
        ])
    return _table(["#", "claim (and the rule that decides it)", "paper", "measured here (95% intervals)",
                   "verdict" if verdicts else "pattern (description, not a verdict)"], rows, f' id="{table_id}"')


def _metric_cells(g: dict[str, Any] | None, keys: list[tuple[str, float]]) -> list[tuple[str, str]]:
    if g is None:
        return [("–", "num") for _ in keys]
    return [(_stat_html(g["stats"].get(k), s, _signed(k)), "num") for k, s in keys]


def _signed(key: str) -> bool:
    """Changes (gain, drop, FM, OOD change) carry a sign; plain accuracies do not."""
    return not (key.startswith(("heldout", "train")) or key == "average_accuracy")


def _stat_html(stat: dict[str, Any] | None, scale: float, signed: bool = True) -> str:
    """Mean on the first line, the 95% interval below it in small type (accuracy-like values signed, 1 decimal;
    KL and L2 unsigned, 3 decimals)."""
    if not stat:
        return "–"
    acc = scale != 1
    digits, sign = (1, signed) if acc else (3, False)
    mean = fmt_stat({"mean": stat["mean"], "low": None, "high": None}, scale, digits, sign)
    if stat["low"] is None:
        return esc(mean)
    lo = fmt_stat({"mean": stat["low"], "low": None, "high": None}, scale, digits, sign)
    hi = fmt_stat({"mean": stat["high"], "low": None, "high": None}, scale, digits, sign)
    return f'{esc(mean)}<br><span class="ci">[{esc(lo)}, {esc(hi)}]</span>'



def metrics_table(agg: dict[str, Any], groups: list[dict[str, Any]]) -> str:
    scale = agg["scale"]
    keys = [("target_gain", scale), ("heldout_mean", scale), ("train_mean", scale), ("prior_drop", scale),
            ("forgetting_measure", scale)]
    fkl = next((k for k in ("forward_kl_exact", "forward_kl") if any(k in g["stats"] for g in groups)), None)
    rkl = next((k for k in ("reverse_kl_exact", "reverse_kl") if any(k in g["stats"] for g in groups)), None)
    keys += [(k, 1.0) for k in (fkl, rkl, "weight_l2") if k]
    present = [(k, s) for k, s in keys if any(k in g["stats"] for g in groups)]
    names = {"target_gain": "target gain", "heldout_mean": "new-task acc. held-out (= AA)",
             "train_mean": "new-task acc. train prompts", "prior_drop": "prior drop", "forgetting_measure": "FM",
             "forward_kl_exact": "fwd KL (exact)", "forward_kl": "fwd KL (MC)", "reverse_kl_exact": "rev KL (exact)",
             "reverse_kl": "rev KL (MC)", "weight_l2": "weight L2"}
    headers = ["method", "lr", "seeds"] + [names[k] for k, _ in present]
    rows = []
    for g in groups:
        op = g["lr"] == agg["operating_points"].get(g["method"])
        front = g["lr"] in agg["pareto"].get(g["method"], [])
        mark = (" *" if op else "") + (" ◆" if front else "")
        rows.append([(esc(g["method"]), ""), (esc(fmt_lr(g["lr"]) + mark), "num"), (esc(g["n_seeds"]), "num")]
                    + _metric_cells(g, present))
    return _table(headers, rows)


def per_task_table(agg: dict[str, Any], groups: list[dict[str, Any]]) -> str:
    scale = agg["scale"]
    tasks = agg["sequence"]
    keys = [(f"heldout:{t}", scale) for t in tasks] + [(f"train:{t}", scale) for t in tasks]
    keys += [(f"ood:{c}", scale) for c in agg["ood_columns"]]
    present = [(k, s) for k, s in keys if any(k in g["stats"] for g in groups)]
    head = {"heldout": "held-out", "train": "train prompts", "ood": "OOD change"}
    headers = ["method", "lr"] + [f"{k.split(':', 1)[1]} {head[k.split(':', 1)[0]]}" for k, _ in present]
    rows = [[(esc(g["method"]), ""), (esc(fmt_lr(g["lr"])), "num")] + _metric_cells(g, present) for g in groups]
    return _table(headers, rows)


def predictor_html(agg: dict[str, Any]) -> str:
    t = predictor_table(agg)
    names = {"forward": f"forward KL ({t['forward_key']})", "reverse": f"reverse KL ({t['reverse_key']})",
             "weight_l2": "weight L2 distance"}
    paper = {"forward": "0.96 toy / 0.71 LLM", "reverse": "0.93", "weight_l2": "0.34–0.58"}
    rows = []
    for k, fit in t["fits"].items():
        r2 = "–" if fit["r2"] is None else f"{fit['r2']:.3f}"
        rho = "–" if fit["spearman"] is None else f"{fit['spearman']:+.3f}".replace("-", "−")
        rows.append([(esc(names[k]), ""), (esc(r2), "num"), (esc(rho), "num"), (esc(fit["n"]), "num"),
                     (esc(paper[k]), "num"), (esc(fit["note"] or ""), "")])
    return _table(["predictor (last stage, from the base)", "quadratic R²", "Spearman ρ", "runs", "Razor R²", "note"],
                  rows)


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _img(path: Path) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f"data:image/png;base64,{data}"


def caveats(agg: dict[str, Any], fs: list[dict[str, Any]]) -> list[str]:
    n_seeds = sorted({g["n_seeds"] for g in agg["groups"]})
    ns = [v for lohi in agg["eval_n"].values() for v in lohi]
    few = n_seeds[0] if n_seeds else 1
    t_text = (f"with {few} seeds the t-interval's critical value is {t_critical(few - 1):.2f}, so only large, "
              "consistent differences reach a verdict" if few >= 2 else
              "a group with one seed has no interval at all, and every comparison with it is inconclusive")
    out = [
        f"Tiny model ({esc(agg['meta'].get('base_model', 'the embedded base model'))}) on synthetic tasks: the papers "
        "used 1–8B models on real benchmarks. A reproduced direction here is evidence about the mechanism, not about "
        "the papers' magnitudes.",
        f"Few seeds per (method, lr): {esc(', '.join(str(n) for n in n_seeds))}; {t_text}.",
    ]
    if ns:
        span = f"{min(ns)}" if min(ns) == max(ns) else f"{min(ns)}–{max(ns)}"
        out.append(f"Accuracies come from {span} prompts per column: one prompt moves an accuracy by "
                   f"{100 / max(1, min(ns)):.1f} pts{' at the smallest' if min(ns) != max(ns) else ''}.")
    out.append("The operating point is chosen by mean target gain on the same seeds the comparison then uses — a "
               "mild selection effect that favours each method's best lr equally.")
    out.append("The OOD change of finding 6 is measured after the whole sequence (base → last stage), while Chu "
               "measures right after GeneralPoints training; later stages can move it.")
    if "multitask" in agg["methods"]:
        out.append("multitask trains jointly on every task seen so far: a non-continual reference, not a competitor.")
    bad = [f["id"] for f in fs if f["verdict"] == NOT_REPRODUCED]
    unsure = [f["id"] for f in fs if f["verdict"] == INCONCLUSIVE]
    ok = [f["id"] for f in fs if f["verdict"] == REPRODUCED]
    out.append(f"Reproduced: {', '.join(ok) or 'none'}. Not reproduced: {', '.join(bad) or 'none'}. Inconclusive: "
               f"{', '.join(unsure) or 'none'} (see each row's measured values and rule).")
    if agg["missing"]:
        out.append(f"Runs listed in demo.json without results.json were left out: {esc(', '.join(agg['missing']))}.")
    for w in agg.get("warnings", []):
        out.append(f"Run {esc(w['run'])}: {esc(w['message'])}.")
    return out


def render_html(agg: dict[str, Any], fs: list[dict[str, Any]], figures: list[tuple[str, Path]]) -> str:
    ms = agg.get("matched") or []
    counts = {v: sum(f["verdict"] == v for f in ms)
              for v in (REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE, NOT_REACHED, NOT_RUN)}
    lead = [(k, p) for k, p in figures if k == "frontier"]
    figures = [(k, p) for k, p in figures if k != "frontier"]
    lead_fig = "".join(
        f'<figure id="fig-{esc(key)}"><img src="{_img(path)}" alt="{esc(key)}">'
        f"<figcaption><b>Figure 0.</b> {CAPTIONS.get(key, '')}</figcaption></figure>" for key, path in lead
    )
    pills = "".join(f'<span class="pill {VERDICT_CLASS[v]}">{n} {esc(v)}</span>' for v, n in counts.items())
    fact_rows = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in facts(agg))
    op_groups = [g for g in (group(agg, m) for m in agg["methods"]) if g]
    figs = "".join(
        f'<figure id="fig-{esc(key)}"><img src="{_img(path)}" alt="{esc(key)}">'
        f"<figcaption><b>Figure {i}.</b> {CAPTIONS.get(key, '')}</figcaption></figure>"
        for i, (key, path) in enumerate(figures, 1)
    )
    rules = agg["rules"]
    cav = "".join(f"<li>{c}</li>" for c in caveats(agg, fs))
    title = f"retain report — {esc(agg['meta'].get('preset', 'runs'))}: {esc(' → '.join(agg['sequence']))}"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title><style>{CSS}</style></head>
<body>
<h1>{title}</h1>
<p class="sub">Continual post-training: what each method learned on the new tasks, what it forgot of the prior
skills, and whether the papers' findings hold here. Accuracies in percentage points (pts); prior drop is positive when
prior skills got worse; FM ≤ 0, negative = forgetting.</p>
<table class="facts">{fact_rows}</table>

<h2>Verdicts at matched new-task gain</h2>
<div class="summary">{pills}</div>
{lead_fig}
{findings_table(ms, "matched")}
<div class="note"><b>How verdicts are decided.</b> {" ".join(esc(_cap(r.rstrip("."))) + "." for r in SHARED_RULES)}</div>
<h3>Did each method learn? (held-out prompts)</h3>
{learned_html(agg)}

<h2>Descriptive comparisons (not verdicts)</h2>
<p class="rule">At each method's operating point and at equal learning rates. Forgetting follows lr × steps with
Adam, so these rows describe the sweep; the verdicts above are the ones decided at matched gain.</p>
{findings_table(fs, verdicts=False)}

<h2>Methods compared</h2>
<div class="note">{esc(_cap(rules['operating_point']))}. {esc(_cap(rules['pareto']))}.
Intervals are two-sided 95% Student-t intervals over seeds (mean_ci); differences use Welch intervals.</div>
<h3>At each method's operating point</h3>
{metrics_table(agg, op_groups)}
<h3>Accuracy per task at the operating point (after the last stage)</h3>
{per_task_table(agg, op_groups)}
<h3>Every learning rate of the sweep</h3>
<p class="rule">* = operating point, ◆ = on the method's Pareto frontier.</p>
{metrics_table(agg, agg['groups'])}
<h3>Forgetting predictors (Razor, Table 1) over all {len(agg['runs'])} runs</h3>
{predictor_html(agg)}

<h2>Figures</h2>
{figs}

<h2>How to read this</h2>
<ul>
<li>Each finding states a paper's claim, the paper's numbers, what this demo measured (means with 95% intervals over
seeds) and a verdict decided by the rule printed under the claim. The rules were fixed before the runs and look only at
means and intervals: <b>reproduced</b> = the interval lies on the paper's side, <b>not reproduced</b> = it lies on the
other side, <b>inconclusive</b> = it straddles zero, too few seeds, or the method was not run.</li>
<li>Methods are compared at their operating points, but forgetting depends on the learning rate as much as on the
method: read the Pareto figure before concluding that one method forgets less.</li>
<li>Held-out accuracy (test prompts) and training-prompt accuracy are reported apart: a method can fit its training
prompts without generalising.</li>
<li>Target gain = accuracy on each stage task right after its stage minus the base model's, averaged over stages.</li>
</ul>

<h2>Caveats</h2>
<ul>{cav}</ul>
</body></html>
"""


def render_markdown(agg: dict[str, Any], fs: list[dict[str, Any]]) -> str:
    def cell(s: Any) -> str:
        return str(s).replace("|", "\\|").replace("\n", " ")

    lines = [f"# retain report — {' → '.join(agg['sequence'])}", "",
             f"Methods: {', '.join(agg['methods'])}; {len(agg['runs'])} runs.", "",
             "## Verdicts at matched new-task gain", "",
             "| # | claim | paper | measured (95% intervals) | verdict |", "|---|---|---|---|---|"]
    for f in agg.get("matched") or []:
        lines.append(f"| {cell(f['id'])} | {cell(f['claim'])} | {cell(f['paper'])} | {cell(f['measured'])} | "
                     f"**{cell(f['verdict'])}** |")
    lines += ["", "How verdicts are decided: " + " ".join(f"{r[0].upper()}{r[1:].rstrip('.')}." for r in SHARED_RULES)]
    lines += ["", "Did each method learn (best checkpoint, held-out test half):", ""]
    for row in agg.get("learned") or []:
        if row.get("seeds"):
            t = row["test"]
            lines.append(f"- {row['method']}, stage {row['stage']} ({row.get('task', '')}): "
                         f"{fmt_stat({'mean': t['mean'], 'low': t['low'], 'high': t['high']}, 100)} pts over "
                         f"{row['seeds']} seeds — {'learned' if row['learned'] else row['reason']}")
    lines += ["", "## Descriptive comparisons at the operating points (not verdicts)", "",
              f"{agg['rules']['operating_point'][0].upper()}{agg['rules']['operating_point'][1:]}.", "",
              "| # | claim | paper | measured (95% intervals) | pattern (description, not a verdict) |",
              "|---|---|---|---|---|"]
    for f in fs:
        lines.append(f"| {cell(f['id'])} | {cell(f['claim'])} | {cell(f['paper'])} | {cell(f['measured'])} | "
                     f"{cell(descriptive(f['verdict']))} |")
    lines += ["", "Rules:", ""] + [f"- {cell(f['id'])}: {cell(f['rule'])}" for f in (agg.get("matched") or [])]
    lines += ["- operating-point rows: the rules are printed under each claim in report.html"]
    if agg.get("rewards"):
        lines += ["", "Reward functions: " + "; ".join(f"{t}: `{f}`" for t, f in agg["rewards"].items())]
    if agg.get("warnings"):
        lines += ["", "## Run warnings", ""] + [f"- {cell(w['run'])}: {cell(w['message'])}" for w in agg["warnings"]]
    lines += ["", "Full report with figures: report.html", ""]
    return "\n".join(lines)


def write_html(root: str | Path, agg: dict[str, Any], fs: list[dict[str, Any]],
               figures: list[tuple[str, Path]]) -> Path:
    path = Path(root) / "report.html"
    atomic_write_text(path, render_html(agg, fs, figures))
    return path


def write_markdown(root: str | Path, agg: dict[str, Any], fs: list[dict[str, Any]]) -> Path:
    path = Path(root) / "report.md"
    atomic_write_text(path, render_markdown(agg, fs))
    return path
