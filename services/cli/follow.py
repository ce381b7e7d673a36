"""What `corral submit --follow` prints while a task runs: progress lines, an answer as it streams in, and, for
an orchestrated task, its plan as a tree of parts (planned / running / done / failed), redrawn in place on a
terminal as the parts move, printed anew on each change elsewhere (a pipe, a log)."""

from __future__ import annotations

import msgspec
from rich.console import Console
from rich.live import Live
from rich.tree import Tree

from contracts.events import PartState

LOOK = {"waiting": ("planned", "dim"), "running": ("running", "yellow"), "completed": ("done", "green"),
        "failed": ("failed", "red"), "cancelled": ("cancelled", "dim")}


def plan_tree(task_id: str, parts: list[PartState]) -> Tree:
    """The task, its subtasks under it, and the synthesis last."""
    tree = Tree(f"plan of {task_id}", highlight=False)
    for part in parts:
        word, style = LOOK[part.status]
        used = f", {part.tokens:,} tokens" if part.tokens else ""
        tree.add(f"[{style}]{word:<9}[/] {part.id} ({part.agent}{used})")
    return tree


class ProgressPrinter:
    """Progress as lines; an answer streaming in as it is generated, its pieces in order (a retried step streams
    anew, on a line of its own); a plan's parts as a tree."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.step = ""
        self.streamed = ""
        """The text streamed by the last step that streamed."""
        self.pending: dict[int, str] = {}
        self.next_seq = 1
        self.live: Live | None = None
        self.parts: list[PartState] = []

    def __call__(self, progress) -> None:
        if progress.stage == "plan" and progress.parts:
            self._plan(progress.task_id, progress.parts)
            return
        self._stop_tree()
        if progress.stage != "streaming":
            self.end()
            self.console.print(f"  {progress.stage}: {progress.message}", markup=False, highlight=False)
            return
        if progress.step_id != self.step:
            self.end()
            self.step, self.streamed, self.pending, self.next_seq = progress.step_id, "", {}, 1
        self.pending[progress.seq] = progress.message
        while self.next_seq in self.pending:
            piece = self.pending.pop(self.next_seq)
            self.console.out(piece, end="", highlight=False)
            self.streamed += piece
            self.next_seq += 1

    def _plan(self, task_id: str, parts: list[PartState]) -> None:
        if parts == self.parts:
            return  # the same states again (another coordinator's news, a redelivery)
        self.parts = parts
        self.end()
        tree = plan_tree(task_id, parts)
        if not self.console.is_terminal:
            self.console.print(tree)
        elif self.live is None:
            self.live = Live(tree, console=self.console, auto_refresh=False)
            self.live.start(refresh=True)
        else:
            self.live.update(tree, refresh=True)

    def _stop_tree(self) -> None:
        """Leave the tree as it last was, above what comes next (the synthesis's answer streaming in)."""
        if self.live is not None:
            self.live.stop()
            self.live = None

    def end(self) -> None:
        if self.step:
            self.console.out("")
            self.step = ""

    def close(self, end=None) -> None:
        """The task ended (`end`, its terminal event): a plan's tree shows its synthesis as it ended."""
        if self.parts and end is not None and self.parts[-1].status not in ("completed", "failed"):
            status = "completed" if type(end).__struct_config__.tag == "task.completed" else "failed"
            self._plan(end.task_id, [*self.parts[:-1], msgspec.structs.replace(self.parts[-1], status=status)])
        self._stop_tree()
        self.end()
