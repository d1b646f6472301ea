"""Model providers behind the client: one module each, listed in registry.py (base.py is their interface).

`load_litellm` (gateway.py) is the package's entry for code that needs litellm itself.
"""
from autodiff_cli.llm.providers.gateway import load_litellm

__all__ = ["load_litellm"]
