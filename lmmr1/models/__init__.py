"""Offline model builders: tiny random models for tests, the embedded mini model for the demo."""
