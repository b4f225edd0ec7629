"""DreamBooth training for the AUTOMATIC1111 Stable Diffusion WebUI.

The core package knows nothing of the WebUI or gradio: the checkpoint bridge,
the trainer and the job runner work from the CLI and from tests alike.
"""

__version__ = "0.1.0"
