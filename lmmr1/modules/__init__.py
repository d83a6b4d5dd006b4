"""Models, the RL LightningModule, algorithms (pure functions) and the typed experience batch."""
