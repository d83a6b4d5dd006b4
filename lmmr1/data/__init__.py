"""Data rows, prompt processing, DataModules and synthetic task generators."""
