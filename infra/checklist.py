"""The checklist both dashboards open with: steps that are done, the one to do now, and those to come."""
from __future__ import annotations

DONE, NOW, LATER = "done", "now", "later"  # a step's state; the pages mark each with its own sign


def step(label: str, state: str, detail: str = "") -> dict[str, str]:
    return {"label": label, "state": state, "detail": detail}
