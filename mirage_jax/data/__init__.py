"""Data sources: the synthetic A-roll corpus, real footage, and the grain pipeline."""
