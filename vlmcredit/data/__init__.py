"""Inputs: rollout readers, MME readers and scoring, synthetic data, image loading."""
