"""What every config file shares: `parse_arg` for the `:key=value,...` arguments.

The engine's keys and defaults are `vlm_jax.train.config.default_config()`."""

import ml_collections


def parse_arg(arg: str, **defaults) -> ml_collections.ConfigDict:
  """`"a=1,b=x"` -> ConfigDict over `defaults`; an unknown key is an error naming it."""
  values = dict(defaults)
  for item in filter(None, (a.strip() for a in (arg or "").split(","))):
    key, sep, value = item.partition("=")
    if not sep or key not in defaults:
      raise ValueError(f"unknown config argument {item!r}; this config takes {sorted(defaults)}")
    kind = type(defaults[key])
    values[key] = kind(value) if kind is not bool else value.lower() in ("1", "true", "yes")
  return ml_collections.ConfigDict(values)
