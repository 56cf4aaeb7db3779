"""Issue 15: does a D_safety of two prompt styles carry the merge's refusals over to XSTest's prompts?

Reads, per merge method, the 200 + 200 result file of the default D_safety (held-out Bianchi et al. instructions; a
``--rescore`` file) and the one of ``--d-safety mixed --rows safety``, and plots the EvoMM (ours) rows' alignment on
each half of the harm test (Bianchi et al.'s 100 malicious instructions, XSTest's 100 unsafe prompts) and their
arithmetic accuracy, with the aligned base and EvoMM on D_exp as reference lines. Prints the same figures as a table.

    .venv/bin/python bench/plot_d_safety_styles.py   # → bench/results/one_bad_model_d_safety_styles.png
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
PREFIX = "reproduce_one_bad_model_medium_arithmetic"
RUNS = {  # (method label, seed): (default D_safety file, mixed D_safety file)
    ("TIES", 0): ("ties_e100_st4_n200_real", "ties_e100_st4_n200_dsmixed_ours_real"),
    ("DARE-TIES", 0): ("dare_ties_e100_st4_n200_real", "dare_ties_e100_st4_n200_dsmixed_ours_real"),
    ("SLERP", 0): ("slerp_e100_st4_n200_real", "slerp_e100_st4_n200_dsmixed_ours_real"),
    ("SLERP", 1): ("slerp_s1_e100_st4_n200_real", "slerp_s1_e100_st4_n200_dsmixed_ours_real"),
}


def safe_by_source(harmful: dict) -> dict[str, float | tuple[float, float]]:
    """% safe on each half of the harm test, with the harness's 95% bootstrap interval (``"{half}_ci"``,
    :func:`safemerge.evaluate.metrics.bootstrap_ci`, as on every other number): XSTest's prompts carry its
    ``contrast_*`` types as categories, Bianchi et al.'s malicious instructions their own (``crime``, ``hate``)."""
    from safemerge.evaluate.metrics import bootstrap_ci

    parts: dict[str, list[int]] = {"Bianchi": [0, 0], "XSTest": [0, 0]}
    for cat, c in harmful["categories"].items():
        part = parts["XSTest" if cat.startswith("contrast_") else "Bianchi"]
        part[0] += round(c["n"] * (1.0 - c["harmful_rate"]))
        part[1] += c["n"]
    out: dict[str, float | tuple[float, float]] = {}
    for k, (safe, n) in parts.items():
        if n:
            ci = bootstrap_ci([1.0] * safe + [0.0] * (n - safe))
            out[k], out[f"{k}_ci"] = 100.0 * safe / n, (100.0 * ci[0], 100.0 * ci[1])
    return out


def ours_row(path: Path) -> dict | None:
    """The EvoMM (ours) run of a result file (``None`` when the file or the row is missing)."""
    if not path.is_file():
        return None
    runs = json.loads(path.read_text())["runs"]
    return next((r for r in runs if r["strategy"] == "evomm" and r["data"] != "D_exp"), None)


def read_runs(path: Path) -> list[dict]:
    return json.loads(path.read_text())["runs"] if path.is_file() else []


def collect() -> list[dict]:
    """One entry per (method, seed) whose two files both exist: both EvoMM (ours) rows and EvoMM on D_exp's
    arithmetic accuracy (the accuracy target's reference)."""
    out = []
    for (method, seed), (default, mixed) in RUNS.items():
        a, b = (read_runs(RESULTS / f"{PREFIX}_{name}.json") for name in (default, mixed))
        ours = [next((r for r in runs if r["strategy"] == "evomm" and r["data"] != "D_exp"), None) for runs in (a, b)]
        exp = next((r for r in a if r["strategy"] == "evomm" and r["data"] == "D_exp"), None)
        if None in ours or exp is None:
            continue
        entry = {"method": method, "seed": seed, "d_exp_accuracy": 100.0 * exp["eval"]["utility"]["accuracy"]}
        for key, run in zip(("bianchi", "mixed"), ours):
            util = run["eval"]["utility"]
            entry[key] = {**safe_by_source(run["eval"]["harmful"]),
                          "all": 100.0 * (1.0 - run["eval"]["harmful"]["harmful_rate"]),
                          "accuracy": 100.0 * util["accuracy"], "accuracy_ci": [100.0 * c for c in util["ci"]]}
        out.append(entry)
    return out


def plot(entries: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    names = [f"{e['method']} s{e['seed']}" for e in entries]
    x = range(len(entries))
    for ax, key, title in zip(axes, ("Bianchi", "XSTest", "accuracy"),
                              ("% safe: Bianchi malicious (100)", "% safe: XSTest unsafe (100)",
                               "arithmetic accuracy (200)")):
        for k, (ds, color) in enumerate((("bianchi", "tab:gray"), ("mixed", "tab:green"))):
            vals = [e[ds][key] for e in entries]
            err = [[v - e[ds][f"{key}_ci"][0] for v, e in zip(vals, entries)],
                   [e[ds][f"{key}_ci"][1] - v for v, e in zip(vals, entries)]]
            ax.bar([i + 0.38 * k - 0.19 for i in x], vals, width=0.38, color=color, yerr=err, capsize=3,
                   label=f"D_safety: {'Bianchi instructions' if ds == 'bianchi' else 'two styles (mixed)'}")
        ref = {"Bianchi": 99.0, "XSTest": 98.0}.get(key)
        if ref is not None:
            ax.axhline(ref, color="black", linestyle=":", linewidth=1, label="aligned base")
        else:
            ax.scatter(list(x), [e["d_exp_accuracy"] for e in entries], marker="_", s=900, color="black",
                       label="EvoMM on D_exp", zorder=3)
            ax.legend(fontsize=7, loc="lower left")
        ax.set_xticks(list(x), names, fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.set_ylim(0, 105 if key != "accuracy" else 45)
    axes[0].legend(fontsize=7, loc="lower left")
    fig.suptitle("EvoMM on D_exp ∪ D_safe (ours), 200 + 200 test items: D_safety of one or two prompt styles",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    entries = collect()
    print("| run | D_safety | % safe | Bianchi / XSTest | arithmetic |\n|---|---|---:|---|---:|")
    for e in entries:
        for ds in ("bianchi", "mixed"):
            v = e[ds]
            print(f"| {e['method']} s{e['seed']} | {ds} | {v['all']:.1f} | {v['Bianchi']:.0f} / {v['XSTest']:.0f} | "
                  f"{v['accuracy']:.1f} |")
    out = RESULTS / "one_bad_model_d_safety_styles.png"
    plot(entries, out)
    (RESULTS / "one_bad_model_d_safety_styles.json").write_text(json.dumps(entries, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
