"""Re-derive this folder's white-box audit figures from its saved scores.

    python docs/results/audit_whitebox-digits/rederive.py

Independent of experiments.audit_whitebox's code path: for every unit of
results.json it reads scores/<arm>/<family>.npz, applies the guess rule by
hand (guess IN for the top ceil(f m) scores, f in 0.05/0.1/0.2/0.35/0.5, every
score array, Bonferroni over all of them) with the one-run bound of Steinke
et al. (gujax.audit.epsilon.epsilon_lower_bound, held to jax-privacy's in
tests/test_audit_epsilon.py), fits the GDP mu by hand for DP-SGD, and for the
noiseless arms recomputes the Clopper-Pearson lower bound on delta from the
coordinates that moved. Prints the largest disagreement with results.json.
"""
import json
import pathlib
import sys

import numpy as np
from scipy import stats

from gujax.audit.epsilon import epsilon_lower_bound

FRACTIONS = (0.05, 0.1, 0.2, 0.35, 0.5)


def rederive(unit: dict, folder: pathlib.Path, delta: float, confidence: float) -> dict:
    saved = np.load(folder / unit["scores"])
    is_in = saved["is_in"]
    tests = [k for k in saved.files if k.startswith("score_")]
    level = 1 - (1 - confidence) / (len(FRACTIONS) * len(tests))
    best = 0.0
    for name in tests:
        s = saved[name]
        for f in FRACTIONS:
            t = np.sort(s)[::-1][int(np.ceil(f * len(s))) - 1]
            guessed = s >= t
            best = max(best, epsilon_lower_bound(
                int(guessed.sum()), int((guessed & is_in).sum()), num_canaries=len(s),
                delta=delta, confidence=level))
    out = {"eps_one_run": best}
    if unit["kind"] == "dpsgd":
        s = saved[f"score_{unit['gdp_score']}"]
        a, b = s[is_in], s[~is_in]
        out["gdp_mu"] = (a.mean() - b.mean()) / np.sqrt((a.var(ddof=1) + b.var(ddof=1)) / 2)
    else:
        moved = saved["score_sum"] != 0
        assert not moved[~is_in].any(), unit["unit"]
        hits, n = int(moved[is_in].sum()), int(is_in.sum())
        out["delta_lower_bound"] = (stats.beta.ppf(1 - confidence, hits, n - hits + 1)
                                    if hits else 0.0)
    return out


def main() -> int:
    folder = pathlib.Path(__file__).parent
    results = json.loads((folder / "results.json").read_text())
    config = results["config"]
    worst = 0.0
    for unit in results["units"]:
        for key, value in rederive(unit, folder, config["delta"], config["confidence"]).items():
            worst = max(worst, abs(value - unit[key]))
    print(f"{len(results['units'])} units re-derived; largest disagreement {worst:.3g}")
    return 0 if worst < 1e-9 else 1


if __name__ == "__main__":
    sys.exit(main())
