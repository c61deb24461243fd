"""Optuna tuning (titans_ts.tune, titans_genomics.tune, titans_memory.tuning) on real data.

Tiny models and two short epochs per trial: these tests check the study machinery (storage,
user attributes, pruning, resume after an interruption, parallel workers on one SQLite study,
refit), not the quality of the tuned models.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

optuna = pytest.importorskip("optuna")
pytest.importorskip("optuna_integration")

from titans_memory.errors import ConfigError  # noqa: E402
from titans_memory.tuning import TuneResult, resolve_storage  # noqa: E402
from titans_ts import TitansForecaster, tune  # noqa: E402
from titans_ts.tuning import default_search_space  # noqa: E402

SHARED_DATA = Path(os.environ.get("TITANS_TEST_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
REPO = Path(__file__).resolve().parents[1]
H = 24
BASE = dict(input_size=48, patch_len=8, stride=4, n_layers=1, n_heads=2, memory_depth=1, chunk_size=4, ffn_mult=0,
            dropout=0.0, max_epochs=2, batch_size=32, window_step=6, device="cpu", early_stopping_patience=None)

optuna.logging.set_verbosity(optuna.logging.WARNING)


def small_space(trial):
    return {"d_model": trial.suggest_categorical("d_model", [8, 16]),
            "learning_rate": trial.suggest_float("learning_rate", 1e-3, 1e-2, log=True)}


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    path = SHARED_DATA / "ETT-small" / "ETTh1.csv.gz"
    if not path.is_file():
        pytest.fail(f"real test data not found at {path}; set TITANS_TEST_DATA")
    return pd.read_csv(path, parse_dates=["date"]).iloc[:500][["date", "OT", "HUFL"]]


def _states(study):
    return [t.state for t in study.get_trials(deepcopy=False)]


def test_resolve_storage(tmp_path):
    assert resolve_storage(None) is None
    st = resolve_storage(tmp_path / "sub" / "s.db")
    assert isinstance(st, optuna.storages.RDBStorage) and st.url == f"sqlite:///{(tmp_path / 'sub' / 's.db').resolve()}"
    st2 = resolve_storage(f"sqlite:///{tmp_path / 'u.db'}")
    assert st2.url == f"sqlite:///{tmp_path / 'u.db'}"
    assert resolve_storage(st2) is st2
    with pytest.raises(ConfigError):
        resolve_storage("nosuchdialect://x/y")
    hb = resolve_storage(tmp_path / "hb.db", heartbeat_interval=30)               # dead workers' trials retried
    assert hb.get_heartbeat_interval() == 30


def test_tune_records_trials_and_refits(frame, tmp_path):
    db = tmp_path / "study.db"
    res = tune(frame, h=H, n_trials=2, storage=db, study_name="records", search_space=small_space, val_size=48,
               base_params=BASE)
    assert isinstance(res, TuneResult)
    study, model = res
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 2
    assert res.trials_run == [0, 1]
    for t in study.trials:
        config = t.user_attrs["config"]
        assert set(config) == set(TitansForecaster().get_params(deep=False))      # full config
        assert config["d_model"] == t.params["d_model"] and config["input_size"] == 48 and config["h"] == H
        m = t.user_attrs["metrics"]
        assert m["value"] == pytest.approx(t.value) and m["n_epochs"] == 2 and m["train_seconds"] > 0
        assert len(t.user_attrs["history"]) == 2 and "val_loss" in t.user_attrs["history"][0]
        assert sorted(t.intermediate_values) == [0, 1]                           # reported every epoch
        assert min(t.intermediate_values.values()) == pytest.approx(t.value, rel=1e-5)
    # the refit model: best params, same seed -> the best trial's validation loss again
    assert isinstance(model, TitansForecaster)
    assert model.get_params()["d_model"] == study.best_params["d_model"]
    assert res.best_params["learning_rate"] == pytest.approx(study.best_params["learning_rate"])
    assert model.best_val_loss_ == pytest.approx(study.best_value, rel=1e-4)
    assert len(model.predict()) == 2 * H
    # a standard RDB study: what optuna-dashboard reads
    loaded = optuna.load_study(study_name="records", storage=f"sqlite:///{db}")
    assert len(loaded.trials) == 2 and loaded.best_value == pytest.approx(study.best_value)


def test_pruning_reports_each_epoch(frame):
    # a pruner that prunes every trial at its first report: proves the callback reaches Optuna
    with pytest.warns(RuntimeWarning, match="no trial"):
        res = tune(frame, h=H, n_trials=2, search_space=small_space, val_size=48, base_params=BASE,
                   pruner=optuna.pruners.ThresholdPruner(upper=1e-12))
    study = res.study
    assert _states(study) == [optuna.trial.TrialState.PRUNED] * 2
    assert all(list(t.intermediate_values) == [0] for t in study.trials)
    assert all("params" in t.user_attrs for t in study.trials) and res.estimator is None


class Interrupt(Exception):
    pass


def test_interrupted_study_resumes_without_losing_trials(frame, tmp_path):
    storage = f"sqlite:///{tmp_path / 'resume.db'}"

    def breaking_space(trial):
        if trial.number == 3:
            raise Interrupt("stopped at trial 3")     # after trials 0, 1, 2 completed
        return small_space(trial)

    nop = optuna.pruners.NopPruner()                # every trial runs to COMPLETE
    with pytest.raises(Interrupt):
        tune(frame, h=H, n_trials=5, storage=storage, study_name="resume", search_space=breaking_space,
             val_size=48, base_params=BASE, refit=False, pruner=nop)
    first = optuna.load_study(study_name="resume", storage=storage)
    done = [(t.number, t.params, t.value) for t in first.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 3 and first.trials[3].state == optuna.trial.TrialState.FAIL

    res = tune(frame, h=H, n_trials=5, storage=storage, study_name="resume", search_space=small_space,
               val_size=48, base_params=BASE, refit=False, pruner=nop)
    study = res.study
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 5                                                     # total reaches n_trials
    assert [(t.number, t.params, t.value) for t in complete[:3]] == done          # nothing lost or redone
    assert res.trials_run == [4, 5]
    # seeded per trial number: the resumed trials do not replay the first configurations
    firsts = {json.dumps(p, sort_keys=True) for _, p, _ in done}
    assert all(json.dumps(t.params, sort_keys=True) not in firsts for t in complete[3:])
    # calling again with the study complete runs nothing
    assert tune(frame, h=H, n_trials=5, storage=storage, study_name="resume", search_space=small_space,
                val_size=48, base_params=BASE, refit=False).trials_run == []


WORKER = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    import optuna, pandas as pd
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    from titans_ts import tune
    storage, me, barrier, out, data = sys.argv[1:6]
    frame = pd.read_csv(data, parse_dates=["date"]).iloc[:500][["date", "OT", "HUFL"]]
    Path(barrier, me).touch()
    t0 = time.time()
    while len(list(Path(barrier).iterdir())) < 2 and time.time() - t0 < 120:
        time.sleep(0.05)
    def space(trial):
        return {"d_model": trial.suggest_categorical("d_model", [8, 16]),
                "learning_rate": trial.suggest_float("learning_rate", 1e-3, 1e-2, log=True)}
    base = json.loads(sys.argv[6])
    res = tune(frame, h=24, n_trials=6, storage=storage, study_name="parallel", search_space=space,
               val_size=48, base_params=base, refit=False)
    Path(out).write_text(json.dumps(res.trials_run))
""")


def test_parallel_workers_share_one_sqlite_study(tmp_path):
    """Two processes run the same tune(...) on one SQLite study: no trial lost or duplicated."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    (tmp_path / "barrier").mkdir()
    storage = f"sqlite:///{tmp_path / 'parallel.db'}"
    data = str(SHARED_DATA / "ETT-small" / "ETTh1.csv.gz")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(script), storage, str(i), str(tmp_path / "barrier"),
                               str(tmp_path / f"out{i}.json"), data, json.dumps(BASE)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    for p in procs:
        out, _ = p.communicate(timeout=240)
        assert p.returncode == 0, out[-3000:]
    ran = [json.loads((tmp_path / f"out{i}.json").read_text()) for i in range(2)]
    study = optuna.load_study(study_name="parallel", storage=storage)
    numbers = [t.number for t in study.trials]
    finished = [t for t in study.trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]
    assert len(numbers) == len(set(numbers)) == len(study.trials)                   # unique numbers
    assert sorted(numbers) == list(range(len(numbers)))
    assert not set(ran[0]) & set(ran[1])                                            # no trial run twice
    assert sorted(ran[0] + ran[1]) == sorted(numbers)                               # none lost
    assert all(ran), f"both workers must have run trials, got {ran}"
    assert 6 <= len(finished) <= 6 + 1 and len(finished) == len(numbers)            # at most workers-1 extra
    assert len({t._trial_id for t in study.trials}) == len(study.trials)


def test_default_search_space_is_valid(frame):
    sampler = optuna.samplers.RandomSampler(seed=0)
    study = optuna.create_study(sampler=sampler)
    for _ in range(40):
        trial = study.ask()
        params = default_search_space(48)(trial)
        model = TitansForecaster(h=H, input_size=48, **params)
        model._check_params()
        model._backbone_config()
        assert params["patch_len"] <= 48 and params["stride"] == params["patch_len"] // 2
        study.tell(trial, 0.0)
    # one real trial with the default space
    res = tune(frame, h=H, n_trials=1, val_size=48, refit=False,
               base_params={"input_size": 48, "max_epochs": 1, "batch_size": 64, "window_step": 8, "device": "cpu"})
    assert res.study.trials[0].state == optuna.trial.TrialState.COMPLETE
    assert set(res.study.trials[0].params) >= {"variant", "patch_len", "d_model", "memory_depth", "chunk_size",
                                               "learning_rate"}


def test_tune_rejects_bad_arguments(frame):
    with pytest.raises(ConfigError):
        tune(frame, h=H, n_trials=0)
    with pytest.raises(ConfigError):
        tune(frame, h=H, n_trials=1, val_size=0)
    with pytest.raises(ConfigError):
        tune(frame, h=H, n_trials=1, base_params={"no_such_param": 1})


def test_genomics_tune_same_machinery(tmp_path):
    from titans_genomics import TitansSequenceClassifier
    from titans_genomics import tune as dna_tune

    path = SHARED_DATA / "GUE" / "prom" / "prom_core_tata" / "train.csv.gz"
    if not path.is_file():
        pytest.fail(f"real test data not found at {path}; set TITANS_TEST_DATA")
    df = pd.read_csv(path).sample(160, random_state=0)

    def space(trial):
        return {"d_model": trial.suggest_categorical("d_model", [16, 32]),
                "learning_rate": trial.suggest_float("learning_rate", 1e-3, 1e-2, log=True)}

    base = dict(n_layers=1, n_heads=2, memory_depth=1, chunk_size=16, ffn_mult=0, max_epochs=2, batch_size=32,
                device="cpu", rc_average=False, early_stopping_patience=None, max_length=32)
    db = tmp_path / "dna.db"
    res = dna_tune(df, None, n_trials=2, storage=db, search_space=space, val_size=0.25, base_params=base)
    study, clf = res
    assert study.study_name == "titans_genomics"
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 2
    assert all(sorted(t.intermediate_values) == [0, 1] for t in study.trials)
    assert set(study.trials[0].user_attrs["config"]) == set(TitansSequenceClassifier().get_params(deep=False))
    assert isinstance(clf, TitansSequenceClassifier) and clf.best_val_loss_ == pytest.approx(study.best_value, rel=1e-4)
    assert np.isin(clf.predict(df["sequence"].tolist()[:5]), clf.classes_).all()
