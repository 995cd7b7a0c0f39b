"""The dashboard's pages, one per module; each has PAGE (path, name, order), layout and
register(app), which calls dash.register_page and attaches the page's callbacks."""

from routescope.dashboard.pages import (
    compare,
    entanglement,
    load,
    overview,
    placement,
    specialization,
    super_experts,
    timeline,
    tokens,
)

PAGES = (overview, load, timeline, entanglement, specialization, super_experts, tokens, compare, placement)

__all__ = ["PAGES"]
