"""lmmr1: rule-based RL for small vision-language models."""
