"""Name → factory registries (teachers, students, losses), as open_clip's
``list_models()/create_model(name)``: components are chosen by name from
``params.yaml`` and an unknown name fails loudly with the known ones."""
from __future__ import annotations

from typing import Any, Callable, Generic, TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError):
    """Raised for a name no factory was registered under."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


class Registry(Generic[T]):
    """A named collection of factories.

    >>> LOSSES = Registry("loss")
    >>> @LOSSES.register("mse")
    ... def make_mse(**kw): ...
    >>> LOSSES.create("mse")
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._factories: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """Decorator registering ``factory`` under ``name`` (names are unique)."""

        def deco(factory: Callable[..., T]) -> Callable[..., T]:
            if name in self._factories:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._factories[name] = factory
            return factory

        return deco

    def names(self) -> list[str]:
        """Sorted list of registered names."""
        return sorted(self._factories)

    def get(self, name: str) -> Callable[..., T]:
        """The factory registered under ``name``; unknown names list the known ones."""
        try:
            return self._factories[name]
        except KeyError:
            known = ", ".join(self.names()) or "(none)"
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}; known: {known}"
            ) from None

    def create(self, name: str, **kwargs: Any) -> T:
        """Build the component registered under ``name`` with ``kwargs``."""
        return self.get(name)(**kwargs)

    def __contains__(self, name: str) -> bool:
        return name in self._factories
