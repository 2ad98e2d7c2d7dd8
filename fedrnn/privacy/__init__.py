"""Differential privacy used on devices: accounting, DP-SGD and exact per-example gradients for the fused LSTM.

Client-level DP (server-side clipping and noise) is a round plugin: :mod:`fedrnn.plugins.client_dp`.
"""
