"""Optuna tuning of :class:`~titans_ts.TitansForecaster`: :func:`tune`.

::

    from titans_ts import tune
    result = tune(df, h=96, n_trials=30, storage="study.db", study_name="etth1")
    study, model = result                        # the study and the refit best model
    model.predict()
    # optuna-dashboard sqlite:///study.db        (browse the study)

Every trial fits a :class:`TitansForecaster` with ``{**base_params, **search_space(trial)}`` (plus
``h`` and ``val_size``) on ``df``, reports its validation loss (the last ``val_size`` steps of
each series, as in ``fit``) after every epoch for pruning, and returns the best validation loss.
The study machinery (storage, resume, parallel workers, seeding, pruning, user attributes) is
:mod:`titans_memory.tuning`, shared with :func:`titans_genomics.tune`; read its docstring for
storage URLs (SQLite file, PostgreSQL on a cluster), resuming an interrupted study and running
several worker processes on one study.

Default search space (:func:`default_search_space`):

================== ==================================================== =======================
parameter          values                                               note
================== ==================================================== =======================
``variant``        ``lmm``, ``mac``, ``mag``, ``mal``                   Titans variant
``patch_len``      8, 16, 24, 32 (those <= ``input_size``)              ``stride = patch_len//2``
``d_model``        32, 64, 128                                          ``n_heads = 4``
``n_layers``       1 .. 3
``memory_depth``   1 .. 3                                               1 = linear memory
``chunk_size``     4, 8, 16, 32                                         memory chunk (tokens)
``learning_rate``  1e-4 .. 3e-3, log scale
``dropout``        0.0 .. 0.3
``weight_decay``   0, 1e-4, 1e-3, 1e-2
================== ==================================================== =======================
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Sequence, Union

from titans_memory.errors import ConfigError
from titans_memory.tuning import TuneResult, run_tuning

__all__ = ["TuneResult", "default_search_space", "tune"]


def default_search_space(input_size: int = 96) -> Callable[[Any], Dict[str, Any]]:
    """The documented default search space (see the module docstring) for look-back
    ``input_size``: a callable ``trial -> dict`` of :class:`TitansForecaster` parameters."""
    patches = [p for p in (8, 16, 24, 32) if p <= input_size] or [int(input_size)]

    def space(trial) -> Dict[str, Any]:
        patch_len = trial.suggest_categorical("patch_len", patches)
        return {
            "variant": trial.suggest_categorical("variant", ["lmm", "mac", "mag", "mal"]),
            "patch_len": patch_len,
            "stride": max(1, patch_len // 2),
            "d_model": trial.suggest_categorical("d_model", [32, 64, 128]),
            "n_heads": 4,
            "n_layers": trial.suggest_int("n_layers", 1, 3),
            "memory_depth": trial.suggest_int("memory_depth", 1, 3),
            "chunk_size": trial.suggest_categorical("chunk_size", [4, 8, 16, 32]),
            "learning_rate": trial.suggest_float("learning_rate", 1e-4, 3e-3, log=True),
            "dropout": trial.suggest_float("dropout", 0.0, 0.3),
            "weight_decay": trial.suggest_categorical("weight_decay", [0.0, 1e-4, 1e-3, 1e-2]),
        }

    return space


def tune(
    df: Any,
    h: int,
    n_trials: int,
    storage: Any = None,
    study_name: Optional[str] = None,
    search_space: Optional[Callable[[Any], Dict[str, Any]]] = None,
    pruner: Any = None,
    timeout: Optional[float] = None,
    val_size: Optional[int] = None,
    metric: Union[str, Callable[[Any], float]] = "val_loss",
    load_if_exists: bool = True,
    n_jobs: int = 1,
    base_params: Optional[Dict[str, Any]] = None,
    refit: bool = True,
    *,
    seed: Optional[int] = 0,
    sampler: Any = None,
    direction: str = "minimize",
    study_callbacks: Sequence[Callable] = (),
    heartbeat_interval: Optional[int] = None,
    **fit_kwargs: Any,
) -> TuneResult:
    """Tune a :class:`~titans_ts.TitansForecaster` on ``df`` with Optuna.

    Args:
        df: the training frame (as for :meth:`TitansForecaster.fit`, pandas or polars, long or wide).
        h: forecast horizon.
        n_trials: finished (COMPLETE or PRUNED) trials the study should hold; a resumed study runs
            only the missing ones, parallel workers stop together when it is reached.
        storage: ``None`` (in memory), a file path (SQLite, ``sqlite:///<path>``), an RDB URL
            (``postgresql+psycopg2://user:pw@host/db`` for a cluster) or an Optuna storage.
        study_name: the study's name (default ``"titans_ts"`` when ``storage`` is given).
        search_space: callable ``trial -> dict`` of TitansForecaster parameters (default:
            :func:`default_search_space` for ``base_params["input_size"]``, else 96).
        pruner: Optuna pruner (default ``MedianPruner(n_startup_trials=3, n_warmup_steps=1)``).
        timeout: seconds after which no new trial starts.
        val_size: validation steps at the end of each series (``TitansForecaster(val_size=)``;
            None: its default). Must leave validation windows: the objective is the validation loss.
        metric: ``"val_loss"`` (default), another per-epoch history key, or ``fitted model -> float``.
        load_if_exists: resume / join an existing study of the same name.
        n_jobs: parallel trials in threads of this process (several processes scale better).
        base_params: fixed TitansForecaster parameters of every trial (e.g. ``input_size``,
            ``max_epochs``, ``batch_size``, ``device``); the search space overrides them.
        refit: refit the best configuration on ``df`` and return it.
        seed: seeds the sampler (per trial number) and, unless ``base_params`` sets
            ``random_state``, every trial's model.
        sampler: an Optuna sampler instead of the seeded TPE.
        direction: ``"minimize"`` (losses) or ``"maximize"``.
        study_callbacks: Optuna ``(study, frozen_trial)`` callbacks run after each trial.
        heartbeat_interval: fail and retry trials of dead workers (RDB storage only).
        fit_kwargs: passed to :meth:`TitansForecaster.fit` (``format``, ``id_col``, ``time_col``,
            ``target_col``, ``target_cols``, ``callbacks``: extra Lightning callbacks).
    Returns:
        :class:`~titans_memory.tuning.TuneResult` (``study, model = tune(...)`` unpacks it);
        ``result.best_params`` are the best trial's constructor arguments.
    """
    from .forecaster import TitansForecaster

    if val_size is not None and val_size == 0:
        raise ConfigError("tune needs validation data: val_size must be None or >= h, got 0")
    base = {"enable_progress_bar": False}
    if seed is not None:
        base["random_state"] = int(seed)
    base.update(base_params or {})
    base["h"] = h
    if val_size is not None:
        base["val_size"] = val_size
    known = set(TitansForecaster().get_params(deep=False))
    unknown = sorted(set(base) - known)
    if unknown:
        raise ConfigError(f"unknown TitansForecaster parameters in base_params: {unknown}")
    space = search_space or default_search_space(int(base.get("input_size", TitansForecaster().input_size)))
    extra_callbacks = list(fit_kwargs.pop("callbacks", ()) or ())

    def make(params: Dict[str, Any]) -> TitansForecaster:
        params = dict(params)
        params["h"], params["val_size"] = base["h"], base.get("val_size", params.get("val_size"))
        bad = sorted(set(params) - known)
        if bad:
            raise ConfigError(f"the search space returned unknown TitansForecaster parameters: {bad}")
        return TitansForecaster(**params)

    def fit(model: TitansForecaster, callbacks) -> None:
        model.fit(df, callbacks=[*callbacks, *extra_callbacks], **fit_kwargs)

    return run_tuning(
        make, fit, space, n_trials, storage=storage, study_name=study_name, default_study_name="titans_ts",
        pruner=pruner, sampler=sampler, seed=seed, timeout=timeout, metric=metric, direction=direction,
        load_if_exists=load_if_exists, n_jobs=n_jobs, base_params=base, refit=refit,
        study_callbacks=study_callbacks, heartbeat_interval=heartbeat_interval,
    )
