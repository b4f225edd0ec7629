"""Stand-in for Forge's modules_forge package (lllyasviel/stable-diffusion-webui-forge); its presence marks Forge."""
