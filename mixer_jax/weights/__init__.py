"""Pretrained weights and their formats: official .npz files, the registry of published checkpoints, timm/safetensors files, the Hugging Face Hub, and one loader for every checkpoint kind.
"""
