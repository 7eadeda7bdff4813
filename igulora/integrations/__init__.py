"""Integrations with the training and serving ecosystem, kept out of igulora's core.

- :mod:`igulora.integrations.trainer`: the Hugging Face ``Trainer`` mixin (any subclass) and
  ``IGUTrainer``;
- :mod:`igulora.integrations.trl`: TRL's ``SFTTrainer`` (``IGUSFTTrainer``);
- :mod:`igulora.integrations.export`: adapters for servers (vLLM's rules, the uniform layout).

The core (``igulora.model`` and below) imports none of transformers' Trainer, TRL or Accelerate.
"""
