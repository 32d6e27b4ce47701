"""Text-to-image personalisation: hypernetwork LoRA with HM-CFG, DECOR, EasyRef (issue 24)."""
