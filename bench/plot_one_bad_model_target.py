"""Issue 15's target, every measured run at once: how far each EvoMM-on-D_exp ∪ D_safe (ours) run lands from it.

Reads every medium-size, real-D_expert result file scored on 200 harmful prompts + 200 problems
(``reproduce_one_bad_model_medium_arithmetic_*_n200_*real.json``) and places each EvoMM (ours) row by its two gaps:
points of alignment below the aligned base (target ≤ 15) and points of arithmetic accuracy below EvoMM on D_exp of
the same method and seed (target ≤ 3; that row is in the same file, run or carried over). The target is the lower-left
box. Error bars: the row's own 95% bootstrap interval shifted by the reference (the reference's own uncertainty is
not added). Colour: the setting (D_safety, α); marker: the merge method. Prints the same figures as a table.

    .venv/bin/python bench/plot_one_bad_model_target.py   # → bench/results/one_bad_model_target.{png,json}
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from safemerge.optimize.report import method_label

RESULTS = Path(__file__).resolve().parent / "results"
PATTERN = "reproduce_one_bad_model_medium_arithmetic_*_n200_*real.json"
MARKERS = {"ties": "s", "dare_ties": "D", "slerp": "o"}


def setting(command: str) -> str:
    """``"D_safety <style>, α <a>[, <n> in L_safety][, <g> blocks per gene][, first <k> tokens][, <n> evaluations]"``
    from the run's recorded command line (the token count and the search budget are named when they are not the first 4
    answer tokens and the 100 evaluations every other run used)."""
    d_safety = re.search(r"--d-safety (\S+)", command)
    alpha = re.search(r"--alpha (\S+)", command)
    n_safety = re.search(r"--n-safety (\S+)", command)
    granularity = re.search(r"--granularity (\S+)", command)
    tokens = re.search(r"--safety-tokens (\S+)", command)
    evals = re.search(r"--max-evals (\S+)", command)
    return (f"D_safety {d_safety.group(1) if d_safety else 'bianchi'}, α {float(alpha.group(1)) if alpha else 0.3:g}"
            + (f", {n_safety.group(1)} in L_safety" if n_safety else "")
            + (f", {granularity.group(1)} blocks per gene" if granularity else "")
            + (f", first {tokens.group(1)} tokens" if tokens and tokens.group(1) != "4" else "")
            + (f", {evals.group(1)} evaluations" if evals and evals.group(1) != "100" else ""))


def collect() -> list[dict]:
    """One entry per EvoMM (ours) row that was run (not carried) in a 200 + 200 file, with both gaps."""
    entries = []
    for path in sorted(RESULTS.glob(PATTERN)):
        result = json.loads(path.read_text())
        aligned = result["models"]["aligned"]["eval"]["harmful"]["harmful_rate"]
        for run in result["runs"]:
            if run["strategy"] != "evomm" or run["data"] == "D_exp" or "carried_from" in run:
                continue
            ref = next((r for r in result["runs"] if r["strategy"] == "evomm" and r["data"] == "D_exp"
                        and r["method"] == run["method"] and r["seed"] == run["seed"]), None)
            if ref is None:
                continue
            harm, util = run["eval"]["harmful"], run["eval"]["utility"]
            ref_acc = 100.0 * ref["eval"]["utility"]["accuracy"]
            below = 100.0 * (harm["harmful_rate"] - aligned)
            gap = ref_acc - 100.0 * util["accuracy"]
            entries.append({
                "file": path.name, "method": run["method"], "seed": run["seed"],
                "setting": setting(result.get("command", "")),
                "safe": 100.0 * (1.0 - harm["harmful_rate"]), "accuracy": 100.0 * util["accuracy"],
                "d_exp_accuracy": ref_acc, "aligned_safe": 100.0 * (1.0 - aligned), "below_base": below,
                "accuracy_gap": gap,
                "below_base_ci": [100.0 * (harm["ci"][0] - aligned), 100.0 * (harm["ci"][1] - aligned)],
                "accuracy_gap_ci": [ref_acc - 100.0 * util["ci"][1], ref_acc - 100.0 * util["ci"][0]],
                "target_met": round(below, 6) <= 15.0 and round(gap, 6) <= 3.0,  # counts of 200: no float noise
            })
    return entries


def plot(entries: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.2, 5.0))
    ax.add_patch(plt.Rectangle((-20, -5), 23, 20, color="tab:green", alpha=0.12, label="target (≤ 3, ≤ 15)"))
    settings = sorted({e["setting"] for e in entries})
    colors = dict(zip(settings, ("tab:gray", "tab:blue", "tab:red", "tab:purple", "tab:orange", "tab:brown",
                                     "tab:pink", "tab:olive", "tab:cyan")))
    for e in entries:
        x, y = e["accuracy_gap"], e["below_base"]
        ax.errorbar(x, y, xerr=[[x - e["accuracy_gap_ci"][0]], [e["accuracy_gap_ci"][1] - x]],
                    yerr=[[y - e["below_base_ci"][0]], [e["below_base_ci"][1] - y]], fmt=MARKERS[e["method"]],
                    color=colors[e["setting"]], ecolor=colors[e["setting"]], elinewidth=0.6, alpha=0.85,
                    markersize=7)
        ax.annotate(f"s{e['seed']}", (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7)
    for s in settings:
        ax.plot([], [], "s", color=colors[s], label=s)
    for m, marker in MARKERS.items():
        ax.plot([], [], marker, color="black", fillstyle="none", label=method_label("evomm", m))
    ax.axvline(3, color="tab:green", linewidth=0.8)
    ax.axhline(15, color="tab:green", linewidth=0.8)
    ax.set_xlim(-12, 24)
    ax.set_ylim(-5, max(45.0, 5.0 + max(e["below_base_ci"][1] for e in entries)))
    ax.set_xlabel("arithmetic: points below EvoMM on D_exp (same method, seed)")
    bases = "/".join(sorted({f"{e['aligned_safe']:.1f}%" for e in entries}))
    ax.set_ylabel(f"% safe: points below the aligned base ({bases})")
    ax.set_title("EvoMM on D_exp ∪ D_safe (ours), medium, 200 + 200 test items", fontsize=10)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    entries = collect()
    print("| method | seed | setting | % safe | below base | arithmetic | EvoMM on D_exp | gap | target |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---|")
    for e in sorted(entries, key=lambda e: (e["method"], e["setting"], e["seed"])):
        print(f"| {method_label('evomm', e['method'])} | {e['seed']} | {e['setting']} | {e['safe']:.1f} | "
              f"{e['below_base']:.1f} | "
              f"{e['accuracy']:.1f} | {e['d_exp_accuracy']:.1f} | {e['accuracy_gap']:.1f} | "
              f"{'met' if e['target_met'] else '–'} |")
    out = RESULTS / "one_bad_model_target.png"
    plot(entries, out)
    (RESULTS / "one_bad_model_target.json").write_text(json.dumps(entries, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
