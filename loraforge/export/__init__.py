"""Handing adapters to other engines: `loraforge convert` (any method as a plain PEFT LoRA, by
loraforge/adapters/convert.py, which `serve --engine vllm` uses too) and llama.cpp's GGUF files, a
LoRA adapter or a merged model (`llamacpp.py`)."""
