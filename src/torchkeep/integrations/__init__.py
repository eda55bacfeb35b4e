"""Adapters to the frameworks people train with: Lightning, the Hugging Face Trainer, Accelerate, PEFT.

Each lives in its own module and imports its framework only when used; install the extra
(``pip install 'torchkeep[lightning]'``, ``[transformers]``, ``[accelerate]``, ``[peft]``). See
``docs/integrations.md``.
"""
