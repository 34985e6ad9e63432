"""Every playlist-continuation model by name, and one factory that builds them with options.

Register a new model with the decorator, e.g. ``@register("ae-quota")`` on its class, and
import its module below so that the name exists wherever the registry is imported. A model
whose constructor takes a required ``bundle`` argument is a *bundle model*: command lines
pass it ``--bundle`` and benchmarks skip it when none is given.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from trainer.recommenders.ae import AEHybrid, AENeighbours, AEQuota, Ranked
from trainer.recommenders.als import ALSRecommender
from trainer.recommenders.base import Recommender
from trainer.recommenders.knn import PlaylistKNN
from trainer.recommenders.popular import MostPopular

MODELS: dict[str, type[Recommender]] = {}


def register(name: str) -> Callable[[type[Recommender]], type[Recommender]]:
    """Class decorator adding a recommender to :data:`MODELS` under ``name``.

    Raises
    ------
    ValueError
        When ``name`` is already taken by another class.
    """
    def add(cls: type[Recommender]) -> type[Recommender]:
        if MODELS.get(name, cls) is not cls:
            raise ValueError(f"model name {name!r} is already registered to "
                             f"{MODELS[name].__qualname__}")
        MODELS[name] = cls
        return cls
    return add


register("most-popular")(MostPopular)
register("playlist-knn")(PlaylistKNN)
register("als")(ALSRecommender)
register("ae-quota")(AEQuota)
register("ae-neighbours")(AENeighbours)
register("ae-hybrid")(AEHybrid)
register("ranked")(Ranked)


def _parameters(cls: type[Recommender]) -> dict[str, inspect.Parameter]:
    params = dict(inspect.signature(cls.__init__).parameters)
    params.pop("self", None)
    return {k: p for k, p in params.items()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def needs_bundle(name: str) -> bool:
    """Whether the model cannot be built without a ``bundle`` option (a trained export)."""
    param = _parameters(_lookup(name)).get("bundle")
    return param is not None and param.default is inspect.Parameter.empty


def model_options(name: str) -> list[str]:
    """The keyword options a model's constructor accepts."""
    return list(_parameters(_lookup(name)))


def _lookup(name: str) -> type[Recommender]:
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known models: "
                         f"{', '.join(sorted(MODELS))}") from None


def make_recommender(name: str, **options: Any) -> Recommender:
    """Build a registered model.

    Parameters
    ----------
    name
        A key of :data:`MODELS`, e.g. ``"playlist-knn"``.
    **options
        Passed to the model's constructor (``k=200``, ``bundle="bundles/x"``, ...).

    Raises
    ------
    ValueError
        For an unknown name (the message lists the known ones), an option the model does
        not take, or a required option left out.
    """
    cls = _lookup(name)
    params = _parameters(cls)
    unknown = sorted(set(options) - set(params))
    if unknown:
        raise ValueError(f"model {name!r} has no option {', '.join(map(repr, unknown))}; "
                         f"its options: {', '.join(params) or 'none'}")
    missing = [k for k, p in params.items()
               if p.default is inspect.Parameter.empty and k not in options]
    if missing:
        raise ValueError(f"model {name!r} needs option {', '.join(map(repr, missing))}")
    return cls(**options)


def parse_option(text: str) -> tuple[str, Any]:
    """``"k=200"`` -> ``("k", 200)``: ints, floats, ``true``/``false`` and strings.

    Raises
    ------
    ValueError
        When ``text`` has no ``=`` or an empty key.
    """
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"bad model option {text!r}: expected KEY=VALUE")
    value: Any = raw
    if raw.lower() in ("true", "false"):
        value = raw.lower() == "true"
    else:
        for kind in (int, float):
            try:
                value = kind(raw)
                break
            except ValueError:
                pass
    return key.strip(), value
