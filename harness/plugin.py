"""The one base of every plugin class (attacks, defenses, evaluators, data sets) and of its config,
and of the matrix entries that name one (:class:`NamedEntry`)."""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, model_validator


class PluginConfig(BaseModel):
    """Base of every plugin's ``Config``: unknown keys are errors, values frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class NamedEntry(BaseModel):
    """Base of a matrix entry (a data set, a model, a plugin reference) that a matrix file may write
    as its name alone (``- cifar10``) or as a mapping with ``name`` and an optional ``label``, the
    entry's name in results. Subclasses declare both fields."""

    name: str
    label: str | None

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value

    @property
    def display(self) -> str:
        """The entry's name in results: its ``label``, else its ``name``."""
        return self.label or self.name


class Plugin:
    """What every plugin class declares.

    Attributes:
        kind: ``attack``, ``defense``, ``evaluator`` or ``dataset`` (set by each contract's base class).
        name: the registry name (snake_case), unique across installed plugins.
        version: bump it whenever results change; it is part of every job key.
        summary: one line for ``harness list``.
        paper: the paper (and where available the code) it implements.
        Config: a :class:`PluginConfig` subclass; validated in ``create_*``.
    """

    kind: ClassVar[str] = "plugin"
    name: ClassVar[str]
    version: ClassVar[str]
    summary: ClassVar[str]
    paper: ClassVar[str]
    Config: ClassVar[type[PluginConfig]] = PluginConfig

    def __init__(self, config: PluginConfig | None = None, **kwargs: Any):
        self.config = config if config is not None else self.Config(**kwargs)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"
