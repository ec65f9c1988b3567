"""The trials of a search grouped back into configurations (the same γ, α, π (, lr), one trial per seed:
`tuning.seeds`), each with the mean, standard deviation and number n of its seeds' val/AP, and the champion
rule: the configuration with the best mean wins, and its best seed's model is the one registered.

A seed's val/AP is its trial's best evaluation (the number the trial table shows, and the checkpoint a trial
keeps), counted when the trial finished in Tune's sense: it ran to its end, or ASHA stopped it. A seed that
diverged or failed is not in n (its configuration's status says so). With one seed per configuration, each
configuration is one trial and the champion is the best trial, as before seeds existed.
"""

from __future__ import annotations

import csv
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from tuning import results as res
from tuning.space import METRIC, Dimension


@dataclass
class Configuration:
    params: dict[str, float]  # the searched hyperparameters
    trials: list[res.TrialRow]  # every trial of these hyperparameters, in creation order

    @property
    def seeded(self) -> list[res.TrialRow]:
        """One trial per seed, the one that counts: a seed that ran twice (a search resumed with --resume-errored,
        or TPE suggesting the same choice twice) keeps its best evaluated trial, else its latest."""
        kept: dict[int | None, res.TrialRow] = {}
        for r in self.trials:
            old = kept.get(r.seed)
            if old is None or _score(r) >= _score(old):
                kept[r.seed] = r
        return list(kept.values())

    @property
    def scored(self) -> list[res.TrialRow]:
        """The seeds in the statistics: evaluated and not failed (completed, or stopped early by ASHA)."""
        return [r for r in self.seeded if r.best_ap is not None and not r.failed]

    @property
    def n(self) -> int:
        return len(self.scored)

    @property
    def mean(self) -> float | None:
        return _mean([r.best_ap for r in self.scored])

    @property
    def std(self) -> float | None:
        """Sample standard deviation (n - 1) of the seeds' val/AP; None below two seeds (undefined, not 0)."""
        aps = [r.best_ap for r in self.scored if r.best_ap is not None]
        return statistics.stdev(aps) if len(aps) >= 2 else None

    @property
    def ap50(self) -> float | None:
        """Mean AP50 (and AP75) over the seeds that have one: each seed's at its best evaluation."""
        return _mean([r.ap50 for r in self.scored])

    @property
    def ap75(self) -> float | None:
        return _mean([r.ap75 for r in self.scored])

    @property
    def best(self) -> res.TrialRow | None:
        """The seed whose model stands for this configuration: the best val/AP among those with a checkpoint."""
        candidates = [r for r in self.scored if r.checkpoints]
        return max(candidates, key=lambda r: r.best_ap or 0.0, default=None)

    @property
    def status(self) -> str:
        """How its trials ended: one word when they agree ("completed", "diverged"), else the counts
        ("2 completed, 1 diverged")."""
        states = [r.status for r in self.seeded]
        if len(set(states)) == 1:
            return states[0]
        counts: dict[str, int] = {}
        for s in states:
            counts[s] = counts.get(s, 0) + 1
        return ", ".join(f"{k} {s}" for s, k in counts.items())


def _score(r: res.TrialRow) -> float:
    return -1.0 if r.best_ap is None else r.best_ap


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.fmean(present) if present else None


def group(rows: list[res.TrialRow], dims: list[Dimension] | None = None) -> list[Configuration]:
    """The configurations of these trials in order of their first trial; keyed by `dims` (all the trial's params
    when None), so a trial lacking one of them is left out."""
    found: dict[tuple[tuple[str, float], ...], Configuration] = {}
    for r in rows:
        names = list(r.params) if dims is None else [d.name for d in dims]
        if any(n not in r.params for n in names):
            continue
        key = tuple((n, r.params[n]) for n in sorted(names))
        if key not in found:
            found[key] = Configuration({n: r.params[n] for n in names}, [])
        found[key].trials.append(r)
    return list(found.values())


def by_mean(configs: list[Configuration]) -> list[Configuration]:
    """Best mean val/AP first; configurations without one last (each group in order of their first trial)."""
    return sorted(configs, key=lambda c: (c.mean is None, -(c.mean or 0.0)))


def champion(configs: list[Configuration]) -> Configuration | None:
    """The configuration with the best mean val/AP among those with a model to register (ties: first)."""
    candidates = [c for c in configs if c.mean is not None and c.best is not None]
    return max(candidates, key=lambda c: c.mean or 0.0, default=None)


# ------------------------------------------------------------------------------------------------ table


def fmt_ap(v: float | None) -> str:
    """A val/AP (or its standard deviation) in the console's 4 decimals; "-" where there is none."""
    return "-" if v is None or math.isnan(v) else f"{v:.4f}"


def mean_text(c: Configuration) -> str:
    """The mean with its spread and how many seeds it covers, "0.3100 ± 0.0120 (n=3)" (std "-" below two)."""
    return f"{fmt_ap(c.mean)} ± {fmt_ap(c.std)} (n={c.n})"


def _trial_numbers(c: Configuration) -> str:
    return ",".join(r.name.split("_")[1] for r in c.trials)


def format_table(configs: list[Configuration], dims: list[Dimension]) -> str:
    """One line per configuration in the order given (`by_mean` for the best first): its hyperparameters, mean,
    std and n of its seeds' val/AP, its best seed, its trials' numbers and how they ended."""
    header = [*[d.name for d in dims], f"mean {METRIC}", "std", "n", "best seed", "trials", "status"]
    body = []
    for c in configs:
        best = c.best
        best_seed = "-" if best is None or best.seed is None else str(best.seed)
        body.append([*[res.fmt(c.params.get(d.name)) for d in dims], fmt_ap(c.mean), fmt_ap(c.std), str(c.n),
                     best_seed, _trial_numbers(c), c.status])  # fmt: skip
    return res.fixed_width(header, body)


def write_csv(configs: list[Configuration], dims: list[Dimension], path: str | Path) -> Path:
    """The configurations as CSV, full precision (empty cell: undefined, e.g. the std of a single seed)."""
    path = Path(path)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow([*[d.name for d in dims], "mean_val_AP", "std_val_AP", "n", "mean_val_AP50", "mean_val_AP75",
                    "best_trial", "best_seed", "trials", "status"])  # fmt: skip
        for c in configs:
            best = c.best
            w.writerow([*[c.params.get(d.name, "") for d in dims], _blank(c.mean), _blank(c.std), c.n,
                        _blank(c.ap50), _blank(c.ap75), "" if best is None else best.name,
                        "" if best is None or best.seed is None else best.seed, " ".join(r.name for r in c.trials),
                        c.status])  # fmt: skip
    return path


def _blank(v: float | None) -> float | str:
    return "" if v is None else v
