"""What the client needs to know about a provider, as one interface.

A provider is the first segment of a model string (`local/...`, `fake/...`; every other one is routed by
litellm, see registry.py). The client (llm/client.py) never tests a provider's name: it asks the
provider of each model config

- `resolve`: the config ready to call (a `Target`): files and scripts are checked here, so a missing
  one is a spec error (exit 2) located at `models.<m>.model` before any call;
- `identity`: what identifies the model in the cache key (a file's sha256, a script's, a model name
  and endpoint), never a secret;
- `cost`: the price of one reply;
- `concurrency`: how many calls of one config may be in flight;
- `deployments` and `call_kwargs`: the endpoints litellm is given;
- `prepare`: what litellm needs before the first call (an in-process provider registers its handler);
- `warm_up_module`: what the route imports only after its first request left (imported beforehand,
  so that import does not count in an attempt's timeout).

Every call goes through `litellm.acompletion`; an in-process provider is a litellm custom provider
(`InProcessProvider.make_handler`), which signals "request sent" itself (`gateway.request_sent`) when
it starts on a request: the attempt's timeout runs from there.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, ClassVar

from autodiff_cli.errors import AutodiffError

if TYPE_CHECKING:
    from autodiff_cli.spec.models import Deployment, ModelConfig


@dataclass(frozen=True)
class Target:
    """A model config resolved for calling."""

    name: str  # the config's name (`models.<name>`)
    cfg: ModelConfig
    provider: Provider
    key_name: str  # the provider in the cache key: its name, or litellm's route prefix ("" when litellm infers it)
    litellm_model: str  # the model string litellm is called with
    path: Path | None = None  # the file behind the model (a GGUF file, a fake script), if any


class Provider(ABC):
    """One kind of model. Subclass `InProcessProvider` for one served inside this process."""

    name: ClassVar[str]  # the model-string prefix it serves
    in_process: ClassVar[bool] = False  # served in this process: no api_base, no deployments (spec/models.py)
    # Whether a request may wait for the provider itself (a model loading, or serving a call of another
    # config) before it is sent: the client then does not bound the wait to be sent (PRE_SEND_GRACE).
    waits_for_model: ClassVar[bool] = False

    def resolve(self, model_name: str, cfg: ModelConfig, *, config_dir: Path,
                environ: Mapping[str, str]) -> Target:
        """The config ready to call. A missing file or a malformed script raises its AutodiffError, located
        at `models.<model_name>.model` unless it names its own place (a script's line)."""
        try:
            return self.make_target(model_name, cfg, config_dir=config_dir, environ=environ)
        except AutodiffError as e:
            if e.key is None and e.file is None:
                e.key = f"models.{model_name}.model"
            raise

    @abstractmethod
    def make_target(self, model_name: str, cfg: ModelConfig, *, config_dir: Path,
                    environ: Mapping[str, str]) -> Target:
        """`resolve` without the error location."""

    @abstractmethod
    async def identity(self, target: Target, environ: Mapping[str, str]) -> dict:
        """The model's part of the cache key (changing it changes every key of the provider's calls)."""

    @abstractmethod
    def cost(self, target: Target, response: Any) -> float:
        """USD of one reply (0.0 when unknown)."""

    def concurrency(self, cfg: ModelConfig, override: int | None) -> int:
        """Calls of one config in flight at once: `--concurrency` when given, else the config's own."""
        return override or cfg.capacity()

    def deployments(self, cfg: ModelConfig) -> list[Deployment] | None:
        """The endpoints a call may go to when there are several (None: one)."""
        return None

    def call_kwargs(self, target: Target) -> dict[str, Any]:
        """What this provider adds to `litellm.acompletion`'s arguments (e.g. an `api_base`)."""
        return {}

    def prepare(self, litellm: ModuleType) -> None:
        """Make litellm ready for this provider's calls (run before each attempt: make it cheap to repeat)."""

    def warm_up_module(self, litellm: ModuleType, target: Target) -> str | None:
        """A module litellm's route imports only after the request was sent (None: nothing to warm up)."""
        return None


class InProcessProvider(Provider):
    """A provider served inside this process through a litellm custom handler: nothing goes over the
    network, nothing is billed, and the handler calls `gateway.request_sent(gateway.call_id_of(logging_obj))`
    when it starts on a request (litellm's pre-call hook fires only for its own HTTP routes)."""

    in_process = True

    @abstractmethod
    def locate(self, rest: str, *, config_dir: Path, environ: Mapping[str, str]) -> tuple[str, Path | None]:
        """(the model string litellm is called with, the file behind it) for `<name>/<rest>`; raises
        ModelNotFound / SpecError when it cannot be called."""

    @abstractmethod
    def make_handler(self, litellm: ModuleType) -> Any:
        """The `litellm.CustomLLM` serving `<name>/...` (built here so no module imports litellm early)."""

    def make_target(self, model_name, cfg, *, config_dir, environ) -> Target:
        litellm_model, path = self.locate(cfg.model.partition("/")[2], config_dir=config_dir, environ=environ)
        return Target(model_name, cfg, self, self.name, litellm_model, path)

    def cost(self, target: Target, response: Any) -> float:
        return 0.0  # runs on this machine

    def prepare(self, litellm: ModuleType) -> None:
        from autodiff_cli.llm.providers.gateway import register_handler

        register_handler(litellm, self.name, self.make_handler)


def absolute(path: str, base: Path) -> Path:
    """`path` (`~` expanded) as an absolute path, relative ones against `base` (the config's folder)."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else (base / p).resolve()
