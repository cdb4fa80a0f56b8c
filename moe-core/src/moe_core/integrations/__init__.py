"""Integrations of moe-core with model libraries and engines.

- :mod:`moe_core.integrations.transformers`: Hugging Face transformers 5.x
  (``experts_implementation="moe_core"``), installed with the ``hf`` extra.

Each integration imports its library only when it is used, so importing this
package (or ``moe_core``) never imports transformers.
"""

from __future__ import annotations

__all__: list[str] = []
