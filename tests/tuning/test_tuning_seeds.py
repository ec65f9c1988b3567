"""Seeds in the search (``tuning.seeds``): the config key, the trials each searcher makes (a grid dimension for
grid search, `SeedRepeater` behind Optuna), the grouping of the trials back into configurations (mean, std, n)
and the champion rule (best mean; its best seed registered), and how the tables show it. Fast: no Ray cluster,
no training (Tune's own variant generator and searchers run in-process)."""

from __future__ import annotations

import csv
import dataclasses
import pickle
import statistics
from pathlib import Path

import pytest
from ray import tune
from ray.tune.search import Searcher
from ray.tune.search.repeater import TRIAL_INDEX
from ray.tune.search.variant_generator import generate_variants

from pipelines.data.plan import ShardIndex
from pipelines.training.faults import Faults
from pipelines.training.run import Prepared
from retina.typed_config import ConfigError
from tuning import configurations as cf
from tuning import console as tc
from tuning import paper as pp
from tuning import results as res
from tuning import seeds
from tuning.config import TuningConfig, load_search_config, validate_tuning
from tuning.experiment import SearchOutcome, summary
from tuning.space import DIMENSIONS, METRIC
from tuning.trial import TrialSetup, trial_config

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "configs" / "smoke.yaml"
DIMS = [d for d in DIMENSIONS if d.name != "lr"]
GAMMA_ALPHA = [d for d in DIMENSIONS if d.name in ("gamma", "alpha")]
DIVERGED = "NonFiniteLossError: non-finite loss at step 3"


def cfg_with(*overrides: str):
    return load_search_config(SMOKE, list(overrides))


# ------------------------------------------------------------------------------------------------ the config key


def test_seeds_default_to_one_and_must_be_a_positive_integer():
    assert cfg_with().tuning.seeds == 1
    assert cfg_with("tuning.seeds=3").tuning.seeds == 3
    refused = {
        "0": "must be an integer >= 1, got 0",
        "-2": "must be an integer >= 1",
        "2.5": "expected an integer, got 2.5",
        "true": "expected an integer, got True",
    }
    for bad, message in refused.items():
        with pytest.raises(ConfigError, match=f"tuning.seeds: {message}"):
            cfg_with(f"tuning.seeds={bad}")
    with pytest.raises(ConfigError, match="tuning.seeds: must be an integer >= 1, got True"):
        validate_tuning(TuningConfig(seeds=True))  # built in code, past the loader's type check


# ------------------------------------------------------------------------------------------------ the trials


def _trial_configs(cfg, params: list[dict]) -> list:
    run = Prepared(cfg, [], ShardIndex(()), ShardIndex(()))
    setup = TrialSetup(run, "/runs/search/trials", "sqlite:///x.db", "exp", "parent", Faults())
    return [trial_config(setup, p, f"trial_{i:03d}_ab") for i, p in enumerate(params)]


def test_grid_runs_every_point_once_per_seed_with_its_train_seed():
    cfg = cfg_with("tuning.search_alg=grid", "tuning.gamma.values=[0, 2]", "tuning.alpha.values=[0.25, 0.5]",
                   "tuning.prior.kind=fixed", "tuning.seeds=3", "train.seed=10")  # fmt: skip
    assert seeds.seed_values(cfg) == [10, 11, 12]
    assert (seeds.num_configurations(cfg), seeds.num_trials(cfg), seeds.tune_num_samples(cfg)) == (4, 12, 1)
    assert seeds.searcher(cfg) is None  # Tune's own generator expands the grid
    params = [p for _, p in generate_variants(seeds.param_space(cfg))]  # exactly as Tune expands the param_space
    assert len(params) == 12
    assert sorted((p["gamma"], p["alpha"], p["seed"]) for p in params) == [
        (g, a, s) for g in (0.0, 2.0) for a in (0.25, 0.5) for s in (10, 11, 12)
    ]
    # the seed varies slowest: the whole grid with the first seed, then again with the next
    assert [p["seed"] for p in params] == [10] * 4 + [11] * 4 + [12] * 4
    trials = _trial_configs(cfg, params)
    assert [t.train.seed for t in trials] == [p["seed"] for p in params]
    assert [(t.model.loss.gamma, t.model.loss.alpha) for t in trials] == [(p["gamma"], p["alpha"]) for p in params]
    assert cfg.train.seed == 10  # the base config is untouched


def test_one_seed_leaves_the_grid_and_the_trials_as_they_were():
    cfg = cfg_with("tuning.search_alg=grid", "tuning.gamma.values=[0, 2]", "tuning.alpha.kind=fixed",
                   "tuning.prior.kind=fixed", "train.seed=4")  # fmt: skip
    assert seeds.param_space(cfg).keys() == {"gamma"} and seeds.num_trials(cfg) == 2
    [trial] = _trial_configs(cfg, [{"gamma": 2.0}])
    assert trial.train.seed == 4  # the base config's seed


def test_a_seed_grid_would_resample_the_random_dimensions():
    """Why the Optuna searchers do not get a seed grid dimension: Tune's variant generator draws every random
    dimension anew for each grid point, so each seed would train other hyperparameters."""
    space = {"gamma": tune.uniform(0, 5), "seed": tune.grid_search([0, 1])}
    first, second = (p for _, p in generate_variants(space))
    assert (first["seed"], second["seed"]) == (0, 1) and first["gamma"] != second["gamma"]


@pytest.mark.parametrize("alg", ["tpe", "random"])
def test_optuna_suggestions_repeat_once_per_seed(alg):
    cfg = cfg_with(f"tuning.search_alg={alg}", "tuning.seeds=3", "train.seed=5", "tuning.num_samples=2")
    assert (seeds.num_trials(cfg), seeds.tune_num_samples(cfg)) == (6, 6)  # every repeat is one Tune sample
    assert seeds.param_space(cfg) == {}  # Optuna holds the space
    searcher = seeds.searcher(cfg)
    assert isinstance(searcher, seeds.SeedRepeater)
    suggested = []
    for i in range(6):
        params = searcher.suggest(f"t{i}")
        suggested.append(params)
        searcher.on_trial_complete(f"t{i}", {METRIC: 0.1 * i})
    assert [p["seed"] for p in suggested] == [5, 6, 7, 5, 6, 7] and not any(TRIAL_INDEX in p for p in suggested)
    strip = [{k: v for k, v in p.items() if k != "seed"} for p in suggested]
    assert strip[0] == strip[1] == strip[2] and strip[3] == strip[4] == strip[5] and strip[0] != strip[3]
    assert [t.train.seed for t in _trial_configs(cfg, suggested)] == [5, 6, 7, 5, 6, 7]
    assert not isinstance(seeds.searcher(cfg_with(f"tuning.search_alg={alg}")), seeds.SeedRepeater)  # one seed


class Recorder(Searcher):
    """An inner searcher that suggests gamma = 0, 1, 2, ... and records what it is told; saved by pickling."""

    def __init__(self):
        super().__init__(metric=METRIC, mode="max")
        self.count, self.told = 0, []

    def suggest(self, trial_id: str) -> dict:
        self.count += 1
        return {"gamma": float(self.count - 1)}

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        self.told.append((trial_id, result, error))

    def save(self, checkpoint_path: str) -> None:
        Path(checkpoint_path).write_bytes(pickle.dumps((self.count, self.told)))

    def restore(self, checkpoint_path: str) -> None:
        self.count, self.told = pickle.loads(Path(checkpoint_path).read_bytes())


def test_the_searcher_learns_the_mean_of_the_seeds_and_a_wholly_failed_configuration_as_failed():
    inner = Recorder()
    repeater = seeds.SeedRepeater(inner, seeds=3, base_seed=0)
    for i in range(6):
        repeater.suggest(f"t{i}")
    repeater.on_trial_complete("t0", {METRIC: 0.3})
    repeater.on_trial_complete("t2", None, error=True)  # diverged: left out of the mean
    assert inner.told == []  # not before every seed has ended
    repeater.on_trial_complete("t1", {METRIC: 0.5})
    assert inner.told == [("t0", {METRIC: pytest.approx(0.4)}, False)]  # told under the configuration's first trial
    for i in (3, 4, 5):
        repeater.on_trial_complete(f"t{i}", None, error=True)
    assert inner.told[1] == ("t3", None, True)  # no NaN score: a failed trial
    repeater.on_trial_complete("unknown", {METRIC: 0.9})  # a trial it never handed out: ignored


def test_a_restored_repeater_finishes_the_configuration_it_was_handing_out(tmp_path):
    repeater = seeds.SeedRepeater(Recorder(), seeds=3, base_seed=7)
    first = [repeater.suggest(f"t{i}") for i in range(2)]  # two of the three seeds of gamma = 0
    repeater.on_trial_complete("t0", {METRIC: 0.2})
    repeater.save(str(tmp_path / "searcher.pkl"))

    restored = seeds.SeedRepeater(Recorder(), seeds=3, base_seed=7)  # as unpickled from the search's tuner.pkl
    restored.restore(str(tmp_path / "searcher.pkl"))
    assert restored.suggest("t2") == {"gamma": 0.0, "seed": 9}  # the third seed of the same configuration
    assert restored.suggest("t3") == {"gamma": 1.0, "seed": 7}  # then the next suggestion
    restored.on_trial_complete("t1", {METRIC: 0.4})
    restored.on_trial_complete("t2", {METRIC: 0.6})
    assert restored.searcher.told == [("t0", {METRIC: pytest.approx(0.4)}, False)]
    assert [p["seed"] for p in first] == [7, 8]


# ------------------------------------------------------------------------------------------------ configurations


def _row(n: int, params: dict, seed: int | None, ap: float | None, status: str = "completed", **kw) -> res.TrialRow:
    checkpoints = kw.pop("checkpoints", ["c"] if ap is not None else [])
    return res.TrialRow(f"trial_{n:03d}_{n:02x}", f"{n:02x}", params, ap, 2 if ap is not None else 0, status,
                        kw.pop("error", ""), checkpoints, seed=seed, **kw)  # fmt: skip


STEADY = {"gamma": 2.0, "alpha": 0.25, "prior": 0.01}
LUCKY = {"gamma": 1.0, "alpha": 0.5, "prior": 0.01}
SHAKY = {"gamma": 5.0, "alpha": 0.25, "prior": 0.01}
BROKEN = {"gamma": 0.0, "alpha": 0.5, "prior": 0.01}
ROWS = [  # a 4-configuration x 3-seed search, grid order (the seed varies slowest)
    _row(0, STEADY, 0, 0.30, ap50=0.5, ap75=0.3),
    _row(1, LUCKY, 0, 0.40, ap50=0.6, ap75=0.4),  # the best single trial...
    _row(2, SHAKY, 0, None, "diverged", error=DIVERGED),
    _row(3, BROKEN, 0, None, "failed", error="RuntimeError: lost node"),
    _row(4, STEADY, 1, 0.32, ap50=0.52, ap75=0.32),
    _row(5, LUCKY, 1, 0.20, ap50=0.4, ap75=0.2),  # ...in a configuration with a worse mean
    _row(6, SHAKY, 1, 0.25),
    _row(7, BROKEN, 1, None, "diverged", error=DIVERGED),
    _row(8, STEADY, 2, 0.31, ap50=0.51, ap75=0.31),
    _row(9, LUCKY, 2, 0.21, ap50=0.4, ap75=0.2),
    _row(10, SHAKY, 2, 0.10, "stopped"),
    _row(11, BROKEN, 2, None, "stopped"),
]


def test_trials_group_into_configurations_with_mean_std_and_n():
    configs = cf.group(ROWS)
    assert [c.params for c in configs] == [STEADY, LUCKY, SHAKY, BROKEN]  # in order of their first trial
    steady, lucky, shaky, broken = configs
    assert [r.seed for r in steady.trials] == [0, 1, 2]
    assert (steady.n, steady.mean, steady.std) == (3, pytest.approx(0.31), pytest.approx(0.01))
    assert steady.ap50 == pytest.approx(0.51) and steady.ap75 == pytest.approx(0.31)
    assert lucky.mean == pytest.approx(0.27) and lucky.std == pytest.approx(statistics.stdev([0.4, 0.2, 0.21]))
    # a diverged seed is not in n; a seed ASHA stopped is, with its best evaluation before it stopped
    assert (shaky.n, shaky.mean, shaky.std) == (2, pytest.approx(0.175), pytest.approx(statistics.stdev([0.25, 0.1])))
    assert shaky.status == "1 diverged, 1 completed, 1 stopped"
    assert (broken.n, broken.mean, broken.std, broken.best) == (0, None, None, None)
    assert broken.status == "1 failed, 1 diverged, 1 stopped"
    assert [c.params for c in cf.by_mean(configs)] == [STEADY, LUCKY, SHAKY, BROKEN]


def test_the_champion_is_the_best_mean_and_its_best_seed_is_registered():
    best_single = max((r for r in ROWS if r.best_ap is not None), key=lambda r: r.best_ap)
    assert best_single.params == LUCKY  # the best trial is not in the best configuration
    champion = cf.champion(cf.group(ROWS))
    assert champion.params == STEADY and champion.mean == pytest.approx(0.31)
    assert champion.best.name == "trial_004_04" and champion.best.seed == 1  # STEADY's best seed: 0.32
    # a configuration without a checkpoint to register cannot be the champion, whatever its mean
    no_model = [_row(20, {"gamma": 3.0, "alpha": 0.5, "prior": 0.01}, s, 0.9, checkpoints=[]) for s in (0, 1)]
    assert cf.champion(cf.group([*ROWS, *no_model])).params == STEADY
    assert cf.champion(cf.group(ROWS[3::4])) is None  # nothing evaluated without failing


def test_one_seed_is_one_trial_per_configuration_and_a_seed_that_ran_twice_counts_once():
    single = [_row(0, STEADY, None, 0.3), _row(1, LUCKY, None, 0.35)]
    configs = cf.group(single)
    assert [(c.n, c.mean, c.std) for c in configs] == [(1, 0.3, None), (1, 0.35, None)]  # no spread from one seed
    assert cf.champion(configs).best.name == "trial_001_01"  # the best trial, as before seeds existed
    rerun = cf.group([*ROWS[:4], _row(12, STEADY, 0, 0.28), _row(13, STEADY, 0, None, "diverged", error=DIVERGED)])
    assert rerun[0].n == 1 and rerun[0].mean == pytest.approx(0.30) and len(rerun[0].trials) == 3


def test_configuration_table_and_csv(tmp_path):
    configs = cf.by_mean(cf.group(ROWS))
    lines = cf.format_table(configs, DIMS).splitlines()
    assert lines[0].split() == ["gamma", "alpha", "prior", "mean", "val/AP", "std", "n", "best", "seed", "trials",
                                "status"]  # fmt: skip
    assert lines[2].split() == ["2.0000", "0.2500", "0.0100", "0.3100", "0.0100", "3", "1", "000,004,008", "completed"]
    assert lines[5].split()[3:7] == ["-", "-", "0", "-"]  # no seed evaluated: no mean, no spread, no best seed
    one = cf.format_table(cf.group([_row(0, STEADY, None, 0.3)]), DIMS).splitlines()[2].split()
    assert one[3:6] == ["0.3000", "-", "1"]  # n = 1: the std is undefined, shown as "-"
    assert cf.mean_text(configs[0]) == "0.3100 ± 0.0100 (n=3)"

    with cf.write_csv(configs, DIMS, tmp_path / "configurations.csv").open() as f:
        table = list(csv.DictReader(f))
    assert float(table[0]["mean_val_AP"]) == pytest.approx(0.31)
    assert float(table[0]["std_val_AP"]) == pytest.approx(0.01)
    assert (table[0]["n"], table[0]["best_trial"], table[0]["best_seed"]) == ("3", "trial_004_04", "1")
    assert table[3]["mean_val_AP"] == "" and table[3]["std_val_AP"] == "" and table[3]["n"] == "0"


def test_trial_table_and_lines_show_the_seed_only_when_the_search_has_several():
    seeded = res.format_table(res.by_ap(ROWS), DIMS).splitlines()
    assert seeded[0].split()[:5] == ["trial", "gamma", "alpha", "prior", "seed"]
    assert seeded[2].split()[:6] == ["trial_001_01", "1.0000", "0.5000", "0.0100", "0", "0.4000"]
    plain = res.format_table([_row(0, STEADY, None, 0.3)], DIMS).splitlines()[0].split()
    assert "seed" not in plain
    line = tc.trial_line(ROWS[4], ["gamma", "alpha", "prior"])
    assert "gamma=2 alpha=0.25 prior=0.01 seed=1  val/AP 0.3200" in line
    assert "seed" not in tc.trial_line(_row(0, STEADY, None, 0.3), ["gamma"])


def test_trial_lines_read_the_seed_from_the_trial_config(caplog):
    class Trial:
        trial_id, config, last_result, metric_analysis = "ab", {"gamma": 2.0, "seed": 3}, {}, {}

        def __str__(self) -> str:
            return "trial_004_ab"

    row = tc.TrialLines(["gamma"], {"gamma": 1.0}, "runs/x").row(Trial(), "completed", "")
    assert (row.params, row.seed) == ({"gamma": 2.0}, 3)


def test_summary_names_the_best_configuration_and_its_registered_seed():
    configs = cf.group(ROWS)
    champion = cf.champion(configs)
    outcome = SearchOutcome("runs/s", "abc", "sqlite:////tmp/x.db", ROWS, res.format_table(res.by_ap(ROWS), DIMS),
                            champion.best, "r1", None, None, False, 10.0, "", "exp", "1", champion,
                            cf.format_table(cf.by_mean(configs), DIMS))  # fmt: skip
    text = summary(outcome)
    lines = text.splitlines()
    assert lines[2].split()[:4] == ["gamma", "alpha", "prior", "mean"]  # the configurations first, best mean first
    assert "best configuration:      gamma=2 alpha=0.25 prior=0.01: mean val/AP=0.3100 ± 0.0100 (n=3), the highest " \
           "mean; its best seed's model is registered" in text  # fmt: skip
    assert "its best seed:           trial_004_04 (seed=1) val/AP=0.3200 AP50=0.5200" in text


# ------------------------------------------------------------------------------------------------ the paper's layout


def _study(rows: list[res.TrialRow]) -> list[res.TrialRow]:
    """The same trials as a γ × α grid (π fixed, so not among the trial's params)."""
    return [dataclasses.replace(r, params={k: v for k, v in r.params.items() if k != "prior"}) for r in rows]


def test_paper_table_cells_are_means_over_seeds(tmp_path):
    rows = _study(ROWS)
    lines = pp.format_paper_table(rows, GAMMA_ALPHA).splitlines()
    assert "mean ± std" in lines[0]
    grid = {line.split("|")[0].strip(): [c.strip() for c in line.split("|")[1:]] for line in lines[4:8]}
    assert grid["2"] == ["31.0 ± 1.0 / 51.0 / 31.0 (n=3)", ""]
    assert grid["5"][0] == "17.5 ± 10.6 / - / - (n=2; 1 diverged, 1 completed, 1 stopped)"
    assert grid["0"] == ["", "1 failed, 1 diverged, 1 stopped"]
    assert [c.strip() for c in lines[9].split("|")][:4] == ["trial", "gamma", "alpha", "seed"]  # per trial: its seed

    with pp.write_paper_csv(rows, GAMMA_ALPHA, tmp_path / "paper.csv").open() as f:
        table = {r["gamma"]: r for r in csv.DictReader(f)}
    cell = {k.removeprefix("alpha=0.25 "): v for k, v in table["2.0"].items() if k.startswith("alpha=0.25")}
    assert float(cell["AP"]) == pytest.approx(0.31) and float(cell["AP std"]) == pytest.approx(0.01)
    assert (cell["n"], cell["status"]) == ("3", "completed")

    ax = pp.heatmap(rows, GAMMA_ALPHA).get_axes()[0]
    assert ax.get_images()[0].get_array()[2, 0] == pytest.approx(31.0)  # rows γ = 0, 1, 2, 5
    assert "31.0 ± 1.0\nn=3" in {t.get_text() for t in ax.texts}


def test_paper_table_with_one_seed_is_as_before():
    rows = _study([_row(0, STEADY, None, 0.34, ap50=0.525, ap75=0.365)])
    lines = pp.format_paper_table(rows, GAMMA_ALPHA).splitlines()
    assert "mean" not in lines[0] and lines[4].split("|")[1].strip() == "34.0 / 52.5 / 36.5"
