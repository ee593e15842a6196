"""Hugging Face glue: one small adapter per MoE architecture (``adapters``), checkpoint loading and the model
fingerprint (``fingerprint``) that ties stats and plans to one model."""
