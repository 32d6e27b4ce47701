"""Adapters as data: the adapter zoo, generators (ICM-LoRA, SG-LoRA, a text hypernetwork) and ABMLL."""
