"""MT-bench style judging and arena ratings."""
