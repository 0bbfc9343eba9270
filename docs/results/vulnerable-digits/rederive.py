"""Re-derive a vulnerable results folder's canary attack figures from its
saved scores (this folder by default, or the folder given).

    python docs/results/vulnerable-digits/rederive.py
    python docs/results/vulnerable-digits/rederive.py docs/results/vulnerable-cifar

Independent of gujax's metrics: for every arm it reads scores/<arm>.npz,
rebuilds each canary group's score as the mean of its rows' online LiRA
scores, and recomputes per family, pooled over the 64 targets, the TPR at
1% FPR (scikit-learn's ROC, the largest TPR at FPR <= 1%) and the AUC, then
prints the largest disagreement with results.json.
"""
import json
import pathlib
import sys

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve


def main() -> int:
    folder = pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else pathlib.Path(__file__).parent
    results = json.loads((folder / "results.json").read_text())
    worst = 0.0
    for arm in results["arms"]:
        saved = np.load(folder / "scores" / f"{arm['slug']}.npz")
        groups, rows = saved["groups"], saved["row_scores"]
        canary = groups >= 0
        rebuilt = np.stack([rows[:, canary][:, groups[canary] == g].mean(axis=1)
                            for g in range(saved["scores"].shape[1])], axis=1)
        worst = max(worst, float(np.max(np.abs(rebuilt - saved["scores"]))))
        units = [u for u in results["units"] if u["arm"] == arm["arm"]]
        for index, unit in enumerate(units):
            cols = saved["group_family"] == index
            assert cols.sum() == unit["groups"], (arm["arm"], unit["family"])
            s, y = saved["scores"][:, cols].ravel(), saved["is_member"][:, cols].ravel()
            fpr, tpr, _ = roc_curve(y, s)
            tpr1 = float(tpr[fpr <= 0.01].max())
            worst = max(worst, abs(tpr1 - unit["canary_tpr_at_1pct_fpr"]),
                        abs(roc_auc_score(y, s) - unit["canary_auc"]))
    print(f"{len(results['units'])} arm x family units re-derived; "
          f"largest disagreement {worst:.3g}")
    return 0 if worst < 1e-9 else 1


if __name__ == "__main__":
    sys.exit(main())
