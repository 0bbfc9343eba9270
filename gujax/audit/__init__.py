"""Empirical privacy audits: membership inference and memorisation measures."""
from gujax.audit.attacks import (MembershipScores, evaluate_attack, lira_offline,
                                 lira_online, logit_scaled_confidence, loss_scores, rmia)
from gujax.audit.metrics import (AttackEvaluation, RocCurve, auc, balanced_accuracy, roc,
                                 tpr_at_fpr)
from gujax.audit.plots import plot_disclosure_vs_attack, plot_roc
from gujax.audit.vulnerability import (DisclosureVsVulnerability,
                                       disclosure_vs_vulnerability,
                                       per_example_vulnerability)
