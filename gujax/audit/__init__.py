"""Empirical privacy audits: membership inference and memorisation measures."""
from gujax.audit.attacks import (MembershipScores, evaluate_attack, lira_offline,
                                 lira_online, logit_scaled_confidence, loss_scores, rmia)
from gujax.audit.metrics import (AttackEvaluation, RocCurve, auc, balanced_accuracy, roc,
                                 tpr_at_fpr)
from gujax.audit.plots import plot_disclosure_vs_attack, plot_roc
from gujax.audit.vulnerability import (DisclosureVsVulnerability,
                                       disclosure_vs_vulnerability,
                                       per_example_vulnerability)
from gujax.audit.canaries import (CanaryRun, CanarySet, canary_membership, dirac_canaries,
                                  insert_canaries, make_canaries, mislabelled_canaries,
                                  ood_canaries, train_canary_runs)
from gujax.audit.epsilon import (OneRunBound, attack_auc, best_one_run_epsilon,
                                 epsilon_lower_bound, multi_run_epsilon, one_run_epsilon)
