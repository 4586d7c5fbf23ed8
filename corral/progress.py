"""Progress bars of the CLI: counts that never read "0/?"."""

from __future__ import annotations

from rich.progress import ProgressColumn, Task
from rich.text import Text


class Counts(ProgressColumn):
    """done/total; only what is done while the total is unknown; nothing before anything is."""

    def render(self, task: Task) -> Text:
        done = int(task.completed)
        if task.total:
            return Text(f"{done}/{int(task.total)}")
        return Text(str(done) if done else "")
