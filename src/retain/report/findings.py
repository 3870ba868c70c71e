"""The papers' findings (SPEC §1), each checked against a demo's aggregate by a rule fixed in advance.

Every finding is ``{"id", "claim", "paper", "measured", "verdict", "rule", "numbers"}`` with ``verdict`` one of
``"reproduced"``, ``"not reproduced"``, ``"inconclusive"``. The rules look only at means and intervals; their
thresholds are the constants below, chosen before any demo ran and never adjusted to an outcome.

The comparison of two methods A and B on a metric (each at its operating point, see
:mod:`retain.report.aggregate`): the contrast ``d = mean(A) − k·mean(B)`` (k = 1 for a plain difference) with a
two-sided 95% **Welch** interval from the per-seed values: ``se² = s_A²/n_A + k²·s_B²/n_B`` (sample variances,
n − 1), degrees of freedom by Welch–Satterthwaite rounded **down** to an integer ≥ 1 (conservative), half-width
``t_{0.975, df} · se`` (:func:`retain.metrics.t_critical`). The finding is *reproduced* when that interval lies
entirely on the paper's side of 0, *not reproduced* when it lies entirely on the other side, and *inconclusive* when
it contains 0. A group with fewer than 2 seeds gives *inconclusive* ("too few seeds"); a method the demo did not run
gives *inconclusive* ("not run").
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

from retain.metrics import fit_quadratic, forgetting_predictor, t_critical
from retain.report.aggregate import group

REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE = "reproduced", "not reproduced", "inconclusive"
VERDICTS = (REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE)

MIN_SEEDS = 2  # per group, for any interval
MUCH_FACTOR = 2.0  # "A ≫ B" means A > 2·B
GAIN_KEEP_FRACTION = 0.25  # "keeps the gain": loses at most a quarter of SFT's mean target gain
KL_MIN_RUNS = 6  # runs needed before a quadratic fit over runs is read at all
KL_R2_REPRODUCED = 0.5
KL_R2_NOT = 0.2
KL_PERMUTATIONS = 1000
KL_ALPHA = 0.05

COMPARE_RULE = (
    "d = difference of the two methods' means at their operating points, with a 95% Welch interval from the "
    "per-seed values (Welch–Satterthwaite df rounded down); reproduced if the interval lies entirely on the paper's "
    "side of 0, not reproduced if entirely on the other side, otherwise inconclusive; fewer than 2 seeds in a group "
    "→ inconclusive (too few seeds); a method not run → inconclusive (not run)"
)


# ----------------------------------------------------------------------------------------------------------------
# statistics


def contrast(a: list[float], b: list[float], k: float = 1.0) -> dict[str, Any]:
    """``mean(a) − k·mean(b)`` with its 95% Welch interval (see the module docstring)."""
    a_arr, b_arr = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    na, nb = a_arr.size, b_arr.size
    d = float(a_arr.mean() - k * b_arr.mean())
    if na < MIN_SEEDS or nb < MIN_SEEDS:
        return {"d": d, "low": None, "high": None, "df": None, "n_a": na, "n_b": nb}
    va, vb = float(a_arr.var(ddof=1)) / na, k * k * float(b_arr.var(ddof=1)) / nb
    se2 = va + vb
    if se2 == 0.0:
        df = na + nb - 2
        hw = 0.0
    else:
        df_real = se2 * se2 / (va * va / (na - 1) + vb * vb / (nb - 1))
        df = max(1, int(math.floor(df_real + 1e-9)))
        hw = t_critical(df) * math.sqrt(se2)
    return {"d": d, "low": d - hw, "high": d + hw, "df": df, "n_a": na, "n_b": nb}


def side(low: float | None, high: float | None, expect: int) -> str:
    """Where an interval lies for a paper expecting the sign ``expect`` (+1: above 0, −1: below 0):
    ``"paper"`` (entirely on that side), ``"other"`` (entirely on the other side) or ``"straddle"``."""
    if low is None or high is None:
        return "straddle"
    if expect > 0:
        return "paper" if low > 0 else ("other" if high < 0 else "straddle")
    return "paper" if high < 0 else ("other" if low > 0 else "straddle")


def permutation_p(x: list[float], y: list[float], r2: float, n: int = KL_PERMUTATIONS, seed: int = 0) -> float:
    """Share of ``n`` random permutations of ``x`` (numpy ``default_rng(seed)``) whose quadratic fit reaches an R²
    ≥ the observed ``r2``, counted as (1 + hits) / (1 + n)."""
    rng = np.random.default_rng(seed)
    xa = np.asarray(x, dtype=float)
    hits = 0
    for _ in range(n):
        fit = fit_quadratic(rng.permutation(xa), y)
        if fit["r2"] is not None and fit["r2"] >= r2 - 1e-12:
            hits += 1
    return (1 + hits) / (1 + n)


# ----------------------------------------------------------------------------------------------------------------
# formatting


def _num(v: float | None, scale: float = 1.0, digits: int = 1, sign: bool = True) -> str:
    if v is None:
        return "–"
    s = f"{v * scale:+.{digits}f}" if sign else f"{v * scale:.{digits}f}"
    return s.replace("-", "−")


def fmt_ci(mean: float | None, low: float | None, high: float | None, scale: float = 1.0, digits: int = 1,
           sign: bool = True) -> str:
    """``"+3.2 [+1.0, +5.4]"`` (or just the mean when there is no interval)."""
    if low is None or high is None:
        return _num(mean, scale, digits, sign)
    return f"{_num(mean, scale, digits, sign)} [{_num(low, scale, digits, sign)}, {_num(high, scale, digits, sign)}]"


def fmt_stat(stat: dict[str, Any] | None, scale: float = 1.0, digits: int = 1, sign: bool = True) -> str:
    if not stat:
        return "–"
    return fmt_ci(stat["mean"], stat["low"], stat["high"], scale, digits, sign)


def fmt_lr(lr: float | None) -> str:
    return "?" if lr is None else f"{lr:g}"


def _finding(fid: str, claim: str, paper: str, measured: str, verdict: str, rule: str,
             **numbers: Any) -> dict[str, Any]:
    assert verdict in VERDICTS
    return {"id": fid, "claim": claim, "paper": paper, "measured": measured, "verdict": verdict, "rule": rule,
            "numbers": numbers}


def _groups(agg: dict[str, Any], methods: list[str]) -> tuple[dict[str, dict[str, Any]], str | None]:
    """Operating-point groups of ``methods``, or the reason they cannot be compared (not run / too few seeds)."""
    absent = [m for m in methods if group(agg, m) is None]
    if absent:
        return {}, f"not run: {', '.join(absent)} absent from the demo"
    out = {m: group(agg, m) for m in methods}
    return out, None  # type: ignore[return-value]


def _values(g: dict[str, Any], metric: str) -> list[float]:
    stat = g["stats"].get(metric)
    return list(stat["values"]) if stat else []


def _few(gs: dict[str, dict[str, Any]], metric: str) -> str | None:
    few = [f"{m} ({len(_values(g, metric))})" for m, g in gs.items() if len(_values(g, metric)) < MIN_SEEDS]
    return f"too few seeds with {metric} (need {MIN_SEEDS} per group): {', '.join(few)}" if few else None


def _desc(name: str, g: dict[str, Any], metric: str, scale: float) -> str:
    return f"{name} {fmt_stat(g['stats'].get(metric), scale)} (lr {fmt_lr(g['lr'])}, {g['n_seeds']} seeds)"


def at_equal_lrs(agg: dict[str, Any], a: str, b: str, metric: str, scale: float) -> str:
    """``a − b`` on ``metric`` at every learning rate both methods ran (context beside the operating-point verdict:
    forgetting depends on the learning rate at least as much as on the method, SPEC §2.4); "" when they share none."""
    lrs_a = {g["lr"] for g in agg["groups"] if g["method"] == a}
    parts = []
    for lr in sorted(lr for lr in {g["lr"] for g in agg["groups"] if g["method"] == b} & lrs_a if lr is not None):
        ga, gb = group(agg, a, lr), group(agg, b, lr)
        va, vb = _values(ga, metric), _values(gb, metric)
        if va and vb:
            c = contrast(va, vb)
            parts.append(f"lr {fmt_lr(lr)}: {fmt_stat(ga['stats'][metric], scale)} vs "
                         f"{fmt_stat(gb['stats'][metric], scale)}, d = {fmt_ci(c['d'], c['low'], c['high'], scale)}")
    return f"; at equal learning rates ({a} vs {b}): " + "; ".join(parts) if parts else ""


# ----------------------------------------------------------------------------------------------------------------
# the findings


def compare_methods(
    agg: dict[str, Any], fid: str, claim: str, paper: str, metric: str, label: str, a: str, b: str, expect: int,
    scale: float | None = None,
) -> dict[str, Any]:
    """Generic "A vs B" finding: d = A − B on ``metric``; the paper expects ``sign(d) == expect``."""
    scale = agg["scale"] if scale is None else scale
    direction = "above" if expect > 0 else "below"
    rule = f"d = {label}({a}) − {label}({b}); paper's side: d {'>' if expect > 0 else '<'} 0 (interval entirely " \
           f"{direction} 0). " + COMPARE_RULE
    gs, why = _groups(agg, [a, b])
    if why:
        return _finding(fid, claim, paper, why, INCONCLUSIVE, rule)
    why = _few(gs, metric)
    c = contrast(_values(gs[a], metric), _values(gs[b], metric)) if not _missing_metric(gs, metric) else None
    head = f"{label}: {_desc(a, gs[a], metric, scale)} vs {_desc(b, gs[b], metric, scale)}"
    if c is None:
        return _finding(fid, claim, paper, f"{head}; {metric} not reported", INCONCLUSIVE, rule)
    measured = f"{head}; d = {fmt_ci(c['d'], c['low'], c['high'], scale)}" + at_equal_lrs(agg, a, b, metric, scale)
    if why:
        return _finding(fid, claim, paper, f"{measured}; {why}", INCONCLUSIVE, rule, d=c)
    outcome = side(c["low"], c["high"], expect)
    verdict = {"paper": REPRODUCED, "other": NOT_REPRODUCED, "straddle": INCONCLUSIVE}[outcome]
    return _finding(fid, claim, paper, measured, verdict, rule, d=c)


def _missing_metric(gs: dict[str, dict[str, Any]], metric: str) -> bool:
    return any(not _values(g, metric) for g in gs.values())


def finding_rl_forgets_less(agg: dict[str, Any]) -> dict[str, Any]:
    return compare_methods(
        agg, "1",
        "RL (GRPO) forgets less than SFT over the task sequence (forgetting measure, higher = less forgetting)",
        "Lai: FM SFT −10.4 vs GRPO −2.3; average accuracy 54.0 vs 60.0 (7 tasks, Qwen2.5-VL-7B)",
        "forgetting_measure", "FM", "grpo", "sft", +1,
    )


def finding_prior_drop(agg: dict[str, Any]) -> dict[str, Any]:
    claim = "Prior-skill drop under SFT is much larger than under RL (SFT ≫ GRPO)"
    paper = "Retaining: GRPO drop on other tasks < 1 pt, SFT up to ~30–38 pts (Llama-3 / Qwen-2.5, 1–8B)"
    k = MUCH_FACTOR
    rule = (f"'≫' = more than {k:g}×. d = drop(sft) − drop(grpo) and c = drop(sft) − {k:g}·drop(grpo), each with a "
            f"95% Welch interval at the operating points; reproduced if both intervals lie entirely above 0; not "
            f"reproduced if either lies entirely below 0 (SFT drops less, or clearly less than {k:g}× GRPO's drop); "
            "otherwise inconclusive; fewer than 2 seeds in a group → inconclusive; a method not run → inconclusive")
    scale = agg["scale"]
    gs, why = _groups(agg, ["sft", "grpo"])
    if why:
        return _finding("2", claim, paper, why, INCONCLUSIVE, rule)
    if _missing_metric(gs, "prior_drop"):
        return _finding("2", claim, paper, "prior drop not reported (no prior-skill columns)", INCONCLUSIVE, rule)
    a, b = _values(gs["sft"], "prior_drop"), _values(gs["grpo"], "prior_drop")
    d, c = contrast(a, b), contrast(a, b, k)
    measured = (f"prior drop (pts): {_desc('sft', gs['sft'], 'prior_drop', scale)} vs "
                f"{_desc('grpo', gs['grpo'], 'prior_drop', scale)}; d = {fmt_ci(d['d'], d['low'], d['high'], scale)}; "
                f"sft − {k:g}·grpo = {fmt_ci(c['d'], c['low'], c['high'], scale)}"
                + at_equal_lrs(agg, "sft", "grpo", "prior_drop", scale))
    few = _few(gs, "prior_drop")
    if few:
        return _finding("2", claim, paper, f"{measured}; {few}", INCONCLUSIVE, rule, d=d, c=c)
    sides = [side(d["low"], d["high"], +1), side(c["low"], c["high"], +1)]
    verdict = REPRODUCED if sides == ["paper", "paper"] else NOT_REPRODUCED if "other" in sides else INCONCLUSIVE
    return _finding("2", claim, paper, measured, verdict, rule, d=d, c=c)


def _predictor_runs(agg: dict[str, Any]) -> tuple[list[dict[str, Any]], str]:
    """Per-run rows for the predictor fit, and which forward-KL estimate they use (the exact per-position KL
    when at least as many runs report it as the Monte-Carlo one; it has the same expectation and less variance)."""
    rows = [r["values"] for r in agg["runs"] if r["values"].get("prior_drop") is not None]
    n_exact = sum(r.get("forward_kl_exact") is not None for r in rows)
    n_mc = sum(r.get("forward_kl") is not None for r in rows)
    fkey = "forward_kl_exact" if n_exact and n_exact >= n_mc else "forward_kl"
    n_rexact = sum(r.get("reverse_kl_exact") is not None for r in rows)
    n_rmc = sum(r.get("reverse_kl") is not None for r in rows)
    rkey = "reverse_kl_exact" if n_rexact and n_rexact >= n_rmc else "reverse_kl"
    runs = [{"forgetting": r["prior_drop"], "forward": r.get(fkey), "reverse": r.get(rkey),
             "weight_l2": r.get("weight_l2")} for r in rows]
    return runs, f"{fkey}|{rkey}"


def predictor_table(agg: dict[str, Any]) -> dict[str, Any]:
    """Razor's Table 1 over every run: quadratic fits of prior drop on the last stage's forward KL, reverse KL and
    weight L2 (:func:`retain.metrics.forgetting_predictor`), plus which KL estimates were used."""
    runs, keys = _predictor_runs(agg)
    fkey, rkey = keys.split("|")
    fits = forgetting_predictor(runs, ["forward", "reverse", "weight_l2"], target="forgetting")
    return {"fits": fits, "forward_key": fkey, "reverse_key": rkey, "runs": runs}


def finding_kl_predicts(agg: dict[str, Any]) -> dict[str, Any]:
    claim = "The forward KL shift from the base model on the new tasks predicts forgetting (prior drop) across runs"
    paper = "Razor: quadratic fit R² 0.96 (toy) / 0.71 (LLM) for forward KL; reverse KL 0.93; weight change 0.34–0.58"
    rule = (f"quadratic fit of prior drop on the last stage's forward KL over all runs (retain.metrics."
            f"forgetting_predictor), in-sample R², Spearman ρ, and a permutation p-value ({KL_PERMUTATIONS} shuffles "
            f"of KL across runs, seed 0: share with R² ≥ observed); reproduced if R² ≥ {KL_R2_REPRODUCED}, ρ > 0 "
            f"and p < {KL_ALPHA}; not reproduced if R² < {KL_R2_NOT} or ρ ≤ 0; otherwise inconclusive; fewer than "
            f"{KL_MIN_RUNS} runs with KL and prior drop → inconclusive")
    table = predictor_table(agg)
    fits = table["fits"]
    fw = fits["forward"]

    def r2s(fit: dict[str, Any]) -> str:
        r2 = "–" if fit["r2"] is None else f"{fit['r2']:.2f}"
        rho = "–" if fit["spearman"] is None else f"{fit['spearman']:+.2f}".replace("-", "−")
        return f"R² {r2}, ρ {rho}, n {fit['n']}"

    others = f"reverse KL ({table['reverse_key']}): {r2s(fits['reverse'])}; weight L2: {r2s(fits['weight_l2'])}"
    if fw["n"] < KL_MIN_RUNS:
        return _finding("3", claim, paper, f"forward KL: {fw['n']} runs with KL (need {KL_MIN_RUNS}); {others}",
                        INCONCLUSIVE, rule, fits=fits)
    if fw["r2"] is None:
        return _finding("3", claim, paper, f"forward KL: R² undefined ({fw['note']}); {others}", INCONCLUSIVE, rule,
                        fits=fits)
    xs = [r["forward"] for r in table["runs"] if r["forward"] is not None]
    ys = [r["forgetting"] for r in table["runs"] if r["forward"] is not None]
    p = permutation_p(xs, ys, fw["r2"])
    rho = fw["spearman"]
    measured = f"forward KL ({table['forward_key']}): {r2s(fw)}, permutation p {p:.3f}; {others}"
    if fw["r2"] < KL_R2_NOT or rho is None or rho <= 0:
        verdict = NOT_REPRODUCED
    elif fw["r2"] >= KL_R2_REPRODUCED and rho > 0 and p < KL_ALPHA:
        verdict = REPRODUCED
    else:
        verdict = INCONCLUSIVE
    return _finding("3", claim, paper, measured, verdict, rule, fits=fits, permutation_p=p)


def finding_eaft(agg: dict[str, Any]) -> dict[str, Any]:
    claim = "EAFT keeps SFT's target gain and cuts the prior-skill drop"
    paper = "EAFT: target 69.4 (SFT) vs 69.3 (EAFT); general drop −4.6 vs −1.0 (Qwen3-4B, math)"
    f = GAIN_KEEP_FRACTION
    rule = (f"at the operating points, drop contrast c = drop(eaft) − drop(sft) and gain contrast g = gain(eaft) − "
            f"gain(sft), 95% Welch intervals; margin δ = {f:g} × SFT's mean target gain. Reproduced if c's interval "
            "lies entirely below 0 and g's lower end ≥ −δ (gain kept); not reproduced if c's interval lies entirely "
            "above 0 or g's upper end < −δ (gain clearly lost); otherwise inconclusive; SFT without a positive mean "
            "gain, fewer than 2 seeds, or a method not run → inconclusive")
    scale = agg["scale"]
    gs, why = _groups(agg, ["eaft", "sft"])
    if why:
        return _finding("4", claim, paper, why, INCONCLUSIVE, rule)
    if _missing_metric(gs, "prior_drop") or _missing_metric(gs, "target_gain"):
        return _finding("4", claim, paper, "prior drop or target gain not reported", INCONCLUSIVE, rule)
    c = contrast(_values(gs["eaft"], "prior_drop"), _values(gs["sft"], "prior_drop"))
    g = contrast(_values(gs["eaft"], "target_gain"), _values(gs["sft"], "target_gain"))
    sft_gain = gs["sft"]["stats"]["target_gain"]["mean"]
    delta = f * sft_gain
    measured = (f"gain: {_desc('eaft', gs['eaft'], 'target_gain', scale)} vs "
                f"{_desc('sft', gs['sft'], 'target_gain', scale)}, g = {fmt_ci(g['d'], g['low'], g['high'], scale)} "
                f"(δ = {_num(delta, scale, sign=False)}); drop: "
                f"{fmt_stat(gs['eaft']['stats']['prior_drop'], scale)} vs "
                f"{fmt_stat(gs['sft']['stats']['prior_drop'], scale)}, "
                f"c = {fmt_ci(c['d'], c['low'], c['high'], scale)}")
    few = _few(gs, "prior_drop") or _few(gs, "target_gain")
    if few:
        return _finding("4", claim, paper, f"{measured}; {few}", INCONCLUSIVE, rule, c=c, g=g)
    if sft_gain <= 0:
        return _finding("4", claim, paper, f"{measured}; SFT gained nothing, so 'keeps the gain' is undefined",
                        INCONCLUSIVE, rule, c=c, g=g)
    cut = side(c["low"], c["high"], -1)
    kept = g["low"] >= -delta
    lost = g["high"] < -delta
    if cut == "other" or lost:
        verdict = NOT_REPRODUCED
    elif cut == "paper" and kept:
        verdict = REPRODUCED
    else:
        verdict = INCONCLUSIVE
    return _finding("4", claim, paper, measured, verdict, rule, c=c, g=g, delta=delta)


def finding_on_policy_sft(agg: dict[str, Any]) -> dict[str, Any]:
    claim = "Self-SFT and iterative SFT (on-policy data) sit between SFT and GRPO in prior-skill drop"
    paper = "Retaining: self-SFT on the initial model's correct samples forgets less than SFT; GRPO forgets least"
    rule = ("for each of self_sft and iterative_sft that ran: a = drop(X) − drop(sft) (paper: < 0) and b = drop(X) − "
            "drop(grpo) (paper: > 0), 95% Welch intervals at the operating points; X is reproduced if both intervals "
            "lie on the paper's side of 0, not reproduced if either lies entirely on the other side, else "
            "inconclusive. The finding: not reproduced if any X is; reproduced if every X that ran is; otherwise "
            "inconclusive; sft or grpo not run, neither X run, or fewer than 2 seeds → inconclusive")
    scale = agg["scale"]
    present = [m for m in ("self_sft", "iterative_sft") if group(agg, m) is not None]
    gs, why = _groups(agg, ["sft", "grpo"])
    if why or not present:
        return _finding("5", claim, paper, why or "not run: neither self_sft nor iterative_sft is in the demo",
                        INCONCLUSIVE, rule)
    if _missing_metric(gs, "prior_drop"):
        return _finding("5", claim, paper, "prior drop not reported", INCONCLUSIVE, rule)
    parts, sub, numbers = [], [], {}
    for x in present:
        gx = group(agg, x)
        vals = _values(gx, "prior_drop")
        if not vals:
            parts.append(f"{x}: prior drop not reported")
            sub.append(INCONCLUSIVE)
            continue
        a = contrast(vals, _values(gs["sft"], "prior_drop"))
        b = contrast(vals, _values(gs["grpo"], "prior_drop"))
        numbers[x] = {"vs_sft": a, "vs_grpo": b}
        text = (f"{_desc(x, gx, 'prior_drop', scale)}: − sft = {fmt_ci(a['d'], a['low'], a['high'], scale)}, "
                f"− grpo = {fmt_ci(b['d'], b['low'], b['high'], scale)}")
        few = _few({**gs, x: gx}, "prior_drop")
        if few:
            parts.append(f"{text} ({few})")
            sub.append(INCONCLUSIVE)
            continue
        sides = [side(a["low"], a["high"], -1), side(b["low"], b["high"], +1)]
        v = REPRODUCED if sides == ["paper", "paper"] else NOT_REPRODUCED if "other" in sides else INCONCLUSIVE
        parts.append(f"{text} → {v}")
        sub.append(v)
    missing = [m for m in ("self_sft", "iterative_sft") if m not in present]
    head = (f"prior drop (pts): {_desc('sft', gs['sft'], 'prior_drop', scale)}, "
            f"{_desc('grpo', gs['grpo'], 'prior_drop', scale)}; ")
    measured = head + "; ".join(parts) + (f"; not run: {', '.join(missing)}" if missing else "")
    if NOT_REPRODUCED in sub:
        verdict = NOT_REPRODUCED
    else:
        verdict = REPRODUCED if all(v == REPRODUCED for v in sub) else INCONCLUSIVE
    return _finding("5", claim, paper, measured, verdict, rule, **numbers)


def finding_gpoints_ood(agg: dict[str, Any], column: str = "gpoints@ood") -> dict[str, Any]:
    claim = "GeneralPoints out-of-distribution accuracy (rule shift) falls under SFT and holds or rises under RL"
    paper = "Chu: GeneralPoints OOD, language-only: RL 11.5 → 15.0 (+3.5), SFT → 3.4 (−8.1)"
    metric = f"ood:{column}"
    rule = (f"ood_change[{column}] = final − base accuracy on the OOD split (after the whole sequence), at the "
            "operating points, 95% t-intervals per method and a Welch interval for d = change(grpo) − change(sft); "
            "reproduced if SFT's interval lies entirely below 0, GRPO's interval does not lie entirely below 0, and "
            "d's interval lies entirely above 0; not reproduced if SFT's interval lies entirely above 0, GRPO's "
            "entirely below 0, or d's entirely below 0; otherwise inconclusive; fewer than 2 seeds, a method or "
            "column not run, or a base model at 0 on the column (nothing to fall from) → inconclusive")
    scale = agg["scale"]
    gs, why = _groups(agg, ["sft", "grpo"])
    if why:
        return _finding("6", claim, paper, why, INCONCLUSIVE, rule)
    if _missing_metric(gs, metric):
        return _finding("6", claim, paper, f"not run: no {column} column in the runs", INCONCLUSIVE, rule)
    s, g = gs["sft"]["stats"][metric], gs["grpo"]["stats"][metric]
    d = contrast(g["values"], s["values"])
    base = [v for grp in gs.values() for v in _values(grp, f"ood_base:{column}")]
    if base and max(base) == 0 and min(s["values"], default=0) >= 0:
        return _finding("6", claim, paper, f"the base model scores 0 on {column} in every run (n = {len(base)}), so a "
                        f"fall under SFT cannot be measured; OOD change (pts): {_desc('sft', gs['sft'], metric, scale)}, "
                        f"{_desc('grpo', gs['grpo'], metric, scale)}", INCONCLUSIVE, rule, d=d)
    measured = (f"OOD change (pts): {_desc('sft', gs['sft'], metric, scale)}, "
                f"{_desc('grpo', gs['grpo'], metric, scale)}; "
                f"d = {fmt_ci(d['d'], d['low'], d['high'], scale)}")
    few = _few(gs, metric)
    if few:
        return _finding("6", claim, paper, f"{measured}; {few}", INCONCLUSIVE, rule, d=d)
    sft_side = side(s["low"], s["high"], -1)
    grpo_falls = side(g["low"], g["high"], -1) == "paper"
    d_side = side(d["low"], d["high"], +1)
    if sft_side == "other" or grpo_falls or d_side == "other":
        verdict = NOT_REPRODUCED
    elif sft_side == "paper" and d_side == "paper":
        verdict = REPRODUCED
    else:
        verdict = INCONCLUSIVE
    return _finding("6", claim, paper, measured, verdict, rule, d=d)


def finding_conflicts(agg: dict[str, Any]) -> dict[str, Any]:
    return compare_methods(
        agg, "7", "Masking confident-conflict tokens (low entropy, low p(target)) cuts forgetting vs plain SFT",
        "EAFT: confident conflicts drive forgetting; down-weighting them: general drop −1.0 vs −4.6 (SFT)",
        "prior_drop", "prior drop", "conflict_sft", "sft", -1,
    )


FINDINGS: tuple[Callable[[dict[str, Any]], dict[str, Any]], ...] = (
    finding_rl_forgets_less, finding_prior_drop, finding_kl_predicts, finding_eaft, finding_on_policy_sft,
    finding_gpoints_ood, finding_conflicts,
)


def findings(agg: dict[str, Any]) -> list[dict[str, Any]]:
    """Every finding of SPEC §1, in order 1..7."""
    return [f(agg) for f in FINDINGS]
