"""The error a user can cause by a setting: the bottom floor, imported by every layer that checks one."""

from __future__ import annotations

from typing import Any  # noqa: UP035 - OmegaConf reads typing.Dict, not dict[...]

from omegaconf import DictConfig, ListConfig, OmegaConf

__all__ = ["ConfigError"]


class ConfigError(ValueError):
    """A configuration value a user set is not allowed; the message names the key, the value and the rule."""

    def __init__(self, key: str, value: Any, allowed: str):
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"{key}={_show(value)} is not allowed: {allowed}")


def _show(value: Any) -> str:
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value)
    return str(value)
