"""The adapters layer: put a method's layers on a model and take them off (`inject`), read and
write adapters in PEFT's format (`io`), and write any method's adapter as plain LoRA (`convert`)."""
