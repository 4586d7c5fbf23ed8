"""MT-bench style judging and arena ratings. Not built yet: see the judge issue."""
