"""The DreamBooth trainer: its typed config, dataset, loop, LoRA, samples and saving.

Knows nothing of the WebUI or gradio; runs from the CLI and from tests.
"""
