"""A name -> object table that turns config strings into functions and classes.

Every lookup that comes from a config goes through `Registry.get`, so a bad name
fails with one line naming the config field and the allowed values, before any
compilation.
"""

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from diffusion_jax.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to objects of one kind (schedules, samplers, models, datasets)."""

    def __init__(self, kind: str, field: str):
        """`kind` names what is stored ('sampler'); `field` the config key that picks it."""
        self.kind = kind
        self.field = field
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: `@REGISTRY.register("ddim")` adds the decorated object under `name`."""

        def add(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = obj
            return obj

        return add

    def get(self, name: str) -> T:
        """The object registered as `name`; a ConfigError naming the field if there is none."""
        try:
            return self._entries[name]
        except KeyError:
            raise ConfigError(
                    f"{self.field}: unknown {self.kind} {name!r}; choose one of: {', '.join(self.names())}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
