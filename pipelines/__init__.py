"""Data cleaning and fine-tuning jobs. Not built yet: see the job-runner and training issues."""
