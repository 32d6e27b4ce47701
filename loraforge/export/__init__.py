"""Handing adapters to other engines: any method as a plain PEFT LoRA (`convert.py`), and llama.cpp's
GGUF files, a LoRA adapter or a merged model (`gguf.py`)."""
