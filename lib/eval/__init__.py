"""Evaluation harness: offline tasks, metrics with confidence intervals, and the runner."""
