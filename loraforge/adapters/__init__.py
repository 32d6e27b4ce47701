"""The adapters layer: put a method's layers on a model and take them off (`inject`), and read and
write adapters in PEFT's format (`io`)."""
