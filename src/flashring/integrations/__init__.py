"""Integrations with other libraries. Each lives in its own submodule and is imported explicitly, so that
``import flashring`` never pulls in (or requires) a third-party package:

* ``flashring.integrations.transformers``: importing it registers flashring as a Hugging Face transformers
  attention implementation (``attn_implementation=flashring.integrations.transformers.ATTN_IMPLEMENTATION``).
"""
