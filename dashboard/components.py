"""Building blocks the pages share: captioned graphs, message boxes, filter bars, and the
`guarded` decorator that turns any error in a callback into a page message (never a
traceback in the browser). All text reaches the browser as text components, never HTML (tables
as one Markdown component whose every cell is escaped to literal text).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from typing import Any

import plotly.graph_objects as go
from dash import dcc, html, no_update
from dash.exceptions import PreventUpdate

from routescope import plots
from routescope.dashboard.filters import FilterError, TokenFilter
from routescope.dashboard.runs import RunRegistry, RunUnavailable, get_registry

log = logging.getLogger("routescope.dashboard")

CARD = {
    "border": "1px solid #ddd",
    "borderRadius": "6px",
    "padding": "8px 12px",
    "background": "#fff",
}
CAPTION = {"color": "#555", "fontSize": "13px", "margin": "2px 0 16px 4px"}
MESSAGE_STYLES = {
    "info": {"background": "#eef5fc", "border": "1px solid #9cc3e8", "color": "#1a4a73"},
    "warning": {"background": "#fff6e5", "border": "1px solid #f0c36d", "color": "#6b4a00"},
    "error": {"background": "#fdecea", "border": "1px solid #f5a9a0", "color": "#7a1c12"},
}
ROW = {"display": "flex", "gap": "12px", "flexWrap": "wrap", "alignItems": "flex-end"}
FIGURE = "figure"
MESSAGE = "message"
CHILDREN = "children"
OPTIONS = "options"
KEEP = "keep"
# Dash 4 sliders carry their own number boxes that apply only on blur; ours apply on Enter
NO_SLIDER_BOXES = (
    {"allow_direct_input": False} if "allow_direct_input" in dcc.RangeSlider()._prop_names else {}
)


def graph(component_id: str, caption_name: str) -> html.Div:
    """A dcc.Graph with its one-line caption underneath."""
    return html.Div(
        [
            dcc.Graph(id=component_id, config={"displaylogo": False}, figure=plots.empty_figure("loading…")),
            html.P(plots.caption(caption_name), id=f"{component_id}-caption", style=CAPTION),
        ]
    )


def message(text: str | None, kind: str = "info") -> html.Div | None:
    """A coloured box with plain text (rendered as text, never HTML); None for no message."""
    if not text:
        return None
    style = {**MESSAGE_STYLES[kind], "padding": "8px 12px", "borderRadius": "6px", "margin": "8px 0"}
    return html.Div(str(text), className=f"rs-message rs-{kind}", style=style)


def labelled(label: str, component: Any, width: str = "200px") -> html.Div:
    return html.Div(
        [html.Label(label, style={"fontSize": "12px", "color": "#555"}), component], style={"width": width}
    )


def filter_bar(prefix: str) -> html.Div:
    """Phase, label, label value, rank and step-range controls; ids `{prefix}-phase` etc.

    The step range is a slider plus two number boxes that apply on Enter (or on leaving
    the box); `register_step_boxes` keeps them in step with the slider.
    """
    return html.Div(
        [
            labelled(
                "phase",
                dcc.Dropdown(
                    id=f"{prefix}-phase",
                    options=[{"label": "all", "value": "all"}],
                    value="all",
                    clearable=False,
                ),
                "120px",
            ),
            labelled("label", dcc.Dropdown(id=f"{prefix}-label", options=[], placeholder="(none)"), "140px"),
            labelled(
                "label value", dcc.Dropdown(id=f"{prefix}-value", options=[], placeholder="(any)"), "170px"
            ),
            labelled(
                "rank",
                dcc.Dropdown(
                    id=f"{prefix}-rank",
                    options=[{"label": "all", "value": "all"}],
                    value="all",
                    clearable=False,
                ),
                "100px",
            ),
            labelled(
                "steps",
                dcc.RangeSlider(
                    id=f"{prefix}-steps",
                    min=0,
                    max=1,
                    value=[0, 1],
                    allowCross=False,
                    step=1,
                    tooltip={"placement": "bottom"},
                    **NO_SLIDER_BOXES,
                ),
                "220px",
            ),
            labelled(
                "from – to step (Enter applies)",
                html.Div(
                    [
                        dcc.Input(
                            id=f"{prefix}-step-from",
                            type="number",
                            step=1,
                            debounce=True,
                            style={"width": "70px"},
                        ),
                        dcc.Input(
                            id=f"{prefix}-step-to",
                            type="number",
                            step=1,
                            debounce=True,
                            style={"width": "70px"},
                        ),
                    ],
                    style={"display": "flex", "gap": "4px"},
                ),
                "200px",
            ),
        ],
        style={**ROW, "margin": "8px 0"},
    )


def sync_step_boxes(triggered: Any, steps: Any, start: Any, end: Any, lo: Any, hi: Any) -> tuple:
    """(slider value, from box, to box) after one of them changed: the slider moves the boxes,
    a box (applied on Enter) moves the slider, clamped to the run's steps [lo, hi]."""
    if triggered is None or str(triggered).endswith("-steps"):
        if not isinstance(steps, (list, tuple)) or len(steps) != 2:
            raise PreventUpdate
        return no_update, steps[0], steps[1]
    lo = int(lo) if isinstance(lo, (int, float)) else 0
    hi = int(hi) if isinstance(hi, (int, float)) else lo
    now = steps if isinstance(steps, (list, tuple)) and len(steps) == 2 else [lo, hi]
    a = int(start) if isinstance(start, (int, float)) else int(now[0])
    b = int(end) if isinstance(end, (int, float)) else int(now[1])
    a, b = max(lo, min(a, hi)), max(lo, min(b, hi))
    a, b = min(a, b), max(a, b)
    return [a, b], a, b


def register_step_boxes(app: Any, prefix: str) -> None:
    """Attach `sync_step_boxes` to a filter bar's slider and boxes."""
    from dash import Input, Output, State, ctx

    def callback(steps: Any, start: Any, end: Any, lo: Any, hi: Any) -> tuple:
        return sync_step_boxes(ctx.triggered_id, steps, start, end, lo, hi)

    app.callback(
        Output(f"{prefix}-steps", "value", allow_duplicate=True),
        Output(f"{prefix}-step-from", "value"),
        Output(f"{prefix}-step-to", "value"),
        Input(f"{prefix}-steps", "value"),
        Input(f"{prefix}-step-from", "value"),
        Input(f"{prefix}-step-to", "value"),
        State(f"{prefix}-steps", "min"),
        State(f"{prefix}-steps", "max"),
        prevent_initial_call=True,
    )(callback)


def filter_from(
    registry_key: str, phase: Any, label: Any, value: Any, steps: Any, rank: Any = None
) -> TokenFilter:
    """The TokenFilter for a page's controls; the full step range means no step filter."""
    flt = TokenFilter.from_inputs(phase, label, value, steps, rank)
    if flt.step_min is not None:
        choices = get_registry().query(registry_key, "filter_choices")
        if flt.step_min <= (choices["step_min"] or 0) and flt.step_max >= (choices["step_max"] or 0):
            flt = TokenFilter(flt.phase, flt.label, flt.value, rank=flt.rank)
    return flt


def filter_controls(state: Any, label: Any) -> tuple:
    """Options for a filter bar: phases, labels, values of the chosen label, step range, ranks."""
    registry, key = current(state)
    choices = registry.query(key, "filter_choices")
    phases = [{"label": "all", "value": "all"}] + [{"label": p, "value": p} for p in choices["phases"]]
    labels = [{"label": name, "value": name} for name in choices["labels"]]
    values = [{"label": v, "value": v} for v in choices["labels"].get(label, [])] if label else []
    lo, hi = choices["step_min"] or 0, choices["step_max"] or 0
    hi = max(hi, lo)
    marks = {lo: str(lo), hi: str(hi)}
    ranks = [{"label": "all", "value": "all"}] + [
        {"label": str(r), "value": str(r)} for r in choices["ranks"]
    ]
    return phases, labels, values, lo, hi, [lo, hi], marks, ranks


def keep_step_range(now: Any, old_max: Any, lo: int, hi: int) -> list[int]:
    """The slider value after the run's step range became [lo, hi]: full range by default,
    the user's range otherwise (its end follows the run when it sat at the old last step)."""
    if not isinstance(now, (list, tuple)) or len(now) != 2 or not isinstance(old_max, (int, float)):
        return [lo, hi]
    start, end = int(now[0]), int(now[1])
    if end >= old_max:
        end = hi
    start, end = max(lo, min(start, hi)), max(lo, min(end, hi))
    return [start, max(start, end)]


def current(state: Any, require_tokens: bool = True) -> tuple[RunRegistry, str]:
    """The registry and the run key a page shows, from the shell's `app-version` store.

    RunUnavailable (shown as the page message) for a key that is not served, a run that
    cannot be opened, and, with `require_tokens`, a run that holds no tokens yet.
    """
    if not isinstance(state, dict) or "run" not in state:
        raise PreventUpdate
    registry = get_registry()
    key = state["run"]
    registry.run(key)  # RunUnavailable for an unknown key or a run that does not open
    if require_tokens and registry.query(key, "summary")["tokens"] == 0:
        name = registry.slots[key].name
        raise RunUnavailable(f"{name} holds no tokens yet: there is nothing to draw.")
    return registry, key


def guarded(outputs: Sequence[str]) -> Callable:
    """Decorator: on error, return empty figures and a message instead of raising.

    `outputs` names the kind of each output: FIGURE, MESSAGE (gets the message box),
    CHILDREN (gets None), OPTIONS (gets []), KEEP (no_update). Expected problems (an
    unknown run, a bad filter, a run that cannot be read) read as they are; anything else
    is logged on the server and shown as one line.
    """

    def decorate(func: Callable) -> Callable:
        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return func(*args, **kwargs)
            except PreventUpdate:
                raise
            except (RunUnavailable, FilterError, ValueError, KeyError) as exc:
                text, kind = str(exc).strip("'\""), "warning"
            except Exception as exc:
                log.exception("dashboard callback %s failed", func.__name__)
                text, kind = f"could not compute this view: {type(exc).__name__}: {exc}", "error"
            return error_outputs(outputs, text, kind)

        wrapper.outputs = tuple(outputs)  # type: ignore[attr-defined]
        return wrapper

    return decorate


def error_outputs(outputs: Sequence[str], text: str, kind: str = "warning") -> Any:
    values: list[Any] = []
    for out in outputs:
        if out == FIGURE:
            values.append(empty_data_figure(text))
        elif out == MESSAGE:
            values.append(message(text, kind))
        elif out == OPTIONS:
            values.append([])
        elif out == CHILDREN:
            values.append(None)
        else:
            values.append(no_update)
    return values[0] if len(values) == 1 else tuple(values)


def empty_data_figure(text: str) -> go.Figure:
    return plots.empty_figure(text if len(text) < 90 else text[:87] + "…")


def table(df: Any, columns: Sequence[tuple[str, str]], max_rows: int = 50) -> html.Div:
    """A plain table of DataFrame rows; every cell is text.

    Drawn by one `dcc.Markdown` component (a GitHub-style pipe table, every punctuation
    character escaped, so a cell is always literal text) rather than one Dash component per
    cell: the browser builds the same <table>, but Dash's renderer pays per component, and a
    table of a few hundred cells cost over a second on a 2-core machine (issue 33)."""
    head = "| " + " | ".join(md_cell(title) for _, title in columns) + " |"
    rule = "|" + "---|" * len(columns)
    body = [
        "| " + " | ".join(md_cell(format_cell(rec[col])) for col, _ in columns) + " |"
        for _, rec in df.head(max_rows).iterrows()
    ]
    # a wide table scrolls inside its box instead of widening the page
    return html.Div(
        dcc.Markdown("\n".join([head, rule, *body]), className=TABLE_CLASS),
        style={"overflowX": "auto", "maxWidth": "100%"},
    )


TABLE_CLASS = "rs-table"
# the tables' look, served once in the page head (app.index_string)
TABLE_CSS = (
    f".{TABLE_CLASS} table{{border-collapse:collapse;font-size:13px}}"
    f".{TABLE_CLASS} th,.{TABLE_CLASS} td{{text-align:left;padding:2px 8px}}"
)
# what the Markdown parser Dash ships (remark-parse, GFM mode) lets a backslash escape; `&`, `<`
# and `:` (entities, inline HTML, autolinks) are written as character references instead
_ESCAPED = frozenset("\\`*{}[]()#+-.!_>~|")
_REFERENCES = {"&": "&amp;", "<": "&lt;", ":": "&#58;"}


def md_cell(text: str) -> str:
    """`text` as a Markdown table cell that renders literally, whatever characters it holds."""
    out = ("\\" + ch if ch in _ESCAPED else _REFERENCES.get(ch, ch) for ch in text)
    return "".join(out) or " "


def format_cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, str):
        return repr(value)[1:-1] if any(ch in value for ch in "\n\t\r") else value
    return str(value)
