"""The network of :class:`~titans_ts.gluonts.TitansEstimator`: GluonTS batch fields in, quantiles
(or samples) out, around :class:`titans_ts.module.TitansForecastNetwork`.

Inputs (the GluonTS field names, as produced by the estimator's ``InstanceSplitter``):

- ``past_target`` ``[B, context_length]``: the look-back; missing values were replaced by a dummy
  ``0`` by ``AddObservedValuesIndicator`` (and series shorter than ``context_length`` padded on
  the left with ``0``);
- ``past_observed_values`` ``[B, context_length]``: 1 = observed, 0 = missing or padding;
- ``past_time_feat`` ``[B, context_length, D]`` (when ``num_feat_dynamic_real = D > 0``): the
  dataset's ``feat_dynamic_real`` (renamed ``time_feat`` by the estimator's transformation, as in
  GluonTS's PatchTST), entered as extra channels of each patch token; the future part
  (``future_time_feat``), which GluonTS requires of ``feat_dynamic_real``, is accepted and
  ignored (the covariates are used as past inputs only).

Missing values: unobserved past values are imputed inside the network before RevIN, by the last
observed value (carried forward) and, before the first observed value of the window, by the mean
of the observed values of the window; unobserved future values are left out of the loss.

Outputs: ``forecast_type="quantile"``: ``((quantiles [B, H, Q],), None, None)``, the layout
GluonTS's ``QuantileForecastGenerator`` reads (quantiles monotone in ``Q``); ``"sample"``:
``[B, num_samples, H]`` samples for ``SampleForecastGenerator``, drawn from the predicted quantile
function (see :func:`sample_from_quantiles`).
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from gluonts.core.component import validated
from gluonts.model import Input, InputSpec
from torch import Tensor, nn

from titans_memory import MemoryConfig, TitansConfig
from titans_memory.errors import ConfigError

from ..module import TitansForecastNetwork, n_patches, pinball_loss

__all__ = ["FORECAST_TYPES", "TitansGluonModel", "impute_missing", "sample_from_quantiles", "window_scale"]

FORECAST_TYPES = ("quantile", "sample")


def impute_missing(x: Tensor, observed: Tensor) -> Tensor:
    """``x`` ``[B, L]`` with ``observed`` ``[B, L]`` (nonzero = observed) -> ``x`` with every
    unobserved (or non-finite) value replaced by the last observed value before it, or, before
    the first observed value, by the mean of the observed values of its row (0 for a row with
    none)."""
    obs = (observed > 0.5) & torch.isfinite(x)
    x0 = torch.where(obs, x, torch.zeros_like(x))
    n = obs.sum(dim=1, keepdim=True)
    mean = x0.sum(dim=1, keepdim=True) / n.clamp_min(1)
    pos = torch.arange(x.shape[1], device=x.device).expand_as(x)
    last = torch.where(obs, pos, torch.full_like(pos, -1)).cummax(dim=1).values
    carried = torch.gather(x0, 1, last.clamp_min(0))
    return torch.where(last >= 0, carried, mean.expand_as(x))


def window_scale(x: Tensor, observed: Tensor, rel_floor: float = 1e-3) -> Tensor:
    """Per-window scale ``[B]`` of the observed values of ``x`` ``[B, L]``: their standard
    deviation, at least ``rel_floor`` times their mean absolute value. Windows with fewer than two
    observed values (or a zero scale) get the mean scale of the other windows (1 if none)."""
    obs = ((observed > 0.5) & torch.isfinite(x)).to(x.dtype)
    n = obs.sum(dim=1)
    x0 = torch.where(obs > 0, x, torch.zeros_like(x))
    mean = x0.sum(dim=1) / n.clamp_min(1)
    var = (((x0 - mean[:, None]) * obs) ** 2).sum(dim=1) / n.clamp_min(1)
    scale = torch.maximum(var.sqrt(), rel_floor * (x0.abs().sum(dim=1) / n.clamp_min(1)))
    ok = (n >= 2) & (scale > 0)
    fallback = scale[ok].mean() if bool(ok.any()) else torch.ones((), dtype=x.dtype, device=x.device)
    return torch.where(ok, scale, fallback)


def sample_from_quantiles(q_values: Tensor, levels: Tensor, num_samples: int,
                          generator: Optional[torch.Generator] = None) -> Tensor:
    """Draw samples from the piecewise-linear quantile function through ``(levels[k],
    q_values[..., k])``.

    ``q_values`` ``[B, H, Q]`` (non-decreasing in ``Q``), ``levels`` ``[Q]`` sorted, ``Q >= 2``.
    For each sample and each step an independent ``u ~ U(0, 1)`` is drawn and mapped through the
    quantile function, interpolated linearly between levels and extrapolated linearly (with the
    slope of the outermost segment) below the lowest and above the highest level. The marginal
    distribution of every step is therefore the one the quantile head predicts; the dependence
    between steps is not modelled (samples are independent across steps). Returns
    ``[B, num_samples, H]``.
    """
    b, h, q = q_values.shape
    if q < 2:
        raise ConfigError("sampling from the quantile function needs at least two quantile levels")
    levels = levels.to(q_values.device, q_values.dtype)
    u = torch.rand((b, num_samples, h), generator=generator, device="cpu" if generator is not None else q_values.device)
    u = u.to(q_values.device, q_values.dtype)
    hi = torch.searchsorted(levels, u.contiguous()).clamp(1, q - 1)     # [B, S, H]
    lo = hi - 1
    vals = q_values.unsqueeze(1).expand(b, num_samples, h, q)          # [B, S, H, Q]
    v_lo = torch.gather(vals, -1, lo.unsqueeze(-1)).squeeze(-1)
    v_hi = torch.gather(vals, -1, hi.unsqueeze(-1)).squeeze(-1)
    l_lo, l_hi = levels[lo], levels[hi]
    w = (u - l_lo) / (l_hi - l_lo)
    return v_lo + w * (v_hi - v_lo)


class TitansGluonModel(nn.Module):
    """GluonTS-facing wrapper of :class:`~titans_ts.module.TitansForecastNetwork` (one series per
    sample, channel-independent, quantile head).

    Args:
        prediction_length, context_length: horizon ``H`` and look-back ``L``.
        quantiles: sorted quantile levels of the head (at least one; two for sampling).
        num_feat_dynamic_real: number of dynamic real features ``D``.
        d_model, n_layers, n_heads, variant, memory_depth, memory_expansion, chunk_size, ffn_mult,
            dropout, persistent_tokens, window_size, segment_size: the Titans backbone
            (:class:`~titans_memory.TitansConfig`; ``chunk_size=0``: one chunk for all patches).
        patch_len, stride, head, revin, revin_affine, head_dropout: see
            :class:`~titans_ts.module.TitansForecastNetwork`.
        forecast_type: ``"quantile"`` or ``"sample"`` (what :meth:`forward` returns).
        num_samples: samples per forward pass with ``forecast_type="sample"``.
    """

    @validated()
    def __init__(
        self,
        prediction_length: int,
        context_length: int,
        quantiles: List[float],
        num_feat_dynamic_real: int = 0,
        d_model: int = 32,
        n_layers: int = 2,
        n_heads: int = 4,
        variant: str = "lmm",
        memory_depth: int = 2,
        memory_expansion: int = 2,
        chunk_size: int = 16,
        ffn_mult: int = 2,
        dropout: float = 0.1,
        persistent_tokens: int = 4,
        window_size: int = 16,
        segment_size: int = 16,
        patch_len: int = 16,
        stride: int = 8,
        head: str = "flatten",
        revin: bool = True,
        revin_affine: bool = False,
        head_dropout: float = 0.0,
        forecast_type: str = "quantile",
        num_samples: int = 100,
    ) -> None:
        super().__init__()
        if forecast_type not in FORECAST_TYPES:
            raise ConfigError(f"forecast_type must be one of {FORECAST_TYPES}, got {forecast_type!r}")
        levels = [float(q) for q in quantiles]
        if not levels or levels != sorted(set(levels)) or not all(0.0 < q < 1.0 for q in levels):
            raise ConfigError(f"quantiles must be sorted, distinct levels in (0, 1), got {quantiles!r}")
        if forecast_type == "sample" and len(levels) < 2:
            raise ConfigError("forecast_type='sample' needs at least two quantile levels")
        if num_samples < 1:
            raise ConfigError(f"num_samples must be >= 1, got {num_samples}")
        self.prediction_length, self.context_length = int(prediction_length), int(context_length)
        self.num_feat_dynamic_real = int(num_feat_dynamic_real)
        self.quantiles = levels
        self.forecast_type, self.num_samples = forecast_type, int(num_samples)
        n_tok = n_patches(self.context_length, patch_len, stride) if 1 <= stride <= patch_len else 1
        backbone = TitansConfig(
            d_model=d_model, n_layers=n_layers, n_heads=n_heads, variant=variant,
            memory=MemoryConfig(depth=memory_depth, expansion=memory_expansion, chunk_size=chunk_size or n_tok),
            persistent_tokens=persistent_tokens, segment_size=segment_size, window_size=window_size,
            ffn_mult=ffn_mult, dropout=dropout,
        )
        self.net = TitansForecastNetwork(
            self.context_length, self.prediction_length, 1 + self.num_feat_dynamic_real, 1, backbone,
            patch_len=patch_len, stride=stride, channel_mode="independent", head=head, quantiles=levels,
            revin=revin, revin_affine=revin_affine, head_dropout=head_dropout,
        )
        self.register_buffer("levels", torch.tensor(levels, dtype=torch.float32), persistent=False)

    def describe_inputs(self, batch_size: int = 1) -> InputSpec:
        """The inputs :meth:`forward` takes (GluonTS convention)."""
        spec = {
            "past_target": Input(shape=(batch_size, self.context_length), dtype=torch.float),
            "past_observed_values": Input(shape=(batch_size, self.context_length), dtype=torch.float),
        }
        if self.num_feat_dynamic_real > 0:
            d = self.num_feat_dynamic_real
            spec["past_time_feat"] = Input(shape=(batch_size, self.context_length, d), dtype=torch.float)
            spec["future_time_feat"] = Input(shape=(batch_size, self.prediction_length, d), dtype=torch.float)
        return InputSpec(spec, zeros_fn=torch.zeros)

    def _inputs(self, past_target: Tensor, past_observed_values: Tensor,
                past_time_feat: Optional[Tensor]) -> Tensor:
        target = impute_missing(past_target.float(), past_observed_values.float())
        chans = [target.unsqueeze(-1)]
        if self.num_feat_dynamic_real > 0:
            if past_time_feat is None:
                raise ConfigError(f"the model was built with num_feat_dynamic_real={self.num_feat_dynamic_real} "
                                  "but the batch has no past_time_feat")
            feat = torch.nan_to_num(past_time_feat.float(), nan=0.0, posinf=0.0, neginf=0.0)
            chans.append(feat[:, -self.context_length:, : self.num_feat_dynamic_real])
        return torch.cat(chans, dim=-1).unsqueeze(2)                   # [B, L, 1, F]

    def quantile_forecast(self, past_target: Tensor, past_observed_values: Tensor,
                          past_time_feat: Optional[Tensor] = None) -> Tensor:
        """Quantile forecasts ``[B, H, Q]`` in the units of the target."""
        out = self.net(self._inputs(past_target, past_observed_values, past_time_feat))
        return out[:, :, 0, :]

    def forward(self, past_target: Tensor, past_observed_values: Tensor,
                past_time_feat: Optional[Tensor] = None,
                future_time_feat: Optional[Tensor] = None):
        """``((quantiles [B, H, Q],), None, None)`` or samples ``[B, num_samples, H]``."""
        q = self.quantile_forecast(past_target, past_observed_values, past_time_feat)
        if self.forecast_type == "quantile":
            return (q,), None, None
        return sample_from_quantiles(q, self.levels, self.num_samples)

    def loss(self, past_target: Tensor, past_observed_values: Tensor, future_target: Tensor,
             future_observed_values: Tensor, past_time_feat: Optional[Tensor] = None,
             future_time_feat: Optional[Tensor] = None, scale: bool = True) -> Tensor:
        """Pinball loss averaged over the quantile levels and the observed future values.

        With ``scale`` the errors of each window are divided by the scale of its observed past
        values (:func:`window_scale`), so series of different magnitudes weigh alike.
        """
        q = self.quantile_forecast(past_target, past_observed_values, past_time_feat)   # [B, H, Q]
        y = future_target.to(q.dtype)
        mask = ((future_observed_values > 0.5) & torch.isfinite(y)).to(q.dtype)
        y = torch.where(mask > 0, y, torch.zeros_like(y))
        err = pinball_loss(q, y, self.levels.to(q.dtype)).mean(-1)                                 # [B, H]
        if scale:
            err = err / window_scale(past_target.float(), past_observed_values.float()).to(q.dtype)[:, None]
        return (err * mask).sum() / mask.sum().clamp_min(1.0)


class GluonTSQuantileLoss:
    """``loss_fn(network, batch)`` for the library's LightningModule: maps a GluonTS batch (a dict
    with ``past_target``, ``past_observed_values``, ``future_target``, ``future_observed_values``
    and optionally ``past_time_feat``) to :meth:`TitansGluonModel.loss`."""

    FIELDS: Tuple[str, ...] = ("past_target", "past_observed_values", "future_target", "future_observed_values",
                               "past_time_feat", "future_time_feat")

    def __init__(self, scale: bool = True) -> None:
        self.scale = bool(scale)

    def __call__(self, network: TitansGluonModel, batch) -> Tensor:
        kwargs = {k: batch[k] for k in self.FIELDS if k in batch}
        return network.loss(**kwargs, scale=self.scale)
