"""Pretrained weights and their formats: official .npz, the registry, timm
safetensors, the Hugging Face Hub, and one loader for every kind."""
