"""Ranking metrics, classic baselines and the results report."""
