"""The LightningModule of :class:`~titans_ts.gluonts.TitansEstimator`.

It *is* the library's training module (:func:`titans_memory.training.build_lightning_module`:
the same ``training_step`` / ``validation_step`` logging ``train_loss`` / ``val_loss``, AdamW
with the cosine schedule), subclassed only so that GluonTS can serialise it: the constructor is
``@validated()`` and takes plain, JSON-encodable arguments, from which it builds the
:class:`~titans_ts.gluonts.module.TitansGluonModel` and the loss
(:class:`~titans_ts.gluonts.module.GluonTSQuantileLoss`). A ``PyTorchPredictor`` holding it can
therefore be written with ``serialize`` and read back with ``Predictor.deserialize``.
"""

from __future__ import annotations

from typing import Optional

from gluonts.core.component import validated

from titans_memory.training import TrainingConfig, lightning_module_class

from .module import GluonTSQuantileLoss, TitansGluonModel

__all__ = ["TitansLightningModule"]


class TitansLightningModule(lightning_module_class()):
    """The library's LightningModule around a :class:`TitansGluonModel`.

    Args:
        model_kwargs: keyword arguments of :class:`TitansGluonModel`.
        lr, weight_decay, warmup_steps, scheduler: optimiser settings
            (:class:`~titans_memory.training.TrainingConfig` semantics: AdamW, linear warm-up,
            then cosine decay over the run when ``scheduler="cosine"``).
        scale_loss: divide each window's pinball loss by the scale of its past values.
    """

    @validated()
    def __init__(
        self,
        model_kwargs: dict,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        scheduler: Optional[str] = "cosine",
        scale_loss: bool = True,
    ) -> None:
        config = TrainingConfig(learning_rate=lr, weight_decay=weight_decay, warmup_steps=warmup_steps,
                                scheduler=scheduler)
        super().__init__(TitansGluonModel(**model_kwargs), GluonTSQuantileLoss(scale=scale_loss), config)
        self.model_kwargs = dict(model_kwargs)
        self.inputs = self.network.describe_inputs()

    @property
    def model(self) -> TitansGluonModel:
        """The network (GluonTS modules call it ``model``)."""
        return self.network
