"""nbgrader's ``Execute`` preprocessor with a cap on what a cell may print.

nbgrader's ``LimitOutput`` trims outputs only after the notebook has run, so a cell that prints
gigabytes fills the grader's memory first. ``LimitedExecute`` keeps at most ``max_output_bytes``
of output per cell while the cell runs and drops the rest (the kernel still runs the cell; the
per-cell timeout still applies). Used through ``c.Autograde.autograde_preprocessors``.
"""
from __future__ import annotations

import json

from nbformat.notebooknode import NotebookNode
from nbformat.v4 import output_from_msg
from nbgrader.preprocessors import Execute
from traitlets import Integer

TRUNCATED = "\n... output truncated by the grader (over {limit} bytes in this cell) ...\n"


class OutputCap:
    """Mixin for nbclient clients: per-cell output budget (``max_output_bytes``, a trait of the
    concrete class)."""

    def output(self, outs, msg, display_id, cell_index):
        used = getattr(self, "_brewslm_used", None)
        if used is None:
            used = self._brewslm_used = {}
        size = len(json.dumps(msg.get("content", {}), default=str))
        total = used.get(cell_index, 0) + size
        used[cell_index] = total
        if total > self.max_output_bytes:
            if msg.get("msg_type") == "error":  # an error always counts: never drop it
                return super().output(outs, msg, display_id, cell_index)
            stream = msg.get("content", {}).get("name", "stdout")
            stream = "stderr" if stream == "stderr" else "stdout"
            if used.get(("cut", cell_index, stream)) is None:  # one note per stream, so stderr
                used[("cut", cell_index, stream)] = True        # past the cap still counts
                outs.append(NotebookNode(output_type="stream", name=stream,
                                         text=TRUNCATED.format(limit=self.max_output_bytes)))
            return None
        return super().output(outs, msg, display_id, cell_index)


class LimitedExecute(OutputCap, Execute):
    """nbgrader ``Execute`` with :class:`OutputCap`."""

    max_output_bytes = Integer(1_000_000, help="bytes of output kept per cell").tag(config=True)


__all__ = ["LimitedExecute", "OutputCap", "output_from_msg"]
