"""Paired benchmark ratios, for the benchmark scripts (benches/pgbench.sh, benches/soak.sh):
each ratio is of two targets measured in the same round, minutes apart at most, which
cancels the machine's slow drifts."""
import math
import statistics

# Student's t, two-sided 95%, by degrees of freedom (1-30); beyond 30 the normal 1.96.
T95 = [12.71, 4.30, 3.18, 2.78, 2.57, 2.45, 2.36, 2.31, 2.26, 2.23, 2.20, 2.18, 2.16, 2.14,
       2.13, 2.12, 2.11, 2.10, 2.09, 2.09, 2.08, 2.07, 2.07, 2.06, 2.06, 2.06, 2.05, 2.05,
       2.05, 2.04]


def interval(ratios):
    """95% interval of the geometric mean, from the spread of the log ratios: whether a
    difference is the machine's noise or the proxy's."""
    if len(ratios) < 2:
        return "[-]"
    logs = [math.log(r) for r in ratios]
    t = T95[len(logs) - 2] if len(logs) - 1 <= len(T95) else 1.96
    half = t * statistics.stdev(logs) / math.sqrt(len(logs))
    mean = statistics.fmean(logs)
    return f"[{math.exp(mean - half):.2f}-{math.exp(mean + half):.2f}]"


def summary(ratios):
    """Geometric mean, [95% interval], (lowest-highest)."""
    if not ratios:
        return "-"
    gm = statistics.geometric_mean(ratios)
    return f"{gm:.2f} {interval(ratios)} ({min(ratios):.2f}-{max(ratios):.2f})"
