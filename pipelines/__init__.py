"""Data cleaning and fine-tuning jobs."""
