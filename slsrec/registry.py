"""Model names -> models. The one place the CLI, trainer and checkpoints turn a name into a model.

Each model's ``config`` carries the batch geometry it wants (``max_len``, and the session rule
``gap_ms``/``max_segment``), so the trainer builds the right batches for it.

>>> m = build_model("slsrec-fixed", n_users=4, n_items=9, d=16)
>>> m.config.fusion, m.config.fixed_alpha, m.config.d
('fixed', 0.5, 16)
>>> build_model("bert4rec", 4, 9)
Traceback (most recent call last):
...
slsrec.errors.UserError: unknown model 'bert4rec'; valid: pop, gru4rec, sasrec, clsr, slsrec, slsrec-long, slsrec-short, slsrec-nocl, slsrec-fixed
"""

from __future__ import annotations

from torch import nn

from slsrec.baselines import GRU4Rec, GRU4RecConfig, Popularity, PopularityConfig, SASRec, SASRecConfig, clsr_overrides
from slsrec.errors import UserError
from slsrec.model import SLSRec, SLSRecConfig, config_from

# name -> (model class, config class, the options that define this variant)
_MODELS: dict[str, tuple[type[nn.Module], type, dict]] = {
    "pop": (Popularity, PopularityConfig, {}),
    "gru4rec": (GRU4Rec, GRU4RecConfig, {}),
    "sasrec": (SASRec, SASRecConfig, {}),
    "clsr": (SLSRec, SLSRecConfig, clsr_overrides()),
    "slsrec": (SLSRec, SLSRecConfig, {}),
    "slsrec-long": (SLSRec, SLSRecConfig, dict(fusion="long", contrastive="none")),
    "slsrec-short": (SLSRec, SLSRecConfig, dict(fusion="short", contrastive="none")),
    "slsrec-nocl": (SLSRec, SLSRecConfig, dict(contrastive="none")),
    "slsrec-fixed": (SLSRec, SLSRecConfig, dict(fusion="fixed", fixed_alpha=0.5)),
}
MODEL_NAMES: tuple[str, ...] = tuple(_MODELS)


def build_model(name: str, n_users: int, n_items: int, **overrides) -> nn.Module:
    """Build a named model; ``overrides`` are config fields (unknown ones are an error).

    A saved config rebuilds its model with ``build_model(name, **dataclasses.asdict(config))``.
    """
    if name not in _MODELS:
        raise UserError(f"unknown model {name!r}; valid: {', '.join(MODEL_NAMES)}")
    cls, config_cls, variant = _MODELS[name]
    return cls(config_from(config_cls, **{**variant, "n_users": n_users, "n_items": n_items, **overrides}))
