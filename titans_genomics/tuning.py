"""Optuna tuning of :class:`~titans_genomics.TitansSequenceClassifier`: :func:`tune`.

::

    from titans_genomics import tune
    study, clf = tune(train_df, None, n_trials=20, storage="dna.db", study_name="prom_core_tata")
    # optuna-dashboard sqlite:///dna.db

The same function shape and study machinery as :func:`titans_ts.tune`
(:mod:`titans_memory.tuning`: storage URLs, resume, parallel workers, per-epoch pruning on the
validation loss, user attributes). Every trial fits a classifier with
``{**base_params, **search_space(trial)}`` on ``X, y`` (validation: ``X_val, y_val`` when given,
else the classifier's ``val_size`` hold-out) and returns its best validation cross-entropy. For
another objective pass ``metric=callable`` (e.g. ``lambda clf: clf.score(X_val, y_val)`` with
``direction="maximize"``).

Default search space (:func:`default_search_space`): ``variant`` in lmm / mac / mag / mal,
``d_model`` in 64 / 128 / 256 (``n_heads = 4``), ``n_layers`` 1-3, ``memory_depth`` 1-2,
``chunk_size`` in 16 / 32 / 64, ``pooling`` in mean / mean+last, ``learning_rate`` 1e-4-3e-3
(log), ``dropout`` 0-0.3, ``weight_decay`` in 0 / 0.01 / 0.05.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Sequence, Union

from titans_memory.errors import ConfigError
from titans_memory.tuning import TuneResult, run_tuning

__all__ = ["TuneResult", "default_search_space", "tune"]


def default_search_space(trial) -> Dict[str, Any]:
    """The documented default search space: ``trial -> dict`` of classifier parameters."""
    return {
        "variant": trial.suggest_categorical("variant", ["lmm", "mac", "mag", "mal"]),
        "d_model": trial.suggest_categorical("d_model", [64, 128, 256]),
        "n_heads": 4,
        "n_layers": trial.suggest_int("n_layers", 1, 3),
        "memory_depth": trial.suggest_int("memory_depth", 1, 2),
        "chunk_size": trial.suggest_categorical("chunk_size", [16, 32, 64]),
        "pooling": trial.suggest_categorical("pooling", ["mean", "mean+last"]),
        "learning_rate": trial.suggest_float("learning_rate", 1e-4, 3e-3, log=True),
        "dropout": trial.suggest_float("dropout", 0.0, 0.3),
        "weight_decay": trial.suggest_categorical("weight_decay", [0.0, 0.01, 0.05]),
    }


def tune(
    X: Any,
    y: Any,
    n_trials: int,
    storage: Any = None,
    study_name: Optional[str] = None,
    search_space: Optional[Callable[[Any], Dict[str, Any]]] = None,
    pruner: Any = None,
    timeout: Optional[float] = None,
    val_size: Optional[float] = None,
    metric: Union[str, Callable[[Any], float]] = "val_loss",
    load_if_exists: bool = True,
    n_jobs: int = 1,
    base_params: Optional[Dict[str, Any]] = None,
    refit: bool = True,
    *,
    X_val: Any = None,
    y_val: Any = None,
    seed: Optional[int] = 0,
    sampler: Any = None,
    direction: str = "minimize",
    study_callbacks: Sequence[Callable] = (),
    heartbeat_interval: Optional[int] = None,
    callbacks: Sequence[Any] = (),
) -> TuneResult:
    """Tune a :class:`~titans_genomics.TitansSequenceClassifier` on ``X, y`` with Optuna.

    Args:
        X, y: training data in any form :meth:`TitansSequenceClassifier.fit` accepts (``y=None``
            for a DataFrame with a label column or a ``{label: fasta}`` dict).
        n_trials, storage, study_name, search_space, pruner, timeout, metric, load_if_exists,
            n_jobs, base_params, refit, seed, sampler, direction, study_callbacks,
            heartbeat_interval: as in :func:`titans_ts.tune` (default study name
            ``"titans_genomics"``; default search space :func:`default_search_space`).
        val_size: fraction held out for validation when no ``X_val`` is given (the classifier's
            ``val_size``; None: its default, 0.1).
        X_val, y_val: explicit validation data.
        callbacks: extra Lightning callbacks for every fit.
    Returns:
        :class:`~titans_memory.tuning.TuneResult` (``study, clf = tune(...)`` unpacks it).
    """
    from .classifier import TitansSequenceClassifier

    if X_val is None and val_size is not None and not val_size > 0:
        raise ConfigError("tune needs validation data: pass X_val / y_val or val_size > 0")
    base: Dict[str, Any] = {"enable_progress_bar": False}
    if seed is not None:
        base["random_state"] = int(seed)
    base.update(base_params or {})
    if val_size is not None:
        base["val_size"] = float(val_size)
    known = set(TitansSequenceClassifier().get_params(deep=False))
    unknown = sorted(set(base) - known)
    if unknown:
        raise ConfigError(f"unknown TitansSequenceClassifier parameters in base_params: {unknown}")

    def make(params: Dict[str, Any]) -> TitansSequenceClassifier:
        bad = sorted(set(params) - known)
        if bad:
            raise ConfigError(f"the search space returned unknown TitansSequenceClassifier parameters: {bad}")
        return TitansSequenceClassifier(**params)

    def fit(clf: TitansSequenceClassifier, lightning_callbacks) -> None:
        clf.fit(X, y, X_val=X_val, y_val=y_val, callbacks=[*lightning_callbacks, *callbacks])

    return run_tuning(
        make, fit, search_space or default_search_space, n_trials, storage=storage, study_name=study_name,
        default_study_name="titans_genomics", pruner=pruner, sampler=sampler, seed=seed, timeout=timeout,
        metric=metric, direction=direction, load_if_exists=load_if_exists, n_jobs=n_jobs, base_params=base,
        refit=refit, study_callbacks=study_callbacks, heartbeat_interval=heartbeat_interval,
    )
