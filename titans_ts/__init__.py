"""titans_ts: Titans memory models for time-series forecasting.

``titans_ts.datasets`` loads the LTSF benchmark files (ETTh1/2, ETTm1/2, Weather, ...);
``titans_ts.splits`` gives their standard train/val/test splits and train-only scaler.
"""
