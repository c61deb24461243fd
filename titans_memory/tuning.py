"""Optuna hyper-parameter studies for every estimator of the library (the one place they run).

:func:`titans_ts.tune` (forecasting) and :func:`titans_genomics.tune` (DNA classification) are thin
wrappers: each hands :func:`run_tuning` an *estimator factory* (``params -> estimator``), a *fit
function* (``(estimator, lightning_callbacks) -> None``) and a *search space*
(``trial -> params``). This module supplies the rest:

- **Storage**: ``storage=None`` keeps the study in memory; a file path (``"study.db"``) becomes
  the SQLite URL ``sqlite:///<absolute path>``; any SQLAlchemy URL is used as is, e.g.
  ``postgresql+psycopg2://user:password@host:5432/db`` for a cluster (every worker, on any node,
  points at the same database); an ``optuna.storages.BaseStorage`` object is used unchanged.
  Studies in an RDB storage are what ``optuna-dashboard`` reads: ``optuna-dashboard
  sqlite:///study.db``.
- **Resume**: ``load_if_exists=True`` (default) loads the study of the same name; ``n_trials`` is
  the number of *finished* trials (COMPLETE or PRUNED) the study should hold, so an interrupted
  study (exception, Ctrl-C, killed job) is resumed by calling the same function again: the
  finished trials are kept and only the missing ones run. A trial interrupted mid-way is marked
  FAIL (or, after a hard kill, stays RUNNING unless ``heartbeat_interval`` is set, in which case
  it is failed after the grace period and re-queued with its parameters,
  ``RetryHeartbeatStaleTrialCallback``).
- **Parallel workers**: start the same call in several processes (one per GPU with
  ``CUDA_VISIBLE_DEVICES=i``, or on several nodes with a PostgreSQL URL); they share the study
  through the storage, every trial number is unique (the storage assigns it) and they stop
  together once the study holds ``n_trials`` finished trials (``optuna.study.MaxTrialsCallback``;
  trials already running when the limit is reached still finish, so the study may end with up to
  ``workers - 1`` extra trials). SQLite suits one machine; use PostgreSQL (or MySQL) across nodes.
  No scheduler of our own: Optuna's storage coordinates the workers.
- **Sampler**: TPE, seeded per *trial number* (``seed`` and the trial number determine the random
  draws), so a resumed study does not repeat the configurations of its first trials and parallel
  workers with the same ``seed`` do not propose the same ones.
- **Pruning**: each trial trains with optuna-integration's ``PyTorchLightningPruningCallback``
  (passed through the estimator's ``fit(callbacks=...)`` to
  :func:`titans_memory.training.fit_module`), which reports the validation loss after every epoch
  and stops unpromising trials (default pruner: ``MedianPruner(n_startup_trials=3,
  n_warmup_steps=1)``).
- **Records**: each trial's user attributes hold ``params`` (the estimator's constructor
  arguments), ``config`` (every parameter of the estimator, defaults included) and, once trained,
  ``metrics`` (best validation loss, epochs, training seconds) and ``history`` (per-epoch losses).
"""

from __future__ import annotations

import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np

from .errors import ConfigError

__all__ = [
    "TuneResult", "create_study", "finished_trials", "jsonable", "pruning_callback", "resolve_storage",
    "run_tuning", "seeded_sampler",
]

SearchSpace = Callable[[Any], Dict[str, Any]]
FINISHED_STATES = ("COMPLETE", "PRUNED")


def _optuna():
    try:
        import optuna
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise ImportError("tuning needs optuna: pip install optuna optuna-integration") from exc
    return optuna


# ----------------------------------------------------------------------------------------------
# storage and study
def resolve_storage(storage: Union[None, str, os.PathLike, Any], heartbeat_interval: Optional[int] = None,
                    retries: int = 5):
    """``None`` -> ``None`` (in memory); a ``BaseStorage`` -> itself; a URL (``"dialect://..."``)
    or a file path (-> ``sqlite:///<absolute path>``) -> an ``optuna.storages.RDBStorage``.

    SQLite connections wait up to 60 s for a lock (several processes share the file); with
    ``heartbeat_interval`` (seconds) trials whose process died are failed after twice that
    period and retried (at most 3 times).
    """
    optuna = _optuna()
    if storage is None or isinstance(storage, optuna.storages.BaseStorage):
        return storage
    text = os.fspath(storage) if isinstance(storage, os.PathLike) else str(storage)
    if "://" in text:
        url = text
    else:
        path = Path(text).expanduser().resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        url = f"sqlite:///{path}"
    kwargs: Dict[str, Any] = {}
    if url.startswith("sqlite"):
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 60}}
    if heartbeat_interval:
        kwargs.update(heartbeat_interval=int(heartbeat_interval), grace_period=2 * int(heartbeat_interval))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            if hasattr(optuna.storages, "RetryHeartbeatStaleTrialCallback"):  # optuna >= 4.9
                kwargs["heartbeat_stale_trial_callback"] = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3)
            else:
                kwargs["failed_trial_callback"] = optuna.storages.RetryFailedTrialCallback(max_retry=3)
    last: Optional[Exception] = None
    for attempt in range(max(1, retries)):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(url, **kwargs)
        except Exception as exc:
            last = exc
            # a database error (e.g. another worker creating the schema at the same moment,
            # a locked SQLite file) is retried; anything else (bad URL, missing driver) is not
            try:
                from sqlalchemy.exc import DBAPIError
            except ImportError:  # pragma: no cover - optuna's RDB storage needs sqlalchemy
                DBAPIError = ()  # type: ignore[assignment]
            if not isinstance(exc, DBAPIError):
                break
            time.sleep(0.5 * (attempt + 1))
    raise ConfigError(f"cannot open the Optuna storage {url!r}: {last}") from last


def seeded_sampler(seed: Optional[int] = 0, **tpe_kwargs):
    """A ``TPESampler`` whose random draws for trial ``n`` are seeded with ``(seed, n)``.

    Plain ``TPESampler(seed=s)`` restarts its random stream in every process, so a resumed study
    or a second worker would propose again the first configurations; seeding by trial number
    keeps runs reproducible and the proposals distinct. ``seed=None``: not seeded.
    """
    optuna = _optuna()

    class TrialSeededTPESampler(optuna.samplers.TPESampler):
        def before_trial(self, study, trial):
            if seed is not None:
                s = (int(seed) * 1_000_003 + int(trial.number)) % (2**32 - 1)
                try:
                    self._rng.rng.seed(s)
                    self._random_sampler._rng.rng.seed((s + 1) % (2**32 - 1))
                except AttributeError:  # pragma: no cover - other optuna internals: stay seeded once
                    pass
            super().before_trial(study, trial)

    return TrialSeededTPESampler(seed=seed, **tpe_kwargs)


def create_study(study_name: Optional[str] = None, storage: Any = None, sampler: Any = None, pruner: Any = None,
                 direction: str = "minimize", load_if_exists: bool = True, seed: Optional[int] = 0,
                 heartbeat_interval: Optional[int] = None):
    """``optuna.create_study`` with the library's defaults (see the module docstring): storage
    resolved by :func:`resolve_storage`, TPE seeded per trial (:func:`seeded_sampler`),
    ``MedianPruner(n_startup_trials=3, n_warmup_steps=1)``. Concurrent creation by several
    workers is safe (``load_if_exists``)."""
    optuna = _optuna()
    storage = resolve_storage(storage, heartbeat_interval)
    sampler = sampler if sampler is not None else seeded_sampler(seed)
    pruner = pruner if pruner is not None else optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1)
    last: Optional[Exception] = None
    for attempt in range(5):
        try:
            return optuna.create_study(storage=storage, sampler=sampler, pruner=pruner, study_name=study_name,
                                       direction=direction, load_if_exists=load_if_exists)
        except optuna.exceptions.DuplicatedStudyError:
            raise
        except Exception as exc:  # a concurrent first insert of the same study: load it
            last = exc
            if storage is None or not load_if_exists:
                raise
            time.sleep(0.5 * (attempt + 1))
    raise ConfigError(f"cannot create or load the study {study_name!r}: {last}") from last


def finished_trials(study) -> int:
    """Number of COMPLETE or PRUNED trials of ``study``."""
    optuna = _optuna()
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return len(study.get_trials(deepcopy=False, states=states))


def pruning_callback(trial, monitor: str = "val_loss"):
    """optuna-integration's Lightning pruning callback: reports ``monitor`` after every validation
    epoch and raises ``optuna.TrialPruned`` when the pruner says so."""
    from optuna_integration import PyTorchLightningPruningCallback

    return PyTorchLightningPruningCallback(trial, monitor=monitor)


def jsonable(value: Any) -> Any:
    """``value`` as JSON-encodable data (numpy scalars to numbers, tuples to lists, other objects
    to their ``repr``); non-finite floats become ``None``."""
    if isinstance(value, (bool, str)) or value is None:
        return value
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(float(value)) else None
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, np.ndarray)):
        return [jsonable(v) for v in (value.tolist() if isinstance(value, np.ndarray) else value)]
    return repr(value)


# ----------------------------------------------------------------------------------------------
@dataclass
class TuneResult:
    """What the ``tune`` functions return. Unpacks as ``study, estimator = tune(...)``.

    Attributes:
        study: the ``optuna.Study`` (all trials, of every worker and earlier run).
        estimator: the estimator refit on all the data with the best parameters (``None`` with
            ``refit=False`` or when no trial completed).
        best_params: constructor arguments of the best trial (base parameters included).
        best_value: its objective value.
        trials_run: numbers of the trials this call ran (other workers' trials excluded).
    """

    study: Any
    estimator: Any = None
    best_params: Dict[str, Any] = field(default_factory=dict)
    best_value: float = float("nan")
    trials_run: List[int] = field(default_factory=list)

    def __iter__(self):
        return iter((self.study, self.estimator))


def history_score(estimator: Any, metric: str, direction: str = "minimize") -> float:
    """The objective of a fitted estimator: ``best_val_loss_`` for ``"val_loss"``, else the best
    epoch value of ``metric`` in ``estimator.history_``."""
    if metric == "val_loss":
        value = float(getattr(estimator, "best_val_loss_", float("nan")))
        if math.isfinite(value):
            return value
    values = [float(row[metric]) for row in getattr(estimator, "history_", []) if metric in row]
    values = [v for v in values if math.isfinite(v)]
    if not values:
        raise ConfigError(
            f"the fitted estimator reported no finite {metric!r}; tuning on the validation loss needs "
            "validation data (set val_size > 0, or pass validation data)"
        )
    return min(values) if direction == "minimize" else max(values)


def run_tuning(
    make_estimator: Callable[[Dict[str, Any]], Any],
    fit: Callable[[Any, List[Any]], Any],
    search_space: SearchSpace,
    n_trials: int,
    *,
    storage: Any = None,
    study_name: Optional[str] = None,
    default_study_name: str = "titans",
    pruner: Any = None,
    sampler: Any = None,
    seed: Optional[int] = 0,
    timeout: Optional[float] = None,
    metric: Union[str, Callable[[Any], float]] = "val_loss",
    direction: str = "minimize",
    load_if_exists: bool = True,
    n_jobs: int = 1,
    base_params: Optional[Mapping[str, Any]] = None,
    refit: bool = True,
    study_callbacks: Sequence[Callable] = (),
    heartbeat_interval: Optional[int] = None,
    catch: Sequence[type] = (),
) -> TuneResult:
    """Run (or resume, or join) a study and optionally refit the best configuration.

    Args:
        make_estimator: ``params -> estimator`` (an unfitted estimator with ``get_params``).
        fit: ``fit(estimator, lightning_callbacks)``: trains it on the tuning data, passing the
            callbacks to :func:`~titans_memory.training.fit_module`.
        search_space: ``trial -> params`` (Optuna ``trial.suggest_*`` calls); its parameters
            override ``base_params``.
        n_trials: finished (COMPLETE or PRUNED) trials the study should hold.
        storage, study_name: see the module docstring; with a storage and no name the study is
            called ``default_study_name`` (a stable name, so that it can be resumed).
        pruner, sampler, seed: Optuna pruner and sampler (defaults: see :func:`create_study`).
        timeout: stop starting new trials after this many seconds.
        metric: the objective, ``"val_loss"`` (best validation loss, default), another key of the
            estimator's per-epoch ``history_``, or a callable ``fitted estimator -> float``. A
            string metric logged every epoch (``val_loss``, ``train_loss``) is the one pruning
            watches; otherwise pruning watches ``val_loss``.
        direction: ``"minimize"`` or ``"maximize"``.
        load_if_exists: resume / join a study of the same name.
        n_jobs: trials run in parallel threads of this process (prefer several processes).
        base_params: fixed constructor arguments of every trial.
        refit: fit ``make_estimator(best params)`` with ``fit(estimator, [])`` at the end.
        study_callbacks: Optuna callbacks ``(study, frozen_trial)`` run after each trial.
        heartbeat_interval: see :func:`resolve_storage`.
        catch: exception types that fail a trial without stopping the study.
    Returns:
        :class:`TuneResult`.
    """
    optuna = _optuna()
    if isinstance(n_trials, bool) or not isinstance(n_trials, (int, np.integer)) or n_trials < 1:
        raise ConfigError(f"n_trials must be a positive integer, got {n_trials!r}")
    if direction not in ("minimize", "maximize"):
        raise ConfigError(f"direction must be 'minimize' or 'maximize', got {direction!r}")
    if not callable(search_space):
        raise ConfigError(f"search_space must be a callable trial -> dict, got {type(search_space).__name__}")
    base = dict(base_params or {})
    if storage is not None and study_name is None:
        study_name = default_study_name
    study = create_study(study_name, storage, sampler, pruner, direction, load_if_exists, seed, heartbeat_interval)
    monitor = metric if isinstance(metric, str) and metric in ("val_loss", "train_loss") else "val_loss"

    def objective(trial) -> float:
        space = search_space(trial)
        if not isinstance(space, Mapping):
            raise ConfigError(f"search_space must return a dict of parameters, got {type(space).__name__}")
        params = {**base, **dict(space)}
        trial.set_user_attr("params", jsonable(params))
        estimator = make_estimator(params)
        if hasattr(estimator, "get_params"):
            trial.set_user_attr("config", jsonable(estimator.get_params(deep=False)))
        start = time.perf_counter()
        fit(estimator, [pruning_callback(trial, monitor)])
        value = metric(estimator) if callable(metric) else history_score(estimator, metric, direction)
        trial.set_user_attr("metrics", jsonable({
            "value": value,
            "best_val_loss": getattr(estimator, "best_val_loss_", None),
            "n_epochs": getattr(estimator, "n_epochs_", None),
            "train_seconds": getattr(estimator, "train_seconds_", time.perf_counter() - start),
        }))
        trial.set_user_attr("history", jsonable(getattr(estimator, "history_", [])))
        return float(value)

    ran: List[int] = []

    def record(study_, frozen) -> None:
        ran.append(int(frozen.number))

    remaining = int(n_trials) - finished_trials(study)
    if remaining > 0:
        states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
            study.optimize(
                objective, n_trials=remaining, timeout=timeout, n_jobs=n_jobs, catch=tuple(catch),
                callbacks=[record, optuna.study.MaxTrialsCallback(int(n_trials), states=states), *study_callbacks],
                gc_after_trial=True,
            )
    result = TuneResult(study=study, trials_run=ran)
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not complete:
        warnings.warn("no trial of the study completed; nothing to refit", RuntimeWarning, stacklevel=2)
        return result
    best = study.best_trial
    result.best_value = float(best.value)
    params = dict(best.user_attrs.get("params", {**base, **best.params}))
    for key, value in base.items():  # give back the original objects of the fixed parameters
        if key in params and params[key] == jsonable(value):
            params[key] = value
    result.best_params = params
    if refit:
        estimator = make_estimator(dict(result.best_params))
        fit(estimator, [])
        result.estimator = estimator
    return result
