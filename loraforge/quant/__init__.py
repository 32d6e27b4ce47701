"""Frozen bases held in fewer bits: `nf4` (QLoRA), one file per format."""
