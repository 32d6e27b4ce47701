"""The vision stage: a self-built CLIP + text-to-image testbed, and CLIP few-shot adaptation."""
