"""The one rule for a registered model's alias (``tracking.alias``, e.g. ``champion``), for training and search.

A new version takes the alias only when its val/AP is at least ``tracking.alias_min_ap`` and strictly better than
the version the alias points to now (compared at the 4 decimals of that version's ``val_AP`` tag, so a model
retrained to the same score does not take it). So ``models:/<name>@<alias>`` only ever moves to a better model,
whichever command registered it, and a consumer never sees it missing (one call moves it). A version aliased by
hand without a ``val_AP`` tag cannot be beaten by proof: the alias stays until someone removes it.

Every decision is kept as tags (`ChampionDecision.tags`) on the run that made it: the training run, or the
search's parent run.
"""

from __future__ import annotations

from dataclasses import dataclass

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipelines.names import CHAMPION_TAG_PREFIX, VERSION_VAL_AP_TAG


@dataclass(frozen=True)
class ChampionDecision:
    alias: str
    candidate_version: str
    candidate_ap: float
    previous_version: str | None  # the version the alias pointed to before (None: no champion yet)
    previous_ap: float | None
    moved: bool
    reason: str

    def tags(self) -> dict[str, str]:
        """The decision as run tags (the comparison stays on record next to the run that made it)."""
        return {
            CHAMPION_TAG_PREFIX + "alias": self.alias,
            CHAMPION_TAG_PREFIX + "candidate_version": self.candidate_version,
            CHAMPION_TAG_PREFIX + "candidate_val_AP": f"{self.candidate_ap:.4f}",
            CHAMPION_TAG_PREFIX + "previous_version": self.previous_version or "none",
            CHAMPION_TAG_PREFIX + "previous_val_AP": "none" if self.previous_ap is None else f"{self.previous_ap:.4f}",
            CHAMPION_TAG_PREFIX + "moved": str(self.moved).lower(),
            CHAMPION_TAG_PREFIX + "reason": self.reason,
        }

    @property
    def holder(self) -> str | None:
        """The version the alias points to after the decision (None: no version has it)."""
        return self.candidate_version if self.moved else self.previous_version

    def summary(self) -> str:
        verb = "moved to" if self.moved else "stays on"
        return f"alias '{self.alias}' {verb} version {self.holder or '-'}: {self.reason}"


def promote_if_better(
    client: MlflowClient, name: str, alias: str, version: str, val_ap: float, min_ap: float = 0.0
) -> ChampionDecision:
    """Point `alias` at `version` of registered model `name` if the rule above lets it; the decision either way."""
    try:
        current = client.get_model_version_by_alias(name, alias)
    except MlflowException:
        current = None
    version = str(version)
    if current is not None and str(current.version) == version:
        return ChampionDecision(alias, version, val_ap, version, val_ap, False, "already the champion")
    previous_ap = None
    if current is not None and VERSION_VAL_AP_TAG in (current.tags or {}):
        previous_ap = float(current.tags[VERSION_VAL_AP_TAG])
    candidate = round(val_ap, 4)  # the champion's tag precision; the minimum is checked on the exact value
    prev_version = str(current.version) if current is not None else None
    if val_ap < min_ap:
        moved, reason = False, f"val/AP {val_ap:.6g} < tracking.alias_min_ap {min_ap:.6g}"
    elif current is None:
        moved, reason = True, f"no '{alias}' yet; val/AP {candidate:.4f}"
    elif previous_ap is None:
        moved, reason = (
            False,
            f"the current champion (version {prev_version}) has no {VERSION_VAL_AP_TAG} tag to compare",
        )
    elif candidate > previous_ap:
        moved, reason = True, f"val/AP {candidate:.4f} > champion's {previous_ap:.4f} (version {prev_version})"
    else:
        moved, reason = False, f"val/AP {candidate:.4f} <= champion's {previous_ap:.4f} (version {prev_version})"
    if moved:
        client.set_registered_model_alias(name, alias, version)
    return ChampionDecision(alias, version, val_ap, prev_version, previous_ap, moved, reason)
