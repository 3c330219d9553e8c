"""A submission's feedback page, built by the grader from data: sanitised HTML, no hidden tests.

nbgrader's ``generate_feedback`` would run nbconvert on the student's executed notebook in the
grader's own process, render raw HTML and ``<script>`` from the student's outputs and markdown, and
show each test cell as it ran (hidden tests included). This page is written here instead, from

* the lesson's release notebook (markdown and test cells as the student got them: the hidden tests
  are not in the release),
* the student's own code in the exercise cells, and the text/image outputs of the executed copy
  for the non-test cells (all text escaped; images only as validated PNG/JPEG data),
* the judge's verdicts: per test cell its points and, for a failure of the visible tests, the
  message (a hidden test that fails says only that).

Nothing from the student is ever emitted unescaped: no markup, no scripts, no links.
"""
from __future__ import annotations

import base64
import html
import re

from .notebooks import nbgrader_meta

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
MAX_TEXT = 20_000

STYLE = """
body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}
pre{background:#f6f6f6;padding:.6rem;overflow-x:auto;white-space:pre-wrap}
.cell{margin:1rem 0}.md pre{background:none;font-family:inherit}
.pass{border-left:4px solid #2a2;padding-left:.6rem}.fail{border-left:4px solid #c22;padding-left:.6rem}
.out{color:#333;border-left:2px solid #ccc}.score{font-weight:bold}
"""


def _text(s: str, limit: int = MAX_TEXT) -> str:
    s = _ANSI.sub("", s if isinstance(s, str) else "".join(s) if isinstance(s, list) else str(s))
    if len(s) > limit:
        s = s[:limit] + "\n[... cut]"
    return html.escape(s, quote=True)


def _image(data, mime: str) -> str:
    if isinstance(data, list):
        data = "".join(data)
    if not isinstance(data, str) or len(data) > 5_000_000:
        return ""
    try:
        raw = base64.b64decode(data, validate=True)
    except (ValueError, TypeError):
        return ""
    ok = raw.startswith(b"\x89PNG\r\n\x1a\n") if mime == "image/png" else raw.startswith(b"\xff\xd8")
    if not ok:
        return ""
    return f'<img alt="figure" src="data:{mime};base64,{base64.b64encode(raw).decode()}">'


def _outputs(cell) -> str:
    parts = []
    for out in cell.get("outputs", [])[:50]:
        kind = out.get("output_type")
        if kind == "stream":
            parts.append(f'<pre class="out">{_text(out.get("text", ""))}</pre>')
        elif kind == "error":
            parts.append(f'<pre class="out">{_text(str(out.get("ename", "")))}: '
                         f'{_text(str(out.get("evalue", "")), 2000)}</pre>')
        elif kind in ("execute_result", "display_data"):
            data = out.get("data", {}) or {}
            img = next((_image(data[m], m) for m in ("image/png", "image/jpeg") if m in data), "")
            if img:
                parts.append(img)
            elif "text/plain" in data:
                parts.append(f'<pre class="out">{_text(data["text/plain"])}</pre>')
    return "".join(parts)


def page(title: str, release, student_nb, graded_nb, cells: dict, messages: dict,
         score: float, max_score: float) -> str:
    """The HTML page. ``release``: the lesson's release notebook; ``student_nb``: the submission
    (its exercise code); ``graded_nb``: the executed copy or None; ``cells``: test id ->
    (score, max); ``messages``: test id -> the judge's message."""
    code = {}
    for c in (student_nb.cells if student_nb is not None else []):
        gid = nbgrader_meta(c).get("grade_id")
        if gid and c.get("cell_type") == "code" and gid not in code:
            code[gid] = c.get("source", "")
    executed = {}
    for c in (graded_nb.cells if graded_nb is not None else []):
        gid = nbgrader_meta(c).get("grade_id")
        if gid and gid not in executed:
            executed[gid] = c
    body = [f"<h1>{_text(title)}</h1>",
            f'<p class="score">Score: {score:g} / {max_score:g}</p>']
    for c in release.cells:
        meta = nbgrader_meta(c)
        gid = meta.get("grade_id")
        if c.cell_type == "markdown":
            body.append(f'<div class="cell md"><pre>{_text(c.source)}</pre></div>')
        elif gid in cells:  # a test cell: the release's source (no hidden tests), the verdict
            s, m = cells[gid]
            ok = s >= m
            msg = "" if ok else (messages.get(gid) or "fails")
            body.append(f'<div class="cell {"pass" if ok else "fail"}"><p class="score">{_text(gid)}:'
                        f' {s:g} / {m:g}</p><pre>{_text(c.source)}</pre>'
                        + (f"<pre>{_text(msg, 2000)}</pre>" if msg else "") + "</div>")
        elif meta.get("solution") and c.cell_type == "code":
            out = _outputs(executed[gid]) if gid in executed else ""
            body.append(f'<div class="cell"><p>your answer ({_text(gid)})</p>'
                        f'<pre>{_text(code.get(gid, ""))}</pre>{out}</div>')
        elif c.cell_type == "code":
            body.append(f'<div class="cell"><pre>{_text(c.source)}</pre></div>')
    return ("<!DOCTYPE html><html><head><meta charset=\"utf-8\">"
            "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; "
            "img-src data:; style-src 'unsafe-inline'\">"
            f"<title>{_text(title)}</title><style>{STYLE}</style></head><body>"
            + "\n".join(body) + "</body></html>\n")
