"""``mpq methods``: every registered method, its settings and their meaning."""

from __future__ import annotations


def method_listing() -> dict:
    """Every registered method: its summary, its config fields (default, meaning from the config's
    docstring) and its training defaults, as ``mpq methods`` shows them."""
    import dataclasses

    from ..methods import METHODS
    from ..methods.base import field_help

    listing = {}
    for name, cls in sorted(METHODS.items()):
        meanings = field_help(cls.config_class)
        listing[name] = {
            "summary": next(iter((cls.__doc__ or "").strip().splitlines()), ""),
            "fields": {
                f.name: {
                    "default": f.default if f.default is not dataclasses.MISSING else f.default_factory(),
                    "help": meanings.get(f.name, ""),
                }
                for f in dataclasses.fields(cls.config_class)
                if f.name != "version"
            },
            "training_defaults": cls.training_defaults,  # --recipe paper
            "checkpoint_defaults": cls.recipe_defaults("checkpoint"),  # --recipe checkpoint (auto from trained weights)
            "checkpoint_fields": cls.checkpoint_fields,  # method fields --recipe checkpoint sets unless given
        }
    return listing
