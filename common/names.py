"""The one rule for identifiers that become folder or file names: run ids, site
names, dataset names. A name is checked before it is used, never repaired: a run id
of '../x' from a run config must not reach a path."""

from __future__ import annotations

import re

from common.errors import ConfigError

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_name(kind: str, value: object) -> str:
    """`value` if it is one plain name (letters, digits, '.', '_', '-'; starting with
    a letter or digit; at most 128 characters), else a ConfigError (a ValueError) naming
    `kind`."""
    if not isinstance(value, str) or not NAME.fullmatch(value) or ".." in value:
        raise ConfigError(f"{kind} {value!r} cannot name a folder: use letters, digits, "
                         "'.', '_' and '-' only (starting with a letter or digit, no '..', "
                         "at most 128 characters)")
    return value
