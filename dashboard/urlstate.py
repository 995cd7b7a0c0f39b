"""The view's state in the URL fragment: `#run=1&phase=decode&steps=3-9&layer=2`.

The fragment (not the query string) holds it because Dash pages re-render a page whenever
the query string changes; the fragment changes nothing but the address bar and history.
The shell owns `run`; each page reads its own keys when it draws its controls and writes
them back when they change, so a reload or a shared link shows the same view. Values are
only ever compared with the options a page offers, never used as paths or SQL.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl, urlencode

MAX_FRAGMENT = 2000  # characters read from the URL fragment; the rest is ignored


def read_fragment(fragment: Any) -> dict[str, str]:
    """`#a=1&b=x` (or without the #) as a dict of strings; anything malformed reads as empty."""
    if not isinstance(fragment, str):
        return {}
    text = fragment[:MAX_FRAGMENT].lstrip("#")
    return {k: v for k, v in parse_qsl(text, keep_blank_values=False)}


def write_fragment(fragment: Any, updates: Mapping[str, Any]) -> str:
    """The fragment with `updates` applied: None or 'all' removes a key; order is stable (run first)."""
    params = read_fragment(fragment)
    for key, value in updates.items():
        if value is None or value == "all" or value == "":
            params.pop(key, None)
        else:
            params[key] = str(value)
    ordered = dict(sorted(params.items(), key=lambda kv: (kv[0] != "run", kv[0])))
    return "#" + urlencode(ordered) if ordered else ""


def steps_value(text: Any) -> list[int] | None:
    """'3-9' as [3, 9]; None when it is not two integers."""
    try:
        a, b = (int(v) for v in str(text).split("-"))
    except (TypeError, ValueError):
        return None
    return [min(a, b), max(a, b)]


def int_value(text: Any) -> int | None:
    try:
        return int(str(text))
    except (TypeError, ValueError):
        return None


def pick(value: Any, allowed: list[Any], default: Any) -> Any:
    """`value` when it is one of `allowed` (as offered by the page), else `default`."""
    return value if value in allowed else default


def sync_run(fragment: Any, run_value: Any, keys: list[str], triggered: Any) -> tuple[Any, Any]:
    """(run dropdown value, fragment) after the address or the dropdown changed; None = unchanged.

    From the address: a served run key in `run=` selects that run; without one, the
    fragment gets the current run. From the dropdown: the fragment follows it.
    """
    params = read_fragment(fragment)
    wanted = params.get("run")
    if triggered == "app-url":
        if wanted in keys and wanted != run_value:
            return wanted, None
        if wanted not in keys and run_value in keys:
            return None, write_fragment(fragment, {"run": run_value})
        return None, None
    if run_value in keys and wanted != run_value:
        return None, write_fragment(fragment, {"run": run_value})
    return None, None


def fragment_for(fragment: Any, values: Mapping[str, Any], defaults: Mapping[str, Any]) -> str | None:
    """The fragment with `values` written (a value equal to its default is left out); None
    when nothing changes."""
    updates = {key: (None if value == defaults.get(key) else value) for key, value in values.items()}
    new = write_fragment(fragment, updates)
    return None if new == (fragment or "") else new


def register_fragment(app: Any, fields: Mapping[str, str], defaults: Mapping[str, Any] | None = None) -> None:
    """Write the `value` of each component (fields: URL key -> component id) into the URL
    fragment whenever one changes."""
    from dash import Input, Output, State, no_update

    keys = list(fields)
    defaults = dict(defaults or {})

    def write(fragment: Any, *values: Any) -> Any:
        new = fragment_for(fragment, dict(zip(keys, values)), defaults)
        return no_update if new is None else new

    app.callback(
        Output("app-url", "hash", allow_duplicate=True),
        State("app-url", "hash"),
        *(Input(fields[key], "value") for key in keys),
        prevent_initial_call=True,
    )(write)
